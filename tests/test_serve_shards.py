"""A shard replica (vixml_ray.serve.shards, run here as a plain object) serves the version each call names, loads a
new one before the switch, releases the old one once idle after the switch, and reloads a released one if a late
call still names it."""

from __future__ import annotations

import numpy as np
import pytest

from vixml_ray.config import IndexConfig
from vixml_ray.index import VersionWriter
from vixml_ray.serve import shards
from vixml_ray.serve.shards import ShardReplica


def write(index_dir: str, vectors: np.ndarray) -> str:
    writer = VersionWriter(index_dir)
    path = writer.new_version()
    writer.write_shard(path, 0, np.arange(len(vectors)), vectors)
    return writer.commit(path).version


def test_versions_are_loaded_switched_and_released(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    v1 = rng.standard_normal((10, 4)).astype(np.float32)
    index_dir = str(tmp_path / "index")
    write(index_dir, v1)
    write(index_dir, -v1)
    replica = ShardReplica(index_dir, 1, 2, ("labels",), IndexConfig(num_shards=2), "v1")  # rows 5..9
    query = v1[7:8]
    scores, ids, version = replica.search("v1", query, 1)
    assert (ids.tolist(), version) == ([[7]], "v1")
    assert replica.prepare("v2")["ntotal"] == 5 and replica.versions() == ["v1", "v2"]
    monkeypatch.setattr(shards, "RELEASE_IDLE_S", 0.0)
    _, ids2, version2 = replica.search("v2", query, 1)  # the switch: v1 is idle and older, so released
    assert version2 == "v2" and ids2.tolist() != [[7]] and replica.versions() == ["v2"]
    late = replica.search("v1", query, 1)  # a late call for the old version reloads it: answered, not failed
    assert late[1].tolist() == [[7]] and late[2] == "v1"
    replica.search("v2", query, 1)  # v2 stays the live version: the reloaded v1 goes again, v2 stays
    assert replica.versions() == ["v2"]
    with pytest.raises(ValueError, match="outside this shard"):
        replica.pair_scores("v2", query, np.array([0]), np.array([2]))
