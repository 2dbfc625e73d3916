"""What every command shares: the app, the one logger, errors as messages, and the command line as typed."""

from __future__ import annotations

import errno
import shlex
import sys

import typer
from rich.console import Console
from typer.core import TyperGroup

from pinnerformer.version import __version__
from pinnerformer.errors import PinnerformerError


class RecordingGroup(TyperGroup):
    """Keeps the arguments as typed (ctx.meta["argv"]), so that reports can say how to reproduce them."""

    def parse_args(self, ctx, args):
        ctx.meta.setdefault("argv", list(args))
        return super().parse_args(ctx, args)


# rich_markup_mode=None: help texts are plain text ("[ray]" and "[text]" are extras to install, not markup)
app = typer.Typer(cls=RecordingGroup, help="Learn user representations from sequences of user actions, and rank "
                  "with them.", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
                  rich_markup_mode=None)
data_app = typer.Typer(help="Prepare event logs into datasets and inspect them.", no_args_is_help=True,
                       rich_markup_mode=None)
items_app = typer.Typer(help="Item features.", no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")
app.add_typer(items_app, name="items")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # log lines stay whole (grep-able) in files and CI logs


def log(message: str) -> None:
    """Progress and notes go to stderr; results to stdout."""
    err_console.print(message, highlight=False)


def command_line(ctx: typer.Context) -> str:
    """The command as typed: `shlex.join(sys.argv)` with the program named `pinnerformer` (also in-process)."""
    return shlex.join(["pinnerformer", *ctx.meta.get("argv", sys.argv[1:])])


def first_rank() -> bool:
    """Is this process the one that speaks for the run (the only one, or torchrun's rank 0)?"""
    import os

    return int(os.environ.get("RANK", "0")) == 0


def run_guarded(fn, *args, **kwargs):
    """Run a command body; a PinnerformerError becomes a clear message and exit code 2 (no traceback)."""
    try:
        return fn(*args, **kwargs)
    except PinnerformerError as e:
        print("error: " + str(e), file=sys.stderr)
        raise typer.Exit(code=2) from None
    except OSError as e:  # the machine's, not the input's: a full disk, a path under a file, a permission
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        # a write cut short (the disk or a size limit): every output is staged and renamed into place, so say so;
        # other errors (a missing file, a permission) are just the problem and the path
        mid_write = e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        print(f"error: {e.strerror or e}{where}" + ("; nothing half-written was left looking complete" if mid_write
                                                    else ""), file=sys.stderr)
        raise typer.Exit(code=2) from None


def parse_list(text: str | None) -> list[str] | None:
    """'a, b' -> ['a', 'b']; None stays None (not given)."""
    return None if text is None else [p.strip() for p in text.split(",") if p.strip()]


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


def _set_threads(n: int | None) -> None:
    """CPU threads for torch, LightGBM and FAISS (OpenMP) in this process and the processes it starts."""
    if n is None:
        return
    import os

    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit."),
         threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads to compute with (torch, "
                                            "LightGBM, FAISS; default: every core).")):
    """Learn user representations from sequences of user actions, and rank with them."""
    _set_threads(threads)
