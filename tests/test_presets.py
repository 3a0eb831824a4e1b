"""Every preset in vixml_ray/presets loads, validates, holds what its files say and survives a save and reload; the paper
presets are named for their dataset and backbone, the reference ones carry DESIGN.md's hyper-parameters (and those of
the released ViXML run scripts), and every other paper preset differs from its reference only where its name says."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from vixml_ray.config import PRESET_DIR, Config, load_config, save_config

PRESETS = sorted(PRESET_DIR.glob("*.yaml"))
FAMILY_BASE = "paper-amazon.yaml"
REFERENCE_DATASET = "lf-amazontitles-131k"  # the dataset of DESIGN.md's reference hyper-parameters

DATASETS = {  # raw XC folder -> prepared dataset directory
    "data/LF-AmazonTitles-131K": "datasets/lf-amazontitles-131k",
    "data/LF-Amazon-131K": "datasets/lf-amazon-131k",
    "data/LF-AmazonTitles-1.3M": "datasets/lf-amazontitles-1.3m",
    "data/MM-AmazonTitles-300K": "datasets/mm-amazontitles-300k",
}
MINILM = "sentence-transformers/paraphrase-MiniLM-L3-v2"
BACKBONES = {  # the backbone part of a paper preset's name -> the model it trains
    "minilm": MINILM, "distilbert": "sentence-transformers/msmarco-distilbert-base-v4",
    "e5-base": "intfloat/e5-base-v2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct", "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
}
DECODERS = {model for name, model in BACKBONES.items() if name.startswith("qwen")}
ZERO_STAGE = {"0.5B": None, "3B": 2, "7B": 3}  # None = DDP; the 3B reference on ZeRO-2, 7B switches to ZeRO-3
IMAGE_PARTS = {"I1", "I2", "V"}
# what a paper preset may change from its reference (the same backbone on REFERENCE_DATASET), by what its name says
ANOTHER_DATASET = {"out_dir", "data.source", "data.dataset", "train.num_workers", "index.num_shards"}
LONG_TEXTS = {"data.text_fields", "model.max_length", "train.batch_size", "train.lr_backbone", "train.lr_projection"}
TEXT_ONLY = {"out_dir", "model.use_images", "train.epochs", "prompt.sequence"}


def _chain(path: Path) -> list[str]:
    """The preset's file name followed by those of its ``extends`` bases."""
    names = [path.name]
    base = OmegaConf.load(path).get("extends")
    return names + (_chain(path.parent / base) if base else [])


PAPER = [p for p in PRESETS if FAMILY_BASE in _chain(p) and not p.stem.startswith("paper-")]


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value of every field of a config (section); dict-valued fields are leaves."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        out.update(_leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else
                   {f"{prefix}{f.name}": value})
    return out


