"""The cluster launcher config validates under Ray's own schema and declares its GPUs."""

from __future__ import annotations

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from conftest import ROOT


def _load() -> dict:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_is_valid() -> None:
    config = _load()
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert len(gpu_types) >= 2, "embedding and training GPU node types"
    assert any("[gpu]" in cmd for cmd in config["setup_commands"]), "installs the project with its GPU extra"


def test_validator_rejects_a_typo() -> None:
    config = _load()
    config["available_node_types"]["head"]["resourcez"] = {"CPU": 1}
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(config))
