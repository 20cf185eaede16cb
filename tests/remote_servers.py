"""Real servers on 127.0.0.1 for the remote-storage tests: moto's S3 server (a subprocess) and a small HTTP file
server that can misbehave on cue (500 answers, a connection dropped mid-body).

- `moto_server()`: a context manager yielding the endpoint URL of `python -m moto.server` on a free port; the caller
  points s3fs at it through the usual environment (AWS_ENDPOINT_URL, fake keys: `s3_env`).
- `FaultyHTTPServer(directory)`: serves the files of `directory` (GET with Range, HEAD), in a thread. `faults[name]`
  is a list consumed one per GET of that file: "500" answers 500, "drop" sends the headers and half the body, then
  closes the connection. `gets[name]` counts the GETs each file received.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_env(endpoint: str) -> dict[str, str]:
    """What s3fs (botocore) reads to reach a local S3 server: the endpoint and dummy keys."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """`python -m moto.server` on 127.0.0.1 (a real S3 API over HTTP; bench.netlab starts it); yields its endpoint."""
    from bench.netlab import local_s3

    with local_s3(bucket=None) as (endpoint, _):
        yield endpoint


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FaultyHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        path = self.server.directory / self.path.lstrip("/").split("?")[0]
        return path if path.is_file() else None

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        name = path.name
        with self.server.lock:
            self.server.gets[name] += 1
            pending = self.server.faults.get(name)
            fault = pending.pop(0) if pending else None
        if fault == "500":
            self.send_error(500, "injected")
            return
        data = path.read_bytes()
        status, first = 200, 0
        ranged = self.headers.get("Range")
        if ranged and ranged.startswith("bytes="):
            a, _, b = ranged[len("bytes=") :].partition("-")
            first, last = int(a or 0), int(b) if b else len(data) - 1
            data, status = data[first : last + 1], 206
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {first}-{first + len(data) - 1}/{path.stat().st_size}")
        self.end_headers()
        if fault == "drop":
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(data)


class FaultyHTTPServer(http.server.ThreadingHTTPServer):
    """See the module docstring. `url`: the base URL of the served directory."""

    daemon_threads = True

    def __init__(self, directory: str | os.PathLike):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.directory = Path(directory)
        self.faults: dict[str, list[str]] = {}
        self.gets: dict[str, int] = defaultdict(int)
        self.lock = threading.Lock()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def __enter__(self) -> FaultyHTTPServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
