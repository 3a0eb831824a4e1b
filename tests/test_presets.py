"""Every preset in vixml_ray/presets loads and validates; the paper presets carry the paper's settings (DESIGN.md and the
released ViXML run scripts)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
import yaml

from vixml_ray.config import PRESET_DIR, Config, load_config

PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
FAMILY_BASE = "paper-amazon.yaml"

DATASETS = {  # raw XC folder -> prepared dataset directory
    "data/LF-AmazonTitles-131K": "datasets/lf-amazontitles-131k",
    "data/LF-Amazon-131K": "datasets/lf-amazon-131k",
    "data/LF-AmazonTitles-1.3M": "datasets/lf-amazontitles-1.3m",
    "data/MM-AmazonTitles-300K": "datasets/mm-amazontitles-300k",
}
ENCODERS = {"sentence-transformers/paraphrase-MiniLM-L3-v2", "sentence-transformers/msmarco-distilbert-base-v4",
            "intfloat/e5-base-v2"}
DECODERS = {"Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-3B-Instruct", "Qwen/Qwen2.5-7B-Instruct"}
MINILM = "sentence-transformers/paraphrase-MiniLM-L3-v2"


def _chain(path: Path) -> list[str]:
    """The preset's file name followed by those of its ``extends`` bases."""
    names = [path.name]
    base = yaml.safe_load(path.read_text()).get("extends")
    return names + (_chain(path.parent / base) if base else [])


PAPER = [p for p in PRESETS if FAMILY_BASE in _chain(p) and not p.stem.startswith("paper-")]


