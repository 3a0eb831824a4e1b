"""The label index: versioned label-embedding sets (and, for retrieval-augmented inference, training-query
embeddings) on storage, FAISS shard actors, exact sharded top-k."""

from vixml_ray.index.sharded import IndexView, SearchResult, ShardedIndex, shard_bounds
from vixml_ray.index.versions import (
    LABELS,
    QUERIES,
    Manifest,
    VersionWriter,
    current_version,
    list_versions,
    read_manifest,
    read_rows,
    set_current,
)

__all__ = [
    "LABELS",
    "QUERIES",
    "IndexView",
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
