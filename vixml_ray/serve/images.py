"""Reading a request's images safely: base64 data URIs, http(s) URLs and (only inside ``serve.image_root``) paths.

Every image becomes bytes or a short reason; a refused or failed image masks its slot and the query is still
answered (the reason goes to ``image_errors``). Safe by default:

* bytes are bounded (``serve.max_image_bytes``) before decoding or while downloading, and a download is bounded in
  time (``serve.image_fetch_timeout_s``, connect to last byte);
* URLs whose host resolves to a loopback, private, link-local, multicast or reserved address are refused unless
  ``serve.allow_private_urls`` (server-side request forgery); redirects are not followed (they could lead there);
  the address check and the connection resolve the name separately, so a DNS server that answers differently the
  second time (DNS rebinding) is not covered: keep the service's egress behind a firewall for that;
* local paths and ``pyarrow.fs`` URIs are refused unless ``serve.image_root`` is set, and then must resolve inside
  it: no ``..`` escape, and (on local disk) no symlink leading out.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import posixpath
import socket
import time
from urllib.parse import urlsplit

import requests

from vixml_ray import storage
from vixml_ray.config import ServeConfig

DATA_PREFIX = "data:"
HTTP_SCHEMES = ("http", "https")


class ImageRefused(Exception):
    """An image of a request could not be read; ``reason`` is what ``image_errors`` shows."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def read_image(spec: str, cfg: ServeConfig) -> bytes:
    """The bytes of one image given as a data URI, an http(s) URL or a path/URI inside ``cfg.image_root``."""
    if spec.startswith(DATA_PREFIX):
        return _data_uri(spec, cfg.max_image_bytes)
    scheme = urlsplit(spec).scheme.lower() if "://" in spec else ""
    if scheme in HTTP_SCHEMES:
        return _download(spec, cfg)
    if cfg.image_root is None:
        raise ImageRefused("refused: local paths and storage URIs need serve.image_root")
    return _read_under_root(spec, cfg.image_root, cfg.max_image_bytes)


def _data_uri(spec: str, limit: int) -> bytes:
    header, sep, payload = spec.partition(",")
    if not sep or not header.endswith(";base64"):
        raise ImageRefused("bad data URI: expected data:<type>;base64,<data>")
    if len(payload) * 3 // 4 > limit + 2:
        raise ImageRefused(f"too large: over {limit} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ImageRefused("bad data URI: invalid base64") from None
    if len(data) > limit:
        raise ImageRefused(f"too large: over {limit} bytes")
    return data


def _blocked(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast or ip.is_reserved or ip.is_loopback or ip.is_link_local


def check_url_host(url: str, allow_private: bool) -> None:
    """Raises :class:`ImageRefused` when the URL's host resolves to a non-public address (unless allowed)."""
    host = urlsplit(url).hostname
    if not host:
        raise ImageRefused("bad URL: no host")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as err:
        raise ImageRefused(f"unreachable: cannot resolve {host}: {err}") from None
    if any(_blocked(info[4][0]) for info in infos):
        raise ImageRefused(f"refused: {host} resolves to a private, loopback or link-local address")


def _download(url: str, cfg: ServeConfig) -> bytes:
    check_url_host(url, cfg.allow_private_urls)
    deadline = time.monotonic() + cfg.image_fetch_timeout_s
    try:
        with requests.get(url, stream=True, allow_redirects=False, timeout=cfg.image_fetch_timeout_s) as response:
            if response.is_redirect:
                raise ImageRefused(f"refused: HTTP {response.status_code} redirect not followed")
            if response.status_code in (404, 410):
                raise ImageRefused(f"missing: HTTP {response.status_code}")
            if response.status_code >= 400:
                raise ImageRefused(f"unreachable: HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_content(65536):
                size += len(chunk)
                if size > cfg.max_image_bytes:
                    raise ImageRefused(f"too large: over {cfg.max_image_bytes} bytes")
                if time.monotonic() > deadline:
                    raise ImageRefused(f"unreachable: download over {cfg.image_fetch_timeout_s} s")
                chunks.append(chunk)
            return b"".join(chunks)
    except requests.RequestException as err:
        raise ImageRefused(f"unreachable: {type(err).__name__}") from None


def _read_under_root(spec: str, root: str, limit: int) -> bytes:
    if storage.is_local(root):
        base = os.path.realpath(storage.filesystem(root)[1])
        local = spec[len("file://"):] if spec.startswith("file://") else spec
        if "://" in local:
            raise ImageRefused("refused: not under serve.image_root")
        target = os.path.realpath(os.path.join(base, local))  # follows symlinks: an escaping link is caught
        if os.path.commonpath([base, target]) != base:
            raise ImageRefused("refused: outside serve.image_root")
        uri = target
    else:
        prefix = root.rstrip("/") + "/"
        relative = spec[len(prefix):] if spec.startswith(prefix) else spec
        if "://" in relative or relative.startswith("/"):
            raise ImageRefused("refused: not under serve.image_root")
        if ".." in relative.split("/") or posixpath.normpath(relative).startswith(".."):
            raise ImageRefused("refused: '..' in an image path")
        uri = prefix + relative
    try:
        fs, path = storage.filesystem(uri)
        with fs.open_input_stream(path) as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise ImageRefused("missing") from None
    except (OSError, ValueError):
        raise ImageRefused("io_error") from None
    if len(data) > limit:
        raise ImageRefused(f"too large: over {limit} bytes")
    return data
