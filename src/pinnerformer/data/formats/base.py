"""What every format reader returns, and the shared machinery for reading and checking text input.

A reader turns source files into a `RawLog`: a Polars frame of events in the source's own ids and time
unit, plus `_file`/`_line` columns so that any later check can point at the offending line. Readers
never drop anything silently: a bad value either raises `InputError` naming the file and line, or, when
the user chose `skip_invalid`, is removed and counted by reason in `RawLog.skipped`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import polars as pl

from pinnerformer.errors import InputError

TimeUnit = Literal["s", "ms", "order"]

# Columns of RawLog.events. user/item keep the source's id type (Int64 or String).
EVENT_COLUMNS = ["user", "item", "action", "ts", "surface", "duration", "detail", "_file", "_line"]


@dataclass
class RawLog:
    events: pl.DataFrame  # EVENT_COLUMNS; action: String; ts: Int64 in `ts_unit`
    ts_unit: TimeUnit
    actions: list[str]  # the action vocabulary, in code order
    positive: list[str]
    items: pl.DataFrame  # item (same dtype as events.item), text: String?, interests: List[String]
    sources: list[Path]
    line_label: str = "line"  # "row" for Parquet input, which has no lines
    skipped: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    options: dict[str, object] = field(default_factory=dict)


class Checker:
    """Applies validity checks to a frame that carries `_file`/`_line`.

    strict (default): the first offending row raises InputError with its file, line and text.
    skip_invalid: offending rows are removed and counted under `reason`.
    """

    def __init__(self, skip_invalid: bool, skipped: dict[str, int], line_label: str = "line"):
        self.skip_invalid, self.skipped, self.line_label = skip_invalid, skipped, line_label

    def check(self, df: pl.DataFrame, bad: pl.Expr, *, reason: str, problem: str, field: str | None,
              expected: str, text_col: str | None = None) -> pl.DataFrame:
        flagged = df.select(bad.fill_null(True).alias("_bad"))["_bad"]
        n_bad = int(flagged.sum())
        if n_bad == 0:
            return df
        if not self.skip_invalid:
            first = df.filter(flagged).row(0, named=True)
            text = first.get(text_col) if text_col else first.get(field)
            raise InputError(
                problem + (f" ({n_bad:,} such {self.line_label}s in all)" if n_bad > 1 else ""),
                path=first["_file"], field=field, text=None if text is None else str(text), expected=expected,
                source_line=first.get("raw"), hint="--skip-invalid drops such rows and counts them instead",
                **{self.line_label if self.line_label != "record" else "row": int(first["_line"])},
            )
        self.skipped[reason] = self.skipped.get(reason, 0) + n_bad
        return df.filter(~flagged)


def single_file(path: Path, suffix: str, what: str) -> Path:
    """The input file: `path` itself, or the one *`suffix` file in the folder `path` (several: which one is
    ambiguous, an error)."""
    if not path.exists():
        raise InputError("input not found", path=path, expected=f"{what} or a folder holding one")
    if path.is_file():
        return path
    found = sorted(p for p in path.glob(f"*{suffix}") if p.is_file())
    if len(found) != 1:
        raise InputError(f"found {len(found)} {suffix} files; cannot tell which to read", path=path,
                         expected=f"exactly one {suffix} file in the folder, or the file itself as --input")
    return found[0]


def drop_blank_lines(lines: pl.DataFrame, skipped: dict[str, int]) -> pl.DataFrame:
    """Lines of `read_lines` without the blank ones, which are counted under "blank_lines"."""
    blank = lines["raw"].str.strip_chars() == ""
    n_blank = int(blank.sum())
    if n_blank:
        skipped["blank_lines"] = skipped.get("blank_lines", 0) + n_blank
    return lines.filter(~blank)


BOMS = {b"\xff\xfe": "UTF-16 (little-endian)", b"\xfe\xff": "UTF-16 (big-endian)"}


def check_encoding(path: Path, data: bytes) -> bytes:
    """The bytes without a UTF-8 byte-order mark; a UTF-16 file is named as such (convert it to UTF-8), a binary
    file as binary (its bytes are never printed)."""
    for bom, name in BOMS.items():
        if data.startswith(bom) and not data.startswith(b"\xff\xfe\x00\x00"):
            raise InputError(f"the file is {name} text (it starts with a byte-order mark)", path=path,
                             expected="UTF-8 text (convert it, e.g. iconv -f UTF-16 -t UTF-8)")
    if b"\x00" in data[:65536]:
        raise InputError("the file looks binary (it holds NUL bytes), not text", path=path,
                         expected="a text file (is it compressed, or another format?)")
    return data[3:] if data.startswith(b"\xef\xbb\xbf") else data


def cut_last_line(path: Path, lines: list[str], checker: "Checker | None") -> list[str]:
    """A file that does not end with a newline was probably cut off inside its last line (a partial copy or
    download): that line is an error, or, with skip_invalid, dropped and counted as `truncated_last_line`."""
    if checker is None or not checker.skip_invalid:
        raise InputError("the file does not end with a newline: its last line looks cut off", path=path,
                         line=len(lines), text=lines[-1], expected="complete lines, each ending with a newline",
                         hint="--skip-invalid drops that line and counts it")
    checker.skipped["truncated_last_line"] = checker.skipped.get("truncated_last_line", 0) + 1
    return lines[:-1]


def read_lines(path: Path, encoding: str = "utf-8", checker: "Checker | None" = None) -> pl.DataFrame:
    """Every line of a text file with its 1-based line number. Blank lines are kept (callers decide); a leading
    UTF-8 byte-order mark is dropped; a last line without its newline is refused or counted (`cut_last_line`)."""
    if not path.exists():
        raise InputError("file not found", path=path)
    data = check_encoding(path, path.read_bytes())
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise InputError(f"cannot decode as {encoding}", path=path, line=line,
                         expected=f"{encoding} text") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    elif lines and lines[-1].strip():
        lines = cut_last_line(path, lines, checker)
    return pl.DataFrame({"_line": pl.int_range(1, len(lines) + 1, eager=True, dtype=pl.Int64),
                         "raw": pl.Series(lines, dtype=pl.String).str.strip_suffix("\r")})


_OTHER_DELIMITERS = {",": "comma", "\t": "tab", ";": "semicolon", "|": "pipe", "::": "'::'", " ": "space"}


def guess_delimiter_hint(sample: str, expected: str) -> str:
    """A short hint naming the delimiter a line seems to use, when it is not the expected one."""
    found = [name for d, name in _OTHER_DELIMITERS.items() if d != expected and d in sample]
    return f" (the line looks {found[0]}-separated: wrong delimiter?)" if found else ""


def split_fields(lines: pl.DataFrame, path: Path, sep: str, names: list[str], checker: Checker,
                 layout: str, *, skip_blank: bool = True) -> pl.DataFrame:
    """Split `raw` lines on a literal separator into exactly len(names) string columns.

    Lines with another field count are malformed: an error naming the line, or skipped and counted.
    """
    if skip_blank:
        lines = drop_blank_lines(lines, checker.skipped)
    parts = lines.with_columns(pl.col("raw").str.split(sep).alias("_parts"))
    n = len(names)
    wrong = pl.col("_parts").list.len() != n
    n_wrong = int(parts.select(wrong.sum()).item())
    if n_wrong and not checker.skip_invalid:
        first = parts.filter(wrong).row(0, named=True)
        raise InputError(
            f"malformed line: {len(first['_parts'])} field(s) where {n} were expected"
            + guess_delimiter_hint(first["raw"], sep)
            + (f" ({n_wrong:,} malformed lines in all)" if n_wrong > 1 else ""),
            path=path, line=first["_line"], text=first["raw"], expected=layout,
        )
    parts = parts.with_columns(pl.lit(str(path)).alias("_file"))
    parts = checker.check(parts, wrong, reason="malformed_lines", problem="malformed line", field=None,
                          expected=layout, text_col="raw")
    return parts.select(
        "_file", "_line", "raw",
        *[pl.col("_parts").list.get(i).str.strip_chars().alias(name) for i, name in enumerate(names)],
    )


def cast_int(df: pl.DataFrame, col: str, checker: Checker, what: str,
             expected: str = "an integer id") -> pl.DataFrame:
    """Cast a String column to Int64; a value that is not an integer is an error naming its line."""
    casted = pl.col(col).str.strip_chars().cast(pl.Int64, strict=False)
    df = checker.check(df, casted.is_null() & pl.col(col).is_not_null(), reason=f"non_integer_{col}",
                       problem=f"{what} is not an integer", field=col, expected=expected)
    return df.with_columns(casted.alias(col))


def cast_float(df: pl.DataFrame, col: str, checker: Checker, what: str) -> pl.DataFrame:
    casted = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    df = checker.check(df, casted.is_null() & pl.col(col).is_not_null(), reason=f"non_numeric_{col}",
                       problem=f"{what} is not a number", field=col, expected="a number")
    return df.with_columns(casted.alias(col))


def read_csv_records(path: Path, header: list[str] | None, checker: Checker, *, separator: str = ",",
                     required: list[str] = ()) -> pl.DataFrame:
    """Read a delimited file with Polars (all columns as String) and attach `_file` and `_line`.

    `header`: the exact header expected (None: any header; the caller checks its columns). A header that
    looks separated by another delimiter is reported as a wrong delimiter. Blank lines are counted and
    dropped; records with too many fields are located and reported; `required` columns must be non-empty.
    Line numbers are exact unless a quoted field spans lines, in which case rows are numbered as records.
    """
    if not path.exists():
        raise InputError("file not found", path=path)
    data = check_encoding(path, path.read_bytes())
    if not data.strip():
        raise InputError("the file is empty", path=path,
                         expected=separator.join(header) if header else f"a {separator!r}-separated header and rows")
    tail = data.rsplit(b"\n", 1)[-1]
    if tail.strip() and b"\n" in data:  # the last line has no newline: cut off?
        newlines = data.count(b"\n")
        cut_last_line(path, [""] * newlines + [tail.decode("utf-8", errors="replace")], checker)  # raises, or counts
        data = data[: len(data) - len(tail)]
    first = data.split(b"\n", 1)[0].decode("utf-8", errors="replace").rstrip("\r")
    if separator not in first and guess_delimiter_hint(first, separator):
        raise InputError("header is not " + _OTHER_DELIMITERS.get(separator, repr(separator)) + "-separated"
                         + guess_delimiter_hint(first, separator), path=path, line=1, text=first,
                         expected=separator.join(header) if header else f"a {separator!r}-separated header")
    if header is not None and first.split(separator) != header:
        raise InputError("unexpected header", path=path, line=1, text=first, expected=separator.join(header))
    try:
        df = pl.read_csv(io.BytesIO(data), infer_schema=False, has_header=True, separator=separator)
    except pl.exceptions.NoDataError:
        raise InputError("the file has no rows", path=path) from None
    except pl.exceptions.ComputeError as e:
        _locate_ragged(path, separator)
        raise InputError(f"cannot parse as CSV: {str(e).splitlines()[0]}", path=path) from None
    exact_lines = df.height == data.count(b"\n") - 1
    if not exact_lines:
        checker.line_label = "record"
    df = df.with_columns(pl.lit(str(path)).alias("_file"),
                         pl.int_range(2, df.height + 2, dtype=pl.Int64).alias("_line"))
    blank = pl.all_horizontal([pl.col(c).is_null() for c in df.columns if c not in ("_file", "_line")])
    n_blank = int(df.select(blank.sum()).item())
    if n_blank:
        checker.skipped["blank_lines"] = checker.skipped.get("blank_lines", 0) + n_blank
        df = df.filter(~blank)
    for col in required:
        df = checker.check(df, pl.col(col).is_null() | (pl.col(col).str.strip_chars() == ""),
                           reason=f"missing_{col}", problem="missing value (short line?)", field=col,
                           expected=f"{len(df.columns) - 2} {separator!r}-separated fields with '{col}' filled")
    return df


def _locate_ragged(path: Path, separator: str) -> None:
    """Find the first record whose field count differs from the header's (Polars' error does not say), by the line
    it starts on: a quote that is never closed swallows every line after it, so name where it opened."""
    import csv

    with path.open(newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.reader(f, delimiter=separator)
        header = next(reader, [])
        start = reader.line_num + 1
        for row in reader:
            if row and len(row) != len(header):
                if reader.line_num > start and any("\n" in x for x in row):
                    opened = next(x for x in row if "\n" in x)
                    raise InputError(f"a quoted field opens on line {start} and is never closed before line "
                                     f"{reader.line_num} (an unbalanced quote)", path=path, line=start,
                                     text=opened.split("\n", 1)[0], expected="a closing quote on the same line")
                raise InputError(f"malformed line: {len(row)} field(s) where {len(header)} were expected",
                                 path=path, line=start, text=separator.join(row),
                                 expected=f"{len(header)} {separator!r}-separated fields: {separator.join(header)}")
            start = reader.line_num + 1
