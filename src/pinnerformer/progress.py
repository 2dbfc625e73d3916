"""Progress bars (rate and ETA) that stay readable in logs: redrawn live on a terminal, every 30 s otherwise."""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(**kwargs) -> tqdm:
    tty = sys.stderr.isatty()
    kwargs.setdefault("mininterval", 1.0 if tty else 30.0)
    kwargs.setdefault("dynamic_ncols", tty)
    return tqdm(file=sys.stderr, **kwargs)
