"""The `pinnerformer` command line, one module per stage. Every command has --help; errors print a message and exit
non-zero (2), without a traceback."""

from pinnerformer.cli import data, evaluate, inference, quickstart, ranking, retrieval, train  # noqa: F401  (registers)
from pinnerformer.cli.common import app

__all__ = ["app"]
