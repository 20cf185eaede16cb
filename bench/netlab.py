"""A throttling TCP proxy for network experiments on one machine: `Throttle(target_port, rate)` listens on a free
port of 127.0.0.1 and forwards every connection to `target_port`, the bytes flowing back to the client limited to
`rate` bytes/s in total (one token bucket shared by all connections, as one NIC's share would be), plus an optional
fixed `latency` before each connection's first byte.

Used by bench/bench_remote.py (a local S3 server at a fixed bandwidth) and by the tests of a publish killed
mid-way (slow enough to be stopped between two objects).

    python -m bench.netlab TARGET_PORT RATE_MB_S   # serves until interrupted; prints its port
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

BUFFER = 64 << 10


class TokenBucket:
    """`rate` bytes/s, bursts of at most `burst` bytes; `take(n)` sleeps until n bytes may pass."""

    def __init__(self, rate: float, burst: int = BUFFER):
        self.rate, self.burst = float(rate), burst
        self.tokens, self.stamp = float(burst), time.monotonic()
        self.lock = threading.Lock()

    def take(self, n: int) -> None:
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
                self.stamp = now
                if self.tokens >= n:
                    self.tokens -= n
                    return
                wait = (n - self.tokens) / self.rate
            time.sleep(wait)


class Throttle:
    """See the module docstring. `port`: where clients connect. Use as a context manager (or start/stop)."""

    def __init__(self, target_port: int, rate: float | None, latency: float = 0.0, upload_rate: float | None = None):
        self.target_port, self.latency = target_port, latency
        self.down = TokenBucket(rate, min(BUFFER, int(rate))) if rate else None
        self.up = TokenBucket(upload_rate, min(BUFFER, int(upload_rate))) if upload_rate else None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.bytes_down = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def start(self) -> Throttle:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self.listener.close()

    __enter__ = start

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            client.close()
            return
        if self.latency:
            time.sleep(self.latency)
        threading.Thread(target=self._pump, args=(client, server, self.up, False), daemon=True).start()
        self._pump(server, client, self.down, True)

    def _pump(self, src: socket.socket, dst: socket.socket, bucket: TokenBucket | None, down: bool) -> None:
        try:
            while True:
                data = src.recv(BUFFER if bucket is None else min(BUFFER, max(1024, int(bucket.rate / 20))))
                if not data:
                    break
                if bucket is not None:
                    bucket.take(len(data))
                dst.sendall(data)
                if down:
                    self.bytes_down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()


@contextlib.contextmanager
def local_s3(bucket: str | None = "bench") -> Iterator[tuple[str, dict[str, str]]]:
    """moto's S3 server (`python -m moto.server`, the `moto[server]` test dependency) on a free port of 127.0.0.1
    with `bucket` made (None: none); yields (endpoint URL, the environment that points s3fs at it). The tests'
    server too (tests/remote_servers.py)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on port {port}") from None
                time.sleep(0.1)
        if bucket:
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/{bucket}", method="PUT"), timeout=10).close()
        yield endpoint, env
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.netlab", description=__doc__.split("\n\n")[0])
    p.add_argument("target_port", type=int)
    p.add_argument("rate_mb_s", type=float, help="download bandwidth, MB/s (1e6 bytes)")
    p.add_argument("--latency-ms", type=float, default=0.0)
    args = p.parse_args()
    with Throttle(args.target_port, args.rate_mb_s * 1e6, args.latency_ms / 1000) as proxy:
        print(f"127.0.0.1:{proxy.port} -> 127.0.0.1:{args.target_port} at {args.rate_mb_s} MB/s", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
