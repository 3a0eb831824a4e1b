"""Fixed-width token arrays and the tiny test models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer

from vixml_ray.model import load_tokens, save_tokens, tokenize
from vixml_ray.model.backbone import resolve_source
from vixml_ray.model.tiny import TOKENIZER_SUBDIR, materialize

TEXTS = ["Pasta sauce", "", "a very long title about cast iron pans and how to season them well", "knife!"] * 5


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return AutoTokenizer.from_pretrained(str(minilm_path))


def test_tokenize_matches_the_tokenizer_text_only_truncated_and_padded(tokenizer):
    arrays = tokenize(tokenizer, TEXTS, max_length=8, chunk_size=3)  # several chunks
    assert arrays.ids.dtype == np.int32 and arrays.ids.shape == (len(TEXTS), 8)
    assert arrays.lengths.dtype == np.int32
    for i, text in enumerate(TEXTS):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"][:8]
        assert arrays.lengths[i] == len(expected)
        assert arrays.ids[i].tolist() == expected + [0] * (8 - len(expected))
    assert tokenizer.cls_token_id not in arrays.ids and tokenizer.sep_token_id not in arrays.ids
    one_chunk = tokenize(tokenizer, iter(TEXTS), max_length=8)  # any iterable
    assert np.array_equal(one_chunk.ids, arrays.ids) and np.array_equal(one_chunk.lengths, arrays.lengths)
    empty = tokenize(tokenizer, [], max_length=8)
    assert empty.ids.shape == (0, 8) and len(empty) == 0


def test_token_arrays_save_load_mmap_and_take(tokenizer, tmp_path):
    arrays = tokenize(tokenizer, TEXTS, max_length=8)
    save_tokens(arrays, tmp_path / "tok", tokenizer_name="minilm")
    with pytest.raises(FileExistsError):
        save_tokens(arrays, tmp_path / "tok")
    loaded = load_tokens(tmp_path / "tok")
    assert isinstance(loaded.ids, np.memmap) and not loaded.ids.flags.writeable
    assert np.array_equal(loaded.ids, arrays.ids) and np.array_equal(loaded.lengths, arrays.lengths)
    part = loaded.take([1, 3])  # "" and "knife!": trimmed to the longer of the two
    assert part.ids.shape == (2, int(arrays.lengths[3])) and part.lengths.tolist() == [0, arrays.lengths[3]]
    with pytest.raises(FileNotFoundError, match="not a token directory"):
        load_tokens(tmp_path)


def test_tokenize_scales_to_many_texts(tokenizer):
    texts = [f"question {i} about boiling eggs and sauces number {i * 7}" for i in range(20_000)]
    arrays = tokenize(tokenizer, texts, max_length=32)
    assert arrays.ids.shape == (20_000, 32) and int(arrays.lengths.min()) > 5


@pytest.mark.parametrize("arch", ["qwen2", "llama", "bert"])
def test_tiny_models_are_deterministic_and_idempotent(tmp_path, tokenizer, arch):
    first = materialize(f"tiny:{arch}", tmp_path / "a")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert materialize(arch, tmp_path / "a") == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten
    second = materialize(f"tiny:{arch}", tmp_path / "b")
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in first.parent.iterdir()] == [arch]  # no staging directory left behind
    config = AutoConfig.from_pretrained(first)
    tiny_tokenizer = AutoTokenizer.from_pretrained(first / TOKENIZER_SUBDIR)
    assert config.hidden_size == 64 and config.num_hidden_layers == 2 and config.vocab_size == len(tiny_tokenizer)
    text = "Pasta sauce"  # the packaged MiniLM WordPiece vocabulary
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    if arch != "bert":
        assert tiny_tokenizer.eos_token == "<|endoftext|>"
        assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id == config.eos_token_id


def test_resolve_source(tmp_path, minilm_path):
    tiny = resolve_source("tiny:bert", tmp_path)
    assert tiny.model == str(tmp_path.absolute() / "tiny" / "bert") and tiny.tokenizer.endswith(TOKENIZER_SUBDIR)
    assert resolve_source("packaged:all-MiniLM-L6-v2", tmp_path).model == str(minilm_path)
    assert resolve_source("Qwen/Qwen2.5-0.5B", tmp_path).model == "Qwen/Qwen2.5-0.5B"
    with pytest.raises(ValueError, match="unknown tiny model"):
        resolve_source("tiny:gpt5", tmp_path)