def _file_values(path: Path) -> dict[str, Any]:
    """Dotted key -> value of every setting the preset file and its ``extends`` bases write (the file wins)."""
    merged: dict[str, Any] = {}
    for name in reversed(_chain(path)):
        raw = OmegaConf.to_container(OmegaConf.load(path.parent / name))
        raw.pop("extends", None)
        merged = OmegaConf.to_container(OmegaConf.merge(merged, raw))
    schema = _leaves(Config())

    def flatten(node: dict[str, Any], prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            nested = isinstance(value, dict) and dotted not in schema  # a section, not a dict-valued field
            out.update(flatten(value, dotted + ".") if nested else {dotted: value})
        return out

    return flatten(merged, "")


def _changed(cfg: Config, other: Config) -> set[str]:
    a, b = _leaves(cfg), _leaves(other)
    return {key for key in a if a[key] != b[key]}


def _backbone(cfg: Config) -> str:
    return next(name for name, model in BACKBONES.items() if model == cfg.model.name_or_path)


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_every_preset_loads_as_written_and_round_trips(path: Path, tmp_path: Path) -> None:
    cfg = load_config(path)  # validates
    leaves = _leaves(cfg)
    written = _file_values(path)
    assert written, path
    wrong = {key: (leaves[key], want) for key, want in written.items() if leaves[key] != want}
    assert not wrong, f"{path.name}: (loaded, written) {wrong}"
    save_config(cfg, tmp_path / "config.yaml")  # what every job saves next to its outputs
    assert load_config(tmp_path / "config.yaml") == cfg


def test_paper_presets_cover_every_dataset_and_backbone() -> None:
    cfgs = [load_config(p) for p in PAPER]
    assert {c.data.source for c in cfgs} == set(DATASETS)
    assert {c.model.name_or_path for c in cfgs} == set(BACKBONES.values())


@pytest.mark.parametrize("path", PAPER, ids=[p.stem for p in PAPER])
def test_paper_preset_shared_settings(path: Path) -> None:
    cfg = load_config(path)
    assert path.stem == f"{Path(cfg.data.dataset).name}-{_backbone(cfg)}" + ("" if cfg.model.use_images else "-text")
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
        stage = next(stage for size, stage in ZERO_STAGE.items() if f"-{size}-" in cfg.model.name_or_path)
        assert (cfg.train.engine, cfg.train.zero_stage if stage else None) == ("deepspeed" if stage else "ddp", stage)
        if not cfg.model.use_images:
            assert not IMAGE_PARTS & set(cfg.prompt.sequence)
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


REFERENCES = [p for p in PAPER if p.stem.startswith(f"{REFERENCE_DATASET}-") and not p.stem.endswith("-text")]
VARIANTS = [p for p in PAPER if p not in REFERENCES]


def test_every_variant_has_its_reference() -> None:
    assert {f"{REFERENCE_DATASET}-{_backbone(load_config(p))}" for p in VARIANTS} <= {p.stem for p in REFERENCES}
    assert {_backbone(load_config(p)) for p in REFERENCES} == set(BACKBONES)


@pytest.mark.parametrize("path", REFERENCES, ids=[p.stem for p in REFERENCES])
def test_reference_presets_carry_the_design_hyper_parameters(path: Path) -> None:
    """DESIGN.md: batch 2048, max length 32, lr 5e-4 for the image projection; Qwen2.5 backbones (LoRA) 5e-5, MiniLM
    (full fine-tune) 5e-4; the larger encoders of the released scripts no faster than MiniLM."""
    cfg = load_config(path)
    train = cfg.train
    assert (train.batch_size, cfg.model.max_length, train.lr_projection) == (2048, 32, 5e-4)
    if cfg.model.name_or_path in DECODERS:
        assert train.lr_backbone == 5e-5
    elif cfg.model.name_or_path == MINILM:
        assert train.lr_backbone == 5e-4
    else:
        assert 0 < train.lr_backbone <= 5e-4


@pytest.mark.parametrize("path", VARIANTS, ids=[p.stem for p in VARIANTS])
def test_variants_change_only_what_their_name_says(path: Path) -> None:
    """Another dataset changes the data and the scale (workers, index shards), LF-Amazon-131K's long texts also the
    text fields, length, batch and learning rates; ``-text`` turns images off (with their prompt parts and, for
    encoders, the doubled epochs). Every other setting is the reference preset's."""
    cfg = load_config(path)
    reference = load_config(f"{REFERENCE_DATASET}-{_backbone(cfg)}")
    changed = _changed(cfg, reference)
    allowed = TEXT_ONLY if path.stem.endswith("-text") else ANOTHER_DATASET
    if cfg.data.source == "data/LF-Amazon-131K":
        allowed = allowed | LONG_TEXTS
    assert changed <= allowed, f"{path.stem}: {sorted(changed - allowed)} differ from {reference.out_dir}"
    assert ("model.use_images" in changed) == path.stem.endswith("-text")
    assert cfg.train.num_workers >= reference.train.num_workers  # more data: no fewer workers
    assert cfg.index.num_shards >= reference.index.num_shards
