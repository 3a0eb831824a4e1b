"""Reading image bytes from local paths, ``pyarrow.fs`` URIs (s3://, gs://, hdfs://, file://) and HTTP(S) URLs.

HTTP goes through one ``requests`` session per process: urllib3 retries transient failures (connection errors,
timeouts, 429 and 5xx, with exponential back-off), every request has a timeout, and each host's
connection pool is blocking with ``per_host_limit`` connections, so no process opens more than that many concurrent
requests to one host. Downloaded bytes are cached on local disk under the SHA-256 of the URL.

Failures raise :class:`FetchError` with a short reason that the embedding job counts:
``missing`` (no such file, HTTP 404/410), ``unreachable`` (network errors, timeouts, other HTTP errors after retries)
and ``io_error`` (permissions, a directory, other filesystem errors).
"""

from __future__ import annotations

import functools
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence, Union
from urllib.parse import urlsplit

import pyarrow.fs as pafs
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from vixml_ray import storage
from vixml_ray.config import Config

HTTP_SCHEMES = ("http", "https")
RETRY_STATUS = (429, 500, 502, 503, 504)
MISSING_STATUS = (404, 410)
BACKOFF_FACTOR = 0.25  # seconds; urllib3 sleeps factor * 2**(n-1) before the n-th consecutive retry


class FetchError(Exception):
    """An image's bytes could not be read; ``reason`` is one of ``missing``, ``unreachable``, ``io_error``."""

    def __init__(self, reason: str, uri: str, detail: str):
        super().__init__(f"{reason}: {uri}: {detail}")
        self.reason = reason
        self.uri = uri


@dataclass(frozen=True)
class FetchOptions:
    """How to read image bytes (hashable: one :class:`Fetcher` per distinct options per process)."""

    base_uri: str  # relative manifest paths are relative to this directory (local path or URI)
    timeout_s: float = 20.0
    retries: int = 3
    per_host_limit: int = 8
    threads: int = 8
    cache_dir: Optional[str] = None  # local directory for downloaded bytes; None = no cache


class Fetcher:
    """Reads image bytes for manifest URIs; holds the HTTP session and the filesystems it opened."""

    def __init__(self, options: FetchOptions):
        self.options = options
        self._session: Optional[requests.Session] = None
        self._filesystems: dict[str, tuple[pafs.FileSystem, str]] = {}

    # ------------------------------------------------------------------------------------------------ public
    def fetch(self, uri: str) -> bytes:
        """The bytes at ``uri`` (an absolute or dataset-relative path, a pyarrow.fs URI or an HTTP(S) URL)."""
        scheme = urlsplit(uri).scheme.lower() if "://" in uri else ""
        if scheme in HTTP_SCHEMES:
            return self._fetch_http(uri)
        return self._fetch_file(uri)

    def fetch_many(self, uris: Sequence[str]) -> list[Union[bytes, FetchError]]:
        """Bytes or the :class:`FetchError` of every URI, in order, read by ``options.threads`` threads."""

        def one(uri: str) -> Union[bytes, FetchError]:
            try:
                return self.fetch(uri)
            except FetchError as err:
                return err

        if self.options.threads <= 1 or len(uris) <= 1:
            return [one(u) for u in uris]
        with ThreadPoolExecutor(max_workers=min(self.options.threads, len(uris))) as pool:
            return list(pool.map(one, uris))

    # ------------------------------------------------------------------------------------------------ files
    def _resolve(self, uri: str) -> str:
        if "://" in uri or os.path.isabs(uri):
            return uri
        return storage.join(self.options.base_uri, uri)

    def _filesystem(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The filesystem and in-filesystem path of a resolved URI; one filesystem per scheme and authority."""
        if "://" not in uri:
            return pafs.LocalFileSystem(), uri
        parts = urlsplit(uri)
        key = f"{parts.scheme}://{parts.netloc}"
        cached = self._filesystems.get(key)
        if cached is None:
            fs, path = pafs.FileSystem.from_uri(uri)
            if path.endswith(parts.path):  # remember what goes before the URI's path (e.g. the bucket)
                self._filesystems[key] = (fs, path[: len(path) - len(parts.path)])
            return fs, path
        fs, prefix = cached
        return fs, prefix + parts.path

    def _fetch_file(self, uri: str) -> bytes:
        full = self._resolve(uri)
        try:
            fs, path = self._filesystem(full)
            with fs.open_input_stream(path) as f:
                return f.read()
        except FileNotFoundError as err:
            raise FetchError("missing", full, str(err)) from None
        except (OSError, ValueError) as err:  # permissions, directories, bad URIs, transport errors
            raise FetchError("io_error", full, str(err)) from None

    # ------------------------------------------------------------------------------------------------- HTTP
    def _http(self) -> requests.Session:
        if self._session is None:
            retry = Retry(
                total=self.options.retries,
                backoff_factor=BACKOFF_FACTOR,
                status_forcelist=RETRY_STATUS,
                allowed_methods=frozenset({"GET"}),
                raise_on_status=False,
                respect_retry_after_header=False,  # exponential back-off only: a long Retry-After would stall
            )
            adapter = HTTPAdapter(
                pool_connections=64,  # hosts whose pools are kept
                pool_maxsize=self.options.per_host_limit,
                pool_block=True,  # wait for a free connection: at most per_host_limit requests per host
                max_retries=retry,
            )
            session = requests.Session()
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            self._session = session
        return self._session

    def _cache_path(self, url: str) -> Optional[str]:
        if self.options.cache_dir is None:
            return None
        key = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return os.path.join(self.options.cache_dir, key[:2], key)

    def _fetch_http(self, url: str) -> bytes:
        cached = self._cache_path(url)
        if cached is not None and os.path.exists(cached):
            with open(cached, "rb") as f:
                return f.read()
        try:
            response = self._http().get(url, timeout=self.options.timeout_s)
            data = response.content
        except (requests.RequestException, ValueError) as err:  # network errors, timeouts, malformed URLs
            raise FetchError("unreachable", url, f"{type(err).__name__}: {err}") from None
        if response.status_code in MISSING_STATUS:
            raise FetchError("missing", url, f"HTTP {response.status_code}")
        if response.status_code >= 400:
            raise FetchError("unreachable", url, f"HTTP {response.status_code} after {self.options.retries} retries")
        if cached is not None and data:
            storage.write_bytes(cached, data)
        return data


def fetch_options(cfg: Config, base_uri: str) -> FetchOptions:
    """How a job reads the images of ``cfg.vision``, relative paths against ``base_uri``; downloaded bytes are
    cached in ``vision.download_cache`` (default ``<cache_dir>/downloads``)."""
    v = cfg.vision
    cache_dir = v.download_cache or os.path.join(cfg.cache_dir, "downloads")
    return FetchOptions(base_uri=base_uri, timeout_s=v.http_timeout_s, retries=v.http_retries,
                        per_host_limit=v.http_per_host_limit, threads=v.fetch_threads,
                        cache_dir=os.path.abspath(os.path.expanduser(cache_dir)))


@functools.lru_cache(maxsize=8)
def fetcher(options: FetchOptions) -> Fetcher:
    """The process-wide :class:`Fetcher` for ``options`` (sessions and connections are reused across tasks)."""
    return Fetcher(options)
