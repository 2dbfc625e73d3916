"""Errors a user can act on. The CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations

from pathlib import Path


class PinnerformerError(Exception):
    """Base class of every error caused by input, configuration or usage (not by a bug)."""


class InputError(PinnerformerError):
    """Bad input data, located as precisely as the source allows (file, line or row, field, text)."""

    def __init__(
        self,
        problem: str,
        *,
        path: str | Path | None = None,
        line: int | None = None,
        row: int | None = None,
        field: str | None = None,
        text: str | None = None,
        expected: str | None = None,
        source_line: str | None = None,
        hint: str | None = None,
    ):
        self.problem, self.path, self.line, self.row = problem, path, line, row
        self.field, self.text, self.expected = field, text, expected
        where = str(path) if path is not None else "input"
        if line is not None:
            where += f", line {line}"
        elif row is not None:
            where += f", row {row}"
        msg = f"{where}: {problem}"
        if field is not None:
            msg += f" (field '{field}')"
        if text is not None:
            msg += f"\n  found:    {_shorten(text)!r}"
        if source_line is not None and source_line != text:
            msg += f"\n  line:     {_shorten(source_line)!r}"
        if expected is not None:
            msg += f"\n  expected: {expected}"
        if hint is not None:
            msg += f"\n  hint:     {hint}"
        super().__init__(msg)


def _shorten(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "…"
