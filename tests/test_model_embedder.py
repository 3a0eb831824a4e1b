"""The embedder: masking, padding invariance, LoRA under gradient checkpointing, export, optimiser groups, MiniLM."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, LlamaConfig, Qwen2Config, ViTConfig

from vixml_ray.config import load_config
from vixml_ray.errors import ConfigError
from vixml_ray.model import array_images, build_embedder, embed_arrays, load_export, tokenize
from vixml_ray.model.backbone import detect_kind

IMAGE_DIM = 8
TEXTS = ["pasta sauce", "a very long title about cast iron pans and how to season them well", "knife", "salt",
         "how long to boil an egg"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("vixml-cache"))


def make_embedder(cache_dir: str, name: str, *overrides: str, image_dim: int | None = IMAGE_DIM):
    cfg = load_config(None, [f"model.name_or_path={name}", f"cache_dir={cache_dir}", "model.use_images=true",
                             "model.max_length=16", *overrides])
    torch.manual_seed(0)
    return build_embedder(cfg, image_dim).eval()


def inputs(embedder, texts=TEXTS, seed: int = 1):
    tokens = tokenize(embedder.tokenizer, texts, embedder.cfg.model.max_length)
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(texts), 3, IMAGE_DIM, generator=gen)
    mask = torch.rand(len(texts), 3, generator=gen) < 0.6
    return torch.as_tensor(tokens.ids).long(), torch.as_tensor(tokens.lengths).long(), feats, mask


def perturb_trainable(embedder, seed: int = 2) -> None:
    """Random non-zero values in every trainable tensor (LoRA B starts at zero, so an untrained adapter is a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in embedder.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


CASES = [("tiny:qwen2", "mean"), ("tiny:qwen2", "last"), ("tiny:llama", "mean"), ("tiny:bert", "mean")]


@pytest.mark.parametrize("name,pooling", CASES)
def test_masked_image_slots_do_not_change_the_embedding(cache_dir, name, pooling):
    embedder = make_embedder(cache_dir, name, f"model.pooling={pooling}")
    text_ids, lengths, feats, mask = inputs(embedder)
    assert (~mask).any()
    before = embedder(text_ids, lengths, feats, mask)
    changed = feats.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), IMAGE_DIM) * 100
    assert torch.equal(before, embedder(text_ids, lengths, changed, mask))
    changed[~mask] = float("nan")
    assert torch.equal(before, embedder(text_ids, lengths, changed, mask))
    # and the valid slots do matter
    changed[mask] += 1.0
    assert not torch.allclose(before, embedder(text_ids, lengths, changed, mask))


@pytest.mark.parametrize("name,pooling", CASES)
def test_embedding_does_not_depend_on_the_batch(cache_dir, name, pooling):
    embedder = make_embedder(cache_dir, name, f"model.pooling={pooling}")
    text_ids, lengths, feats, mask = inputs(embedder)
    together = embedder(text_ids, lengths, feats, mask)
    for b in range(len(TEXTS)):
        alone = embedder(text_ids[b:b + 1, : max(int(lengths[b]), 1)], lengths[b:b + 1], feats[b:b + 1],
                         mask[b:b + 1])
        torch.testing.assert_close(alone[0], together[b], atol=1e-5, rtol=0)
    torch.testing.assert_close(together.norm(dim=1), torch.ones(len(TEXTS)))


def trainable_grads(embedder, checkpointing: bool) -> dict[str, torch.Tensor]:
    embedder.train()
    embedder.zero_grad()
    text_ids, lengths, _, _ = inputs(embedder)  # text only: nothing entering the backbone requires grad
    out = embedder(text_ids, lengths)
    (out @ torch.randn(out.shape[1], generator=torch.Generator().manual_seed(3))).sum().backward()
    assert embedder.backbone.is_activation_checkpointing == checkpointing
    return {n: p.grad.clone() for n, p in embedder.named_parameters() if p.requires_grad and p.grad is not None}


