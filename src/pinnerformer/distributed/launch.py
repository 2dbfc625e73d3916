"""`pinnerformer train --nproc N`: the same command again under torchrun (one machine, N processes), and a fault hook
for the tests that kill a rank.

Several machines: run torchrun yourself on each (docs/distributed.md), e.g.
    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-endpoint HOST:29500 -m pinnerformer.cli train ...
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

FAULT_ENV = "PINNERFORMER_FAULT_KILL_RANK"  # "RANK:STEP": that rank kills itself with SIGKILL after STEP (tests)


def strip_nproc(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the `pinnerformer` command `argv` (as typed, without the program) under torchrun with nproc processes
    (its --nproc removed); its exit status."""
    args = strip_nproc(argv)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "pinnerformer.cli", *args]
    code = subprocess.call(cmd)
    if code != 0:
        print(f"error: the distributed run ({nproc} processes) failed with exit status {code}: a process failed or "
              "was killed (its message is above); nothing after the last checkpoint is kept; run the same command "
              "with --resume to continue from it (with any number of processes)", file=sys.stderr)
    return code


def fault_hook(ctx):
    """on_step for the fault-injection tests: the rank named in $PINNERFORMER_FAULT_KILL_RANK dies at its step."""
    spec = os.environ.get(FAULT_ENV)
    if not spec or ctx is None:
        return None
    rank, step = (int(x) for x in spec.split(":"))
    if ctx.rank != rank:
        return None

    def hook(g: int) -> None:
        if g >= step:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
