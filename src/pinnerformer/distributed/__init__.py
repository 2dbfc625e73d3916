"""Training on several processes (torchrun): `context.py` (the process group, gradient sums, the autograd-aware
gather of item embeddings), `launch.py` (`train --nproc`)."""