def _get(cfg: Config, dotted: str) -> Any:
    return functools.reduce(getattr, dotted.split("."), cfg)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_paper_presets_cover_every_dataset_and_backbone() -> None:
    cfgs = [load_config(p) for p in PAPER]
    assert {c.data.source for c in cfgs} == set(DATASETS)
    assert {c.model.name_or_path for c in cfgs} == ENCODERS | DECODERS


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_preset_shared_settings(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.out_dir == f"outputs/{path.stem}"  # one output directory per preset
    assert DATASETS[cfg.data.source] == cfg.data.dataset
    assert (cfg.eval.propensity_a, cfg.eval.propensity_b) == (0.6, 2.6)  # Amazon
    assert (cfg.eval.k, cfg.eval.topk) == (5, 100)
    assert cfg.train.use_gpu and cfg.index.use_gpu and cfg.vision.num_gpus_per_actor == 1
    assert (cfg.vision.backend, cfg.vision.model_name) == ("hf_siglip", "google/siglip2-so400m-patch14-384")
    assert (cfg.train.warmup_steps, cfg.train.clip_grad_norm, cfg.train.adam_eps, cfg.train.weight_decay) == (
        100, 1.0, 1e-6, 0.01)
    assert (cfg.train.num_negatives, cfg.train.margin_min, cfg.train.margin_max) == (10, 0.1, 0.3)
    schedule = (cfg.train.cluster.start_epoch, cfg.train.cluster.refresh_every, cfg.train.cluster.double_at)
    if cfg.model.name_or_path in DECODERS:
        assert cfg.model.kind == "decoder" and cfg.model.dtype == "bfloat16" and cfg.model.gradient_checkpointing
        lora = cfg.model.lora
        assert (lora.enabled, lora.r, lora.alpha, lora.use_rslora, lora.target_modules) == (
            True, 256, 256, True, ["all-linear"])
        assert cfg.train.epochs == 30
        assert schedule == (4, 2, [8, 12, 16, 20, 24])
        assert cfg.train.engine == ("ddp" if "0.5B" in cfg.model.name_or_path else "deepspeed")
    else:
        assert cfg.model.kind == "encoder" and cfg.model.dtype == "float32" and not cfg.model.lora.enabled
        assert cfg.train.epochs == (150 if cfg.model.use_images else 300)
        assert schedule == (10, 5, [20, 40, 60, 80, 100, 120])
    if cfg.data.source == "data/LF-Amazon-131K":  # longer texts: max length 128, smaller batch and learning rates
        family = load_config(_chain(path)[1])
        assert cfg.data.text_fields == ["title", "content"] and cfg.model.max_length == 128
        assert cfg.train.batch_size < family.train.batch_size
        assert cfg.train.lr_backbone < family.train.lr_backbone
    else:
        assert cfg.data.text_fields == ["title"] and cfg.model.max_length == 32


EXPECTED: dict[str, dict[str, Any]] = {
    "lf-amazontitles-131k-minilm": {
        "model.name_or_path": MINILM, "model.use_images": True, "model.num_images": 3, "train.epochs": 150,
        "train.lr_backbone": 5e-4, "train.lr_projection": 5e-4, "train.batch_size": 2048, "train.engine": "ddp"},
    "lf-amazontitles-131k-minilm-text": {"model.use_images": False, "train.epochs": 300},
    "lf-amazontitles-131k-distilbert": {
        "model.name_or_path": "sentence-transformers/msmarco-distilbert-base-v4", "train.num_workers": 4},
    "lf-amazontitles-131k-e5-base": {"model.name_or_path": "intfloat/e5-base-v2", "train.batch_size": 2048},
    "lf-amazontitles-131k-qwen2.5-0.5b": {
        "model.name_or_path": "Qwen/Qwen2.5-0.5B-Instruct", "train.engine": "ddp", "train.num_workers": 8},
    "lf-amazontitles-131k-qwen2.5-3b": {
        "model.name_or_path": "Qwen/Qwen2.5-3B-Instruct", "train.engine": "deepspeed", "train.zero_stage": 2,
        "train.num_workers": 8, "train.batch_size": 2048, "train.lr_backbone": 5e-5, "train.lr_projection": 5e-4,
        "model.max_length": 32, "model.pooling": "mean", "model.use_images": True,
        "prompt.sequence": ["T1", "E", "I2", "V", "EOS"], "prompt.t1": "This product text",
        "prompt.i2": "and its image"},
    "lf-amazontitles-131k-qwen2.5-3b-text": {"model.use_images": False, "prompt.sequence": ["T1", "E", "EOS"]},
    "lf-amazontitles-131k-qwen2.5-7b": {
        "model.name_or_path": "Qwen/Qwen2.5-7B-Instruct", "train.zero_stage": 3, "train.num_workers": 16},
    "lf-amazon-131k-minilm": {"train.batch_size": 1024, "train.lr_backbone": 2e-4, "train.lr_projection": 2e-4},
    "lf-amazon-131k-qwen2.5-3b": {"train.batch_size": 512, "train.lr_backbone": 2e-5, "train.lr_projection": 2e-4},
    "lf-amazontitles-1.3m-minilm": {"train.num_workers": 4, "index.num_shards": 8},
    "lf-amazontitles-1.3m-qwen2.5-3b": {"train.zero_stage": 2, "train.num_workers": 16, "index.num_shards": 8},
    "lf-amazontitles-1.3m-qwen2.5-7b": {"train.zero_stage": 3, "train.num_workers": 32, "index.num_shards": 8},
    "mm-amazontitles-300k-minilm": {"model.name_or_path": MINILM, "model.use_images": True},
    "mm-amazontitles-300k-qwen2.5-3b": {"model.name_or_path": "Qwen/Qwen2.5-3B-Instruct", "train.zero_stage": 2},
}


def test_expected_table_names_every_paper_preset() -> None:
    assert set(EXPECTED) == {p.stem for p in PAPER}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_paper_preset_key_values(name: str) -> None:
    cfg = load_config(name)
    wrong = {key: (_get(cfg, key), want) for key, want in EXPECTED[name].items() if _get(cfg, key) != want}
    assert not wrong, f"{name}: (got, want) {wrong}"
