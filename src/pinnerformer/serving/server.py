"""Put the service together: the work directory's models, the store, the API token, the day version.

The token comes from the environment variable PINNERFORMER_API_TOKEN, else from a token file (`--token-file`),
else one is generated into WORKDIR/api-token (mode 0600) and only its path is logged; never from the command line,
and it is never logged.
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


def read_token(workdir: Path, token_file: Path | None, log=print) -> str:
    if os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip()
    if token_file is not None:
        if not token_file.is_file():
            raise PinnerformerError(f"--token-file {token_file}: no such file")
        token = token_file.read_text().strip()
        if len(token) < 16:
            raise PinnerformerError(f"--token-file {token_file}: the token is shorter than 16 characters")
        return token
    path = workdir / "api-token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        log(f"no {TOKEN_ENV} and no --token-file: generated an API token into {path} (mode 0600)")
    return path.read_text().strip()


def build_service(workdir: Path, store_url: str | None = None, token: str | None = None,
                  settings: ServiceSettings | None = None, log=print) -> Service:
    workdir = Path(workdir)
    bundle = eng.load_bundle(workdir)
    store = open_store(store_url or str(workdir / "store"))
    store.ping()
    version = ensure_day(bundle, store, workdir, log=log)
    service = Service(bundle, store, token or read_token(workdir, None, log), settings or ServiceSettings())
    service.swap(bundle, version)
    log(f"serving ranker {bundle.version['ranker']}, index {bundle.version['index']}, day version {version}, "
        f"store {store.url}, device {bundle.device}")
    return service
