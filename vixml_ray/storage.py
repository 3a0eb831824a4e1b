"""Files on local disk or shared storage (any ``pyarrow.fs`` URI) and immutable, published outputs.

Every stage writes an output directory that readers must never see half-written:

* local paths: the stage writes ``<out>.tmp-<id>/`` beside the target and renames it to ``<out>`` at the end (an
  atomic rename); on failure the temporary directory is removed;
* object stores (no atomic rename): the stage writes ``<out>/versions/<id>/`` fully, then writes the small pointer
  object ``<out>/CURRENT`` last. :func:`resolve` follows the pointer.

Readers call :func:`resolve` on the directory they were given and read from what it returns. Single files are
published the same way by :func:`atomic_file` (and :func:`write_bytes`, :func:`write_text`, :func:`write_json`,
:func:`write_parquet` on top of it): they appear complete or not at all. This module is the only place that knows how.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

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
    return read_bytes(uri).decode("utf-8")


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


@contextlib.contextmanager
def atomic_file(uri: str) -> Iterator[str]:
    """Yields a LOCAL path to write the file of ``uri`` to; on clean exit the file appears at ``uri`` complete, in
    one step (local disk: the temporary sibling ``<uri>.tmp-<id>`` is renamed; object stores: a local temporary
    file is uploaded in one copy); on error the temporary file is removed and ``uri`` is left as it was."""
    fs, path = filesystem(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    else:
        handle, tmp = tempfile.mkstemp(prefix="vixml-upload-")
        os.close(handle)
    try:
        yield tmp
        if local:
            os.replace(tmp, path)
        else:
            fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
            pafs.copy_files(tmp, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a file that appears complete or not at all (see :func:`atomic_file`)."""
    with atomic_file(uri) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_parquet(uri: str, table: pa.Table, **options: Any) -> None:
    """Writes ``table`` as one parquet file that appears complete or not at all; ``options`` go to
    ``pyarrow.parquet.write_table`` (compression, row_group_size, ...)."""
    with atomic_file(uri) as tmp:
        pq.write_table(table, tmp, **options)


def local_copy(uri: str, target: str) -> str:
    """A local path holding the file or directory at ``uri``: its own path on local disk, else a copy at ``target``
    made once (copied to a temporary sibling and renamed, so an existing ``target`` is a complete copy)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    if os.path.exists(target):
        return target
    os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
    tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pafs.copy_files(path, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        os.rename(tmp, target)
    except OSError:
        if not os.path.exists(target):  # not a lost race with another process copying the same file
            raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
    return target


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
def publish(uri: str, overwrite: bool = False, local: bool = False) -> Iterator[str]:
    """Yields a staging directory; on clean exit makes it the output at ``uri`` in one step; on error removes it.

    ``overwrite=False`` refuses to replace an existing output (named in the error) before any work starts, and
    again at the end when another process published ``uri`` meanwhile (the first one wins). ``local=True`` yields a
    directory on local disk also for an object store (for writers that need local files, e.g. memory maps): it is
    uploaded into the version directory before the pointer is written.
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
            _swap_in(staging, path.rstrip("/"), version, overwrite)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    rel = f"versions/{version}"
    staging = join(uri, rel)
    fs.create_dir(filesystem(staging)[1], recursive=True)
    local_dir = tempfile.mkdtemp(prefix="vixml-publish-") if local else None
    try:
        yield local_dir or staging
        if local_dir is not None:
            pafs.copy_files(local_dir, filesystem(staging)[1], source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
    except BaseException:
        with contextlib.suppress(Exception):
            remove(staging)
        raise
    finally:
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)
    write_text(join(uri, CURRENT), rel)


def _swap_in(staging: str, path: str, version: str, overwrite: bool) -> None:
    """Renames the finished local ``staging`` directory to ``path``; an existing output is replaced only when
    ``overwrite`` (moved aside, swapped, then deleted)."""
    if not os.path.exists(path):
        try:
            os.rename(staging, path)
            return
        except OSError:  # another process published ``path`` since the check
            if not os.path.exists(path):
                raise
    if not overwrite:
        raise FileExistsError(f"output already exists: {path} (published meanwhile by another process)")
    old = f"{path}.old-{version}"
    os.rename(path, old)
    os.rename(staging, path)
    shutil.rmtree(old, ignore_errors=True)
