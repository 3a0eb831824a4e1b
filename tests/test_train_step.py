"""The training step on a tiny model: dynamic-padding chunks are exact, a few steps lower the loss, and two gloo
ranks compute the same loss and gradients as one process on the same global batch (plain triplet loss, and the PRIME
objective with label prototypes, where one rank holds no label of the batch)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from vixml_ray.config import Config, load_config
from vixml_ray.model import build_embedder
from vixml_ray.model.tokens import TokenArrays
from vixml_ray.train.engine import ChunkedEmbedder, TorchEngine, build_scheduler, learning_rates
from vixml_ray.train.loss import PrimeLossConfig, TripletLossConfig
from vixml_ray.train.positives import PositiveSampler
from vixml_ray.train.step import forward_loss, make_step_batch, train_step

NUM_QUERIES, NUM_LABELS = 48, 12
# Golden losses on this data (measured, identical over runs): a change to the model, the batch or the loss that moves
# them must be deliberate. The first step of the few-steps run; the global batch's loss, triplet and PRIME.
FIRST_STEP_LOSS = 0.43854767084121704
GLOBAL_BATCH_LOSS = {False: 1.0655348300933838, True: 4.297900199890137}


def _config(cache: Path, prototypes: bool = False) -> Config:
    return load_config(None, [f"cache_dir={cache}", "model.name_or_path=tiny:bert", "model.max_length=10",
                              "train.lr_backbone=3e-3", "train.warmup_steps=0", "train.epochs=1",
                              f"model.prototypes.enabled={prototypes}", "model.prototypes.num_clusters=4"])


def _data() -> tuple[TokenArrays, TokenArrays, sp.csr_matrix]:
    """Queries whose first token names their label (plus noise tokens), labels = that token; some have 2 labels."""
    rng = np.random.default_rng(0)
    topic = np.arange(NUM_QUERIES) % NUM_LABELS
    q_len = rng.integers(2, 10, NUM_QUERIES).astype(np.int32)
    q_ids = rng.integers(2000, 3000, (NUM_QUERIES, 10)).astype(np.int32)
    q_ids[:, 0] = 1000 + topic
    q_ids[np.arange(10)[None, :] >= q_len[:, None]] = 0
    l_ids = np.zeros((NUM_LABELS, 3), np.int32)
    l_ids[:, 0] = 1000 + np.arange(NUM_LABELS)
    l_len = np.ones(NUM_LABELS, np.int32)
    rows = np.concatenate([np.arange(NUM_QUERIES), np.arange(0, NUM_QUERIES, 4)])
    cols = np.concatenate([topic, (topic[::4] + 1) % NUM_LABELS])
    labels = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(NUM_QUERIES, NUM_LABELS))
    return TokenArrays(q_ids, q_len), TokenArrays(l_ids, l_len), labels


def test_lr_schedule_warms_up_then_decays_linearly() -> None:
    """transformers' linear schedule with 4 warm-up steps of 10: step s runs at s/4 of the peak LR during the
    warm-up (the hand-written schedule it replaces ran at (s+1)/4, one step ahead), then (10 - s)/6 as before."""
    weights = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([{"params": [weights], "lr": 2e-3, "name": "backbone"}])
    cfg = load_config(None, ["train.warmup_steps=4"])
    scheduler = build_scheduler(optimizer, cfg.train, total_steps=10)
    seen = []
    for _ in range(11):
        seen.append(learning_rates(optimizer)["lr_backbone"])
        optimizer.step()
        scheduler.step()
    factors = [0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0]
    assert seen == pytest.approx([2e-3 * f for f in factors], abs=1e-12)


def test_chunked_forward_equals_one_padded_call(tmp_path: Path) -> None:
    embedder = build_embedder(_config(tmp_path), None).eval()
    queries, _, _ = _data()
    ids, lengths = torch.as_tensor(queries.ids, dtype=torch.long), torch.as_tensor(queries.lengths, dtype=torch.long)
    with torch.no_grad():
        whole = embedder(ids, lengths)
        chunked = ChunkedEmbedder(embedder)(ids, lengths, None, None, 5)
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_a_few_steps_lower_the_loss(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = _config(tmp_path)
    queries, labels_tok, labels = _data()
    engine = TorchEngine(build_embedder(cfg, None), cfg.train, total_steps=12, device=torch.device("cpu"))
    sampled = PositiveSampler(labels, seed=0).sample(0)
    batch = make_step_batch(np.arange(32), sampled, labels, queries, labels_tok, None, 16, torch.device("cpu"))
    assert batch.chunks == 3 and batch.sizes == [32 + len(batch.targets.label_ids)]
    losses = [train_step(engine, batch, TripletLossConfig(num_negatives=5))[0] for _ in range(12)]
    assert losses[0] == pytest.approx(FIRST_STEP_LOSS, abs=1e-5)
    assert min(losses[-3:]) < 0.5 * losses[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _loss_and_grads(cfg: Config) -> tuple[float, dict[str, np.ndarray]]:
    queries, labels_tok, labels = _data()
    torch.manual_seed(0)
    embedder = build_embedder(cfg, None, NUM_LABELS)
    prime = None
    if embedder.prototypes is not None:  # centroids for all labels but the last two
        rng = np.random.default_rng(1)
        embedder.prototypes.set_clusters(np.arange(NUM_LABELS) % 4, rng.normal(size=(NUM_LABELS, 64)))
        embedder.prototypes.set_centroids(rng.normal(size=(NUM_LABELS, 64)), np.arange(NUM_LABELS) < NUM_LABELS - 2)
        prime = PrimeLossConfig()
    engine = TorchEngine(embedder, cfg.train, total_steps=1, device=torch.device("cpu"))
    engine.embedder.eval()  # dropout off: ranks and the single process must agree exactly
    sampled = PositiveSampler(labels, seed=0).sample(0)
    rows = np.arange(5, 45)
    batch = make_step_batch(rows, sampled, labels, queries, labels_tok, None, 8, torch.device("cpu"))
    if prime is not None and torch_dist.is_initialized():
        assert 0 in batch.label_sizes  # one rank has only queries: its prototype gradients are zeros, not missing
    loss = forward_loss(engine, batch, TripletLossConfig(num_negatives=5, label_to_query=True), prime)
    engine.backward(loss * (torch_dist.get_world_size() if torch_dist.is_initialized() else 1))
    grads = {n: p.grad.numpy().copy() for n, p in engine.embedder.named_parameters() if p.grad is not None}
    return float(loss.detach()), grads


def _worker(rank: int, world: int, port: int, cache: str, out: str, prototypes: bool) -> None:
    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss, grads = _loss_and_grads(_config(Path(cache), prototypes))
        if rank == 0:
            np.savez(out, loss=loss, **grads)
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("prototypes", [False, True], ids=["triplet", "prime"])
def test_two_ranks_match_one_process(tmp_path: Path, prototypes: bool) -> None:
    cfg = _config(tmp_path, prototypes)
    build_embedder(cfg, None, NUM_LABELS)  # materialise the tiny model once, before the workers race for it
    loss, grads = _loss_and_grads(cfg)
    assert loss == pytest.approx(GLOBAL_BATCH_LOSS[prototypes], abs=1e-5)
    if prototypes:
        assert {"prototypes.free", "prototypes.combiner.linear1.weight"} <= set(grads)
    out = str(tmp_path / "rank0.npz")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), out, prototypes), nprocs=2, join=True)
    got = np.load(out)
    assert float(got["loss"]) == pytest.approx(loss, rel=1e-5)
    assert set(got.files) - {"loss"} == set(grads)
    for name, grad in grads.items():
        np.testing.assert_allclose(got[name], grad, rtol=1e-4, atol=1e-6, err_msg=name)
