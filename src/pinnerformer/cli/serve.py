"""`pinnerformer serve`: the online service (FastAPI + uvicorn) over a work directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pinnerformer.cli.common import app, log, run_guarded


@app.command("serve")
def serve(
    workdir: Path = typer.Option(..., "--workdir", help="What the quickstart or the daily job wrote: rank-run/, "
                                 "index/, snapshots/."),
    host: str = typer.Option("127.0.0.1"),
    port: int = typer.Option(8000),
    store: Optional[str] = typer.Option(None, help="redis://HOST:PORT/DB, or an LMDB directory (default: "
                                        "WORKDIR/store, embedded)."),
    token_file: Optional[Path] = typer.Option(None, help="File holding the API token (default: the environment "
                                              "variable PINNERFORMER_API_TOKEN, else WORKDIR/api-token, generated)."),
    batch_max: int = typer.Option(16, help="Ranking requests scored in one forward pass."),
    batch_wait_ms: float = typer.Option(2.0, help="How long a ranking request waits for company."),
    timeout_s: float = typer.Option(5.0, help="A ranking request not answered by then gets 504."),
    watch_seconds: float = typer.Option(0.0, help="Look for a newer snapshot in WORKDIR/snapshots this often and "
                                        "hand over to it (0: only on POST /v1/admin/reload)."),
):
    """Serve events in, recommendations out: POST /v1/events, /v1/rank, /v1/recommend; GET /metrics, /readyz."""

    def body():
        import uvicorn

        from pinnerformer.serving.app import ServiceSettings, create_app
        from pinnerformer.serving.server import build_service, read_token

        settings = ServiceSettings(batch_max=batch_max, batch_wait_ms=batch_wait_ms, timeout_s=timeout_s,
                                   watch_seconds=watch_seconds)
        service = build_service(workdir, store, read_token(workdir, token_file, log), settings, log=log)
        # uvicorn finishes in-flight requests on SIGTERM / Ctrl-C before it exits (at most 30 s)
        uvicorn.run(create_app(service), host=host, port=port, log_level="warning", timeout_graceful_shutdown=30,
                    timeout_keep_alive=75)  # clients keep idle connections open for long (load tools: ~60 s)

    run_guarded(body)
