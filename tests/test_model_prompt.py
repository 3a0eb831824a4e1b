"""Prompt templates: every sequence of the paper's ablation, checked token by token against a plain per-item reference."""

from __future__ import annotations

import pytest
import torch

from vixml_ray.config import load_config
from vixml_ray.errors import ConfigError
from vixml_ray.model import build_embedder, tokenize
from vixml_ray.model.prompt import CONST, IMAGE_KIND, PAD_KIND, TEXT_KIND

IMAGE_DIM = 8
MAX_LENGTH = 6
TEXTS = ["pasta sauce", "a very long title about cast iron pans and how to season them well", "", "knife"]
IMAGE_MASK = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], dtype=torch.bool)
ABLATIONS = [
    ["E"], ["T1", "E"], ["T1", "E", "EOS"], ["V", "E", "EOS"], ["E", "V", "EOS"],
    ["I1", "V", "T2", "E", "EOS"], ["T1", "E", "I2", "V", "EOS"],
]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vixml-cache"))


def make_embedder(cache_dir: str, name: str, *overrides: str):
    cfg = load_config(None, [f"model.name_or_path={name}", f"cache_dir={cache_dir}", "model.use_images=true",
                             f"model.max_length={MAX_LENGTH}", *overrides])
    torch.manual_seed(0)
    return build_embedder(cfg, IMAGE_DIM).eval()


def batch(embedder):
    tokens = tokenize(embedder.tokenizer, TEXTS, MAX_LENGTH)
    feats = torch.randn(len(TEXTS), 3, IMAGE_DIM, generator=torch.Generator().manual_seed(1))
    return torch.as_tensor(tokens.ids).long(), torch.as_tensor(tokens.lengths).long(), feats


def reference_items(embedder, parts: list[str]) -> list[list[tuple[str, int]]]:
    """Per item, a plain list of ('tok', id) / ('img', slot) entries, written without any index arithmetic."""
    tok = embedder.tokenizer
    strings = {"T1": embedder.cfg.prompt.t1, "T2": embedder.cfg.prompt.t2,
               "I1": embedder.cfg.prompt.i1, "I2": embedder.cfg.prompt.i2}
    items = []
    for i, text in enumerate(TEXTS):
        seq = []
        for part in parts:
            if part in strings:
                seq += [("tok", t) for t in tok(strings[part], add_special_tokens=False)["input_ids"]]
            elif part == "EOS":
                seq.append(("tok", tok.eos_token_id))
            elif part == "CLS":
                seq.append(("tok", tok.cls_token_id))
            elif part == "SEP":
                seq.append(("tok", tok.sep_token_id))
            elif part == "E":
                seq += [("tok", t) for t in tok(text, add_special_tokens=False)["input_ids"][:MAX_LENGTH]]
            elif part == "V":
                seq += [("img", s) for s in range(3) if IMAGE_MASK[i, s]]
        items.append(seq)
    return items


def check_against_reference(embedder, parts: list[str]) -> None:
    text_ids, lengths, feats = batch(embedder)
    embeds, layout = embedder.assemble(text_ids, lengths, feats, IMAGE_MASK)
    items = reference_items(embedder, parts)
    width = max(len(seq) for seq in items)
    assert embeds.shape == (len(TEXTS), width, embedder.hidden_size)
    table = embedder.backbone.get_input_embeddings().weight
    mask = layout.attention_mask
    for b, seq in enumerate(items):
        assert int(layout.lengths[b]) == len(seq)
        assert mask[b].tolist() == [1] * len(seq) + [0] * (width - len(seq))
        assert layout.kind[b, len(seq):].eq(PAD_KIND).all()
        for t, (what, value) in enumerate(seq):
            if what == "tok":
                assert int(layout.token_ids[b, t]) == value, (b, t)
                assert int(layout.kind[b, t]) in (CONST, TEXT_KIND)
                assert torch.equal(embeds[b, t], table[value])
            else:
                assert int(layout.kind[b, t]) == IMAGE_KIND and int(layout.image_slot[b, t]) == value, (b, t)
                assert torch.allclose(embeds[b, t], embedder.projection(feats[b, value]), atol=1e-6)


@pytest.mark.parametrize("parts", ABLATIONS, ids=["+".join(p) for p in ABLATIONS])
def test_decoder_ablation_sequences_match_reference(cache_dir, parts):
    images = "V" in parts  # a text-only sequence comes with a text-only model
    embedder = make_embedder(cache_dir, "tiny:qwen2", f"prompt.sequence=[{','.join(parts)}]",
                             f"model.use_images={str(images).lower()}")
    assert embedder.kind == "decoder" and embedder.template.names == parts
    check_against_reference(embedder, parts)


def test_default_decoder_prompt_is_the_papers(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:llama")
    assert embedder.template.names == ["T1", "E", "I2", "V", "EOS"]
    assert embedder.cfg.prompt.t1 == "This product text" and embedder.cfg.prompt.i2 == "and its image"
    check_against_reference(embedder, ["T1", "E", "I2", "V", "EOS"])


def test_encoder_puts_images_first_then_cls_text_sep(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:bert", "prompt.sequence=[E,EOS]")  # encoders ignore the sequence
    assert embedder.kind == "encoder"
    check_against_reference(embedder, ["V", "CLS", "E", "SEP"])


def test_pad_token_equal_to_eos_keeps_the_prompt_eos(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:qwen2", "prompt.sequence=[T1,E,EOS]", "model.pooling=last",
                             "model.use_images=false")
    tok = embedder.tokenizer
    assert tok.pad_token_id == tok.eos_token_id is not None
    text_ids, lengths, _ = batch(embedder)
    _, layout = embedder.assemble(text_ids, lengths)
    last = layout.lengths - 1
    rows = torch.arange(len(TEXTS))
    assert layout.token_ids[rows, last].eq(tok.pad_token_id).all()  # an id-based mask would drop these
    assert layout.attention_mask[rows, last].eq(1).all()
    # last-token pooling reads the EOS position: the same as running the unpadded sequence alone
    out = embedder(text_ids, lengths)
    for b in range(len(TEXTS)):
        ids = layout.token_ids[b, : layout.lengths[b]][None]
        hidden = embedder.backbone(input_ids=ids, use_cache=False).last_hidden_state[0, -1]
        assert torch.allclose(out[b], torch.nn.functional.normalize(hidden, dim=0), atol=1e-5)


def test_without_images_v_is_empty(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:qwen2")
    text_ids, lengths, feats = batch(embedder)
    _, with_none = embedder.assemble(text_ids, lengths, None, None)
    assert not with_none.kind.eq(IMAGE_KIND).any()
    text_only = make_embedder(cache_dir, "tiny:qwen2", "model.use_images=false")
    assert text_only.projection is None
    _, ignored = text_only.assemble(text_ids, lengths, feats, IMAGE_MASK)
    assert torch.equal(ignored.token_ids, with_none.token_ids) and torch.equal(ignored.lengths, with_none.lengths)


def test_num_images_limits_the_slots(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:qwen2", "model.num_images=1")
    text_ids, lengths, feats = batch(embedder)
    _, layout = embedder.assemble(text_ids, lengths, feats, IMAGE_MASK)
    assert layout.kind.eq(IMAGE_KIND).sum(1).tolist() == IMAGE_MASK[:, :1].sum(1).tolist()


def test_images_without_v_part_is_a_config_error(cache_dir):
    with pytest.raises(ConfigError, match="has no 'V'"):
        make_embedder(cache_dir, "tiny:qwen2", "prompt.sequence=[T1,E,EOS]")
