"""Put the service together: the work directory's models, the store, the API tokens, the day version.

The read-write token comes from the environment variable PINNERFORMER_API_TOKEN, else from a token file
(`--token-file`), else one is generated into WORKDIR/api-token (mode 0600) and only its path is logged. The optional
read-only token (rank, recommend, read users) comes from PINNERFORMER_API_READ_TOKEN, else `--read-token-file`.
Tokens are never taken from the command line and never logged; one shorter than 16 characters is refused.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from pinnerformer.errors import PinnerformerError
from pinnerformer.serving import engine as eng
from pinnerformer.serving.app import Service, ServiceSettings
from pinnerformer.serving.daily import ensure_day
from pinnerformer.serving.stores import open_store

TOKEN_ENV = "PINNERFORMER_API_TOKEN"
READ_TOKEN_ENV = "PINNERFORMER_API_READ_TOKEN"
MIN_TOKEN_CHARS = 16


def checked_token(token: str, source: str) -> str:
    token = token.strip()
    if len(token) < MIN_TOKEN_CHARS:
        raise PinnerformerError(f"{source}: the token is shorter than {MIN_TOKEN_CHARS} characters")
    return token


def given_token(env: str, token_file: Path | None, flag: str) -> str | None:
    """The token in the environment variable `env`, else in `token_file`; None when neither is given."""
    if os.environ.get(env):
        return checked_token(os.environ[env], env)
    if token_file is None:
        return None
    if not token_file.is_file():
        raise PinnerformerError(f"{flag} {token_file}: no such file")
    return checked_token(token_file.read_text(), f"{flag} {token_file}")


def api_read_token(token_file: Path | None = None) -> str | None:
    """The optional read-only token."""
    return given_token(READ_TOKEN_ENV, token_file, "--read-token-file")


def api_token(workdir: Path, token_file: Path | None, log=print) -> str:
    """The read-write token: given, else WORKDIR/api-token (generated the first time)."""
    token = given_token(TOKEN_ENV, token_file, "--token-file")
    if token is not None:
        return token
    path = workdir / "api-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log(f"no {TOKEN_ENV} and no --token-file: generated an API token into {path} (mode 0600)")
    return checked_token(path.read_text(), str(path))


def build_service(workdir: Path, store_url: str | None = None, token: str | None = None,
                  settings: ServiceSettings | None = None, log=print, read_token: str | None = None) -> Service:
    """`token` / `read_token` not given: from the environment (and WORKDIR/api-token for the read-write one)."""
    workdir = Path(workdir)
    bundle = eng.load_bundle(workdir)
    store = open_store(store_url or str(workdir / "store"))
    store.ping()
    version = ensure_day(bundle, store, workdir, log=log)
    service = Service(bundle, store, token or api_token(workdir, None, log), settings or ServiceSettings(),
                      read_token=read_token or api_read_token())
    service.swap(bundle, version)
    log(f"serving ranker {bundle.version['ranker']}, index {bundle.version['index']}, day version {version}, "
        f"store {store.url}, device {bundle.device}")
    return service
