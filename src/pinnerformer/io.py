"""Writing files so that a reader never sees half of one: every output is written under a temporary name in the
same directory and renamed into place (a rename is atomic on one file system).

    write_text_atomic / write_json_atomic      small files
    atomic_path(path)                          any writer (Parquet, torch.save, savefig): write to the yielded path
    atomic_dir(path)                           a whole directory, built aside and swapped in
    recover_swap(path)                         put back a directory whose swap was killed between its two renames
    exclusive(path)                            one writer at a time (an advisory file lock, released at exit or death)
    read_json_record(path, what)               a JSON file this program wrote, or a clear error when it is damaged
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from pydantic import BaseModel

from pinnerformer.errors import PinnerformerError


def _temp_name(path: Path) -> Path:
    # ".tmp-<pid>" in the name: .gitignore and readers of a directory never take it for an output
    clean_stale(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove what killed writers of `path` left: its temporary siblings whose process no longer exists."""
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        pid = p.name[len(path.name) + 6:].split(".")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _io_failure(e: Exception, path: Path) -> OSError | None:
    """Writers that wrap an operating-system error in their own (Polars' "(os error 28)", torch's message): the
    OSError it was, so that a full disk reads as one."""
    if isinstance(e, OSError):
        return None
    m = re.search(r"os error (\d+)|\[Errno (\d+)\]|(No space left on device|File too large)", str(e))
    if not m:
        return None
    code = int(m.group(1) or m.group(2)) if (m.group(1) or m.group(2)) else (
        errno.ENOSPC if m.group(3).startswith("No space") else errno.EFBIG)
    return OSError(code, os.strerror(code), str(path))


@contextmanager
def _as_os_errors(path: Path) -> Iterator[None]:
    """Re-raise a writer's wrapped operating-system error as the OSError it was (see `_io_failure`)."""
    try:
        yield
    except Exception as e:
        failure = _io_failure(e, path)
        if failure is None:
            raise
        raise failure from e


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; when the block ends without an error it is renamed to `path`,
    otherwise removed."""
    path = Path(path)
    tmp = _temp_name(path)
    try:
        with _as_os_errors(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, payload: dict | BaseModel) -> None:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def read_json_record(path: str | Path, what: str, remedy: str = "") -> dict:
    """A JSON object this program wrote (a manifest, a run's config or summary), or an error naming the file when
    it cannot be parsed: damaged or truncated (a copy cut short, a disk that filled up before atomic writes)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise PinnerformerError(f"{path}: damaged or truncated {what} (not valid JSON{where})"
                                + (f"; {remedy}" if remedy else "")) from None
    if not isinstance(raw, dict):
        raise PinnerformerError(f"{path}: damaged {what} (a JSON {type(raw).__name__}, where an object was expected)"
                                + (f"; {remedy}" if remedy else ""))
    return raw


def _replaced(path: Path) -> Path:
    return path.with_name(f".{path.name}.replaced")


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary directory beside `path`; when the block ends without an error it becomes `path`.
    An existing `path` is swapped out by two renames (path -> .NAME.replaced, temporary -> path) and then deleted,
    so `path` is always either the old directory or the new one; `recover_swap` repairs a kill between the renames."""
    path = Path(path)
    if path.is_symlink():  # swapping would replace the link, not what it points to, and leave that behind
        raise PinnerformerError(f"{path} is a symbolic link (to {os.readlink(path)}): refusing to replace it; "
                                "give the real path")
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_swap(path)
    tmp = _temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _as_os_errors(path):
            yield tmp
            swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def swap_in(new: Path, path: Path) -> None:
    """Rename directory `new` to `path`, replacing an existing `path` (see `atomic_dir`)."""
    if path.exists():
        old = _replaced(path)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        os.replace(new, path)
        shutil.rmtree(old)
    else:
        os.replace(new, path)


def recover_swap(path: str | Path) -> None:
    """A swap killed between its two renames leaves only `.NAME.replaced`: put it back (or drop it, if the new
    directory made it into place)."""
    path = Path(path)
    old = _replaced(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old)
        else:
            os.replace(old, path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def exclusive(path: str | Path, what: str, wait: bool = True, log=None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a directory or file that exists) while the block runs: a second writer
    waits (wait=True, saying so through `log`) or fails naming `what`. The kernel releases the lock when the
    holder exits or is killed, so a dead writer never blocks the next one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not wait:
                raise PinnerformerError(f"{what} is being written by another process (lock on {path}); "
                                        "wait for it to finish") from None
            if log:
                log(f"{what} is being written by another process: waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """A torch checkpoint written by the training loop, or a clear error for a file that is not one (empty,
    truncated, damaged)."""
    import pickle
    import zipfile

    import torch

    try:
        ck = torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError) as e:
        size = Path(path).stat().st_size
        raise PinnerformerError(f"{path} is not a readable checkpoint ({size:,} bytes; {str(e).splitlines()[0][:120]}): "
                                "it is damaged or was cut off; train again or use another checkpoint") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise PinnerformerError(f"{path} is not a checkpoint written by `pinnerformer train`")
    if "tensors_sha256" in ck and checkpoint_sha256(ck) != ck["tensors_sha256"]:
        raise PinnerformerError(f"{path} is not a readable checkpoint (its weights do not match the hash saved with "
                                "them): it is damaged; train again or use another checkpoint")
    return ck


def checkpoint_sha256(ck: dict) -> str:
    """A hash of a checkpoint's content (every tensor's name, dtype, shape and bytes; every other value's repr):
    saved with it, checked at load — a flipped bit inside a tensor loads without any error otherwise."""
    import torch

    h = hashlib.sha256()

    def walk(prefix: str, x) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(f"{prefix}/{k}", x[k])
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(f"{prefix}/{i}", v)

        else:
            h.update(f"{prefix}={x!r}".encode())

    # the training time it took is not content: a killed and re-run run must hash the same as an uninterrupted one
    walk("", {k: v for k, v in ck.items() if k not in ("tensors_sha256", "train_s")})
    return h.hexdigest()


def portable_path(path: str | Path) -> str:
    """How a report names a file or folder: relative to the working directory when it lies inside it (a report
    written from the repository names the repository's files portably), else by its name alone (the machine's
    absolute path would mean nothing elsewhere; the fingerprint beside it says which data it was)."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path.cwd().resolve()).as_posix() or "."
    except ValueError:
        return p.name
