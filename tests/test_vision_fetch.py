"""Image bytes from local paths, file:// URIs and HTTP (a loopback http.server in a thread): retries, timeouts,
the per-host concurrency limit and the downloaded-bytes cache."""

from __future__ import annotations

import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vixml_ray.vision.fetch import Fetcher, FetchError, FetchOptions

PAYLOAD = b"\x89PNG fake image bytes"


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    """``/ok/*`` 200; ``/flaky<n>/*`` 503 for the first n hits; ``/slow<ms>/*`` 200 after a delay; else 404."""

    server: _Server

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            hits = server.hits[self.path]
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        try:
            kind = self.path.split("/")[1]
            if kind.startswith("slow"):
                time.sleep(int(kind[4:]) / 1000)
            if kind == "ok" or kind.startswith("slow") or (kind.startswith("flaky") and hits > int(kind[5:])):
                status, body = 200, PAYLOAD
            elif kind.startswith("flaky"):
                status, body = 503, b"busy"
            else:
                status, body = 404, b"no such image"
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        finally:
            with server.lock:
                server.in_flight -= 1


@pytest.fixture()
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def _fetcher(tmp_path: Path, **kwargs) -> Fetcher:
    return Fetcher(FetchOptions(base_uri=str(tmp_path), **kwargs))


def test_retries_transient_errors_then_succeeds(server, tmp_path):
    assert _fetcher(tmp_path, retries=3).fetch(f"{server.base}/flaky2/a.jpg") == PAYLOAD
    assert server.hits["/flaky2/a.jpg"] == 3


def test_gives_up_after_the_retries(server, tmp_path):
    with pytest.raises(FetchError) as err:
        _fetcher(tmp_path, retries=2).fetch(f"{server.base}/flaky9/b.jpg")
    assert err.value.reason == "unreachable"
    assert server.hits["/flaky9/b.jpg"] == 3  # one try and two retries


def test_not_found_is_missing_and_not_retried(server, tmp_path):
    with pytest.raises(FetchError) as err:
        _fetcher(tmp_path, retries=3).fetch(f"{server.base}/gone/c.jpg")
    assert err.value.reason == "missing"
    assert server.hits["/gone/c.jpg"] == 1


def test_timeout(server, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FetchError) as err:
        _fetcher(tmp_path, retries=0, timeout_s=0.2).fetch(f"{server.base}/slow1500/d.jpg")
    assert err.value.reason == "unreachable"
    assert time.perf_counter() - start < 1.2


def test_downloaded_bytes_are_cached(server, tmp_path):
    cache_dir = tmp_path / "downloads"
    url = f"{server.base}/ok/e.jpg"
    assert _fetcher(tmp_path, cache_dir=str(cache_dir)).fetch(url) == PAYLOAD
    assert _fetcher(tmp_path, cache_dir=str(cache_dir)).fetch(url) == PAYLOAD  # a new process-level fetcher
    assert server.hits["/ok/e.jpg"] == 1
    assert [p.read_bytes() for p in cache_dir.rglob("*") if p.is_file()] == [PAYLOAD]


def test_per_host_concurrency_limit(server, tmp_path):
    urls = [f"{server.base}/slow200/{i}.jpg" for i in range(8)]
    fetcher = _fetcher(tmp_path, threads=8, per_host_limit=2)
    start = time.perf_counter()
    assert fetcher.fetch_many(urls) == [PAYLOAD] * 8
    assert server.max_in_flight == 2
    assert time.perf_counter() - start >= 4 * 0.2


def test_local_paths_and_file_uris(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(PAYLOAD)
    fetcher = _fetcher(tmp_path)
    results = fetcher.fetch_many(["images/a.png", str(tmp_path / "images" / "a.png"),
                                  (tmp_path / "images" / "a.png").as_uri(), "images/none.png", "images"])
    assert results[:3] == [PAYLOAD] * 3
    assert [r.reason for r in results[3:]] == ["missing", "io_error"]
