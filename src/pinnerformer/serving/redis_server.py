"""Start and stop a local Redis for the service, the tests and CI (Debian's `redis-server`; install it with
`apt-get install redis-server`). Configured for durability: an append-only file synced on every write
(`appendfsync always`), so an event acknowledged by the service survives a crash of Redis itself; loopback only.

    python -m pinnerformer.serving.redis_server --dir /var/lib/pinnerformer-redis --port 6390   # runs until killed
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import time
from pathlib import Path

from pinnerformer.errors import PinnerformerError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server process on 127.0.0.1:port keeping its data in `dir` (a restart on the same dir recovers it)."""

    def __init__(self, dir: str | Path, port: int | None = None):
        self.dir, self.port = Path(dir), port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise PinnerformerError("redis-server is not installed (Debian: apt-get install redis-server)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--appendonly", "yes",
             "--appendfsync", "always", "--save", "", "--daemonize", "no", "--logfile", str(self.dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PinnerformerError(f"redis-server exited at start (code {self.proc.returncode}); see "
                                        f"{self.dir / 'redis.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise PinnerformerError(f"redis-server did not answer on port {self.port} within {timeout_s} s")

    def kill(self) -> None:
        """kill -9: what a crash does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True)
    p.add_argument("--port", type=int, default=6390)
    args = p.parse_args()
    server = RedisServer(args.dir, args.port).start()
    print(f"redis at {server.url} (data in {args.dir}); Ctrl-C stops it", flush=True)
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
