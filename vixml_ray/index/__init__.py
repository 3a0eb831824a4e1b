"""The label index: versioned label-embedding sets on storage, FAISS shard actors, exact sharded top-k."""

from vixml_ray.index.sharded import SearchResult, ShardedIndex, shard_bounds
from vixml_ray.index.versions import (
    Manifest,
    VersionWriter,
    current_version,
    list_versions,
    read_manifest,
    read_rows,
    set_current,
)

__all__ = [
    "Manifest",
    "SearchResult",
    "ShardedIndex",
    "VersionWriter",
    "current_version",
    "list_versions",
    "read_manifest",
    "read_rows",
    "set_current",
    "shard_bounds",
]
