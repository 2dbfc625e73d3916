"""`pinnerformer serve`: the online service (FastAPI + uvicorn) over a work directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, log, run_guarded
from pinnerformer.errors import PinnerformerError

LOOPBACK = ("127.0.0.1", "::1", "localhost")


@app.command("serve")
def serve(
    workdir: Path = typer.Option(..., "--workdir", help="What the quickstart or the daily job wrote: rank-run/, "
                                 "index/, snapshots/."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on: loopback only unless --allow-remote."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Listen on a non-loopback --host: only behind "
                                      "TLS and an authenticating proxy (the service speaks plain HTTP)."),
    port: int = typer.Option(8000, min=1, max=65535),
    store: Optional[str] = typer.Option(None, help="redis://HOST:PORT/DB, or an LMDB directory (default: "
                                        "WORKDIR/store, embedded)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the API token (default: the environment "
                                              "variable PINNERFORMER_API_TOKEN, else WORKDIR/api-token, generated)."),
    read_token_file: Optional[Path] = typer.Option(None, help="File holding an optional read-only token: rank, "
                                                   "recommend, GET /v1/users/... (default: the environment variable "
                                                   "PINNERFORMER_API_READ_TOKEN, else none)."),
    batch_max: int = typer.Option(16, min=1, help="Ranking requests scored in one forward pass."),
    batch_wait_ms: float = typer.Option(2.0, min=0, help="How long a ranking request waits for company."),
    timeout_s: float = typer.Option(5.0, min=0.001, help="A ranking request not answered by then gets 504."),
    watch_seconds: float = typer.Option(0.0, min=0, help="Look for a newer snapshot in WORKDIR/snapshots this often and "
                                        "hand over to it (0: only on POST /v1/admin/reload)."),
):
    """Serve events in, recommendations out: POST /v1/events, /v1/rank, /v1/recommend; GET /metrics, /readyz."""

    def body():
        import uvicorn

        from pinnerformer.api import create_app
        from pinnerformer.serving.server import api_read_token, api_token

        if host not in LOOPBACK and not allow_remote:
            raise PinnerformerError(f"--host {host} is not a loopback address: the service speaks plain HTTP, so its "
                                    "bearer tokens and users' events would cross the network readable; TLS and an "
                                    "authenticating proxy must sit in front of it. Once they do, pass "
                                    "--allow-remote")
        app = create_app(workdir, store, token=api_token(workdir, token_file, log),
                         read_token=api_read_token(read_token_file), log=log, batch_max=batch_max,
                         batch_wait_ms=batch_wait_ms, timeout_s=timeout_s, watch_seconds=watch_seconds)
        # uvicorn finishes in-flight requests on SIGTERM / Ctrl-C before it exits (at most 30 s)
        uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                    timeout_keep_alive=75)  # clients keep idle connections open for long (load tools: ~60 s)

    run_guarded(body)
