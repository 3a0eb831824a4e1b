"""Files on local disk or shared storage (any ``pyarrow.fs`` URI) and immutable, published outputs.

Every stage writes an output directory that readers must never see half-written:

* local paths: the stage writes ``<out>.tmp-<id>/`` beside the target and renames it to ``<out>`` at the end (an
  atomic rename); on failure the temporary directory is removed;
* object stores (no atomic rename): the stage writes ``<out>/versions/<id>/`` fully, then writes the small pointer
  object ``<out>/CURRENT`` last. :func:`resolve` follows the pointer.

Readers call :func:`resolve` on the directory they were given and read from what it returns.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow.fs as pafs

from vixml_ray.errors import MissingPathError, OutputExistsError

CURRENT = "CURRENT"


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the path inside it for a local path or URI."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    return pafs.FileSystem.from_uri(uri)


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], pafs.LocalFileSystem)


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def require(uri: str, what: str) -> str:
    """``uri`` when it exists, else a :class:`~vixml_ray.errors.MissingPathError` naming it as ``what`` (e.g. the
    flag or config key that gave it)."""
    if not exists(uri):
        raise MissingPathError(uri, f"{what}: {uri} does not exist")
    return uri


def read_text(uri: str) -> str:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode("utf-8")


def write_text(uri: str, text: str) -> None:
    """Writes a small text file; on local disk through a temporary file and a rename."""
    fs, path = filesystem(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def resolve(uri: str) -> str:
    """The directory holding a published output's files: the ``CURRENT`` version when there is a pointer."""
    pointer = join(uri, CURRENT)
    if exists(pointer):
        return join(uri, read_text(pointer).strip())
    return uri


def remove(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextlib.contextmanager
def publish(uri: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a staging directory; on clean exit makes it the output at ``uri`` in one step; on error removes it.

    ``overwrite=False`` refuses to replace an existing output (named in the error) before any work starts.
    """
    fs, path = filesystem(uri)
    if exists(uri) and not overwrite:
        raise OutputExistsError(uri)
    version = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
    if isinstance(fs, pafs.LocalFileSystem):
        staging = f"{path.rstrip('/')}.tmp-{version}"
        os.makedirs(staging)
        try:
            yield staging
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if os.path.exists(path):  # replace: move the old output aside, swap, then delete it
            old = f"{path.rstrip('/')}.old-{version}"
            os.rename(path, old)
            os.rename(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(staging, path)
        return
    rel = f"versions/{version}"
    staging = join(uri, rel)
    fs.create_dir(filesystem(staging)[1], recursive=True)
    try:
        yield staging
    except BaseException:
        with contextlib.suppress(Exception):
            remove(staging)
        raise
    write_text(join(uri, CURRENT), rel)
