"""Fast operations, each in one file beside its plain PyTorch reference (and a parity test in tests/test_ops.py):
`quantize` (int8 item vectors), `nn_select` (candidate-anchored nearest-neighbour selection for TransAct V2)."""
