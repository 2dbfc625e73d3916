"""The `pinnerformer` command line, one module per stage. Every command has --help; errors print a message and exit
non-zero (2), without a traceback."""

from pinnerformer.cli import (  # noqa: F401  (registers)
    data, evaluate, inference, quickstart, ranking, retrieval, serve, train,
)
from pinnerformer.cli.common import app

__all__ = ["app"]