def test_lora_gets_gradients_under_gradient_checkpointing(cache_dir):
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.use_images=false"]
    plain = make_embedder(cache_dir, "tiny:qwen2", *lora)
    checkpointed = make_embedder(cache_dir, "tiny:qwen2", *lora, "model.gradient_checkpointing=true")
    assert not any(p.requires_grad for n, p in checkpointed.named_parameters() if "lora_" not in n)
    grads = trainable_grads(checkpointed, True)
    lora_b = [n for n in grads if "lora_B" in n]
    assert len(lora_b) == 2 * 7  # 2 layers x q, k, v, o, gate, up, down ("all-linear")
    assert all(grads[n].abs().sum() > 0 for n in lora_b)
    reference = trainable_grads(plain, False)
    assert grads.keys() == reference.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], reference[n], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name,overrides", [
    ("tiny:qwen2", ["model.lora.enabled=true", "model.lora.r=4", "model.lora.target_modules=[q_proj,v_proj]"]),
    ("tiny:bert", []),
])
def test_export_round_trip_gives_identical_embeddings(cache_dir, tmp_path, name, overrides):
    embedder = make_embedder(cache_dir, name, *overrides)
    perturb_trainable(embedder)
    text_ids, lengths, feats, mask = inputs(embedder)
    expected = embedder(text_ids, lengths, feats, mask)
    embedder.save_export(str(tmp_path / "export"))
    with pytest.raises(FileExistsError):
        embedder.save_export(str(tmp_path / "export"))
    loaded = load_export(str(tmp_path / "export")).eval()
    assert loaded.cfg == embedder.cfg
    assert torch.equal(loaded(text_ids, lengths, feats, mask), expected)
    saved = loaded.trainable_state_dict()
    if overrides:  # LoRA: only the adapter and the projection are saved
        assert all("lora_" in k or k.startswith("projection.") for k in saved)
        assert sum(p.numel() for p in saved.values()) < 0.1 * sum(p.numel() for p in loaded.parameters())
    else:  # full fine-tune: everything is trainable and saved
        assert len(saved) == len(list(loaded.parameters()))


def test_load_trainable_state_dict_rejects_other_keys(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:bert")
    state = embedder.trainable_state_dict()
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        embedder.load_trainable_state_dict(state)


def test_param_groups_split_backbone_projection_and_decay(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:qwen2", "model.lora.enabled=true", "model.lora.r=4")
    groups = embedder.param_groups(lr_backbone=1e-5, lr_projection=1e-3, weight_decay=0.01)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "projection", "projection_no_decay"}  # LoRA has no biases or norms
    assert by_name["backbone"]["lr"] == 1e-5 and by_name["projection"]["lr"] == 1e-3
    assert by_name["projection"]["params"] == [embedder.projection.weight]
    assert by_name["projection_no_decay"]["params"] == [embedder.projection.bias]
    assert by_name["projection_no_decay"]["weight_decay"] == 0.0 and by_name["backbone"]["weight_decay"] == 0.01
    full = make_embedder(cache_dir, "tiny:bert").param_groups(1e-5, 1e-3, 0.01)
    ids = [id(p) for g in full for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in make_embedder(cache_dir, "tiny:bert").parameters())
    no_decay = next(g for g in full if g["name"] == "backbone_no_decay")
    assert all(p.ndim == 1 for p in no_decay["params"]) and no_decay["weight_decay"] == 0.0
    torch.optim.AdamW(full)  # the groups are valid optimiser input


def test_embed_arrays_matches_forward_in_row_order(cache_dir):
    embedder = make_embedder(cache_dir, "tiny:qwen2")
    tokens = tokenize(embedder.tokenizer, TEXTS, 16)
    text_ids, lengths, feats, mask = inputs(embedder)
    rows = np.array([4, 0, 2, 3])
    out = embed_arrays(embedder, tokens, array_images(feats.numpy(), mask.numpy()), rows=rows, batch_size=2)
    expected = embedder(text_ids[rows], lengths[rows], feats[rows], mask[rows])
    np.testing.assert_allclose(out, expected.detach().numpy(), atol=1e-5)


def test_minilm_matches_sentence_transformers_mean_pooling(cache_dir, minilm_path):
    cfg = load_config(None, [f"model.name_or_path={minilm_path}", f"cache_dir={cache_dir}", "model.max_length=32"])
    embedder = build_embedder(cfg, None).eval()
    assert embedder.kind == "encoder" and embedder.hidden_size == 384
    tokens = tokenize(embedder.tokenizer, TEXTS, 32)
    ours = embedder(torch.as_tensor(tokens.ids).long(), torch.as_tensor(tokens.lengths).long())
    # sentence-transformers' all-MiniLM-L6-v2 pipeline written out with plain transformers
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    model = AutoModel.from_pretrained(minilm_path).eval()
    enc = tokenizer(TEXTS, padding=True, truncation=True, max_length=34, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    reference = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    named = build_embedder(load_config(None, ["model.name_or_path=packaged:all-MiniLM-L6-v2"]), None).eval()
    torch.testing.assert_close(named(torch.as_tensor(tokens.ids).long(), torch.as_tensor(tokens.lengths).long()),
                               ours)


def test_detect_kind():
    assert detect_kind(BertConfig(architectures=["BertModel"])) == "encoder"
    assert detect_kind(Qwen2Config(architectures=["Qwen2ForCausalLM"])) == "decoder"
    assert detect_kind(LlamaConfig()) == "decoder"  # no architectures: by model type
    with pytest.raises(ConfigError, match="model.kind"):
        detect_kind(ViTConfig())


def test_images_need_an_image_dim(cache_dir):
    with pytest.raises(ConfigError, match="image feature dimension"):
        make_embedder(cache_dir, "tiny:bert", image_dim=None)
