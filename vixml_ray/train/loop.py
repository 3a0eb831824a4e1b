"""The per-worker training loop, written once for one process and for every Ray Train worker.

Side effects go through a :class:`~vixml_ray.train.runtime.Runtime` (metrics, checkpoints, resume point, device) and
the model is stepped through an :class:`~vixml_ray.train.engine.Engine` (plain/DDP or DeepSpeed), so the maths here
is the same whatever runs it. Per epoch: update the clusters by the schedule (and, with PRIME prototypes, every
label's centroid of its training queries' embeddings), run the global batches, validate (P@k on a split carved from
TRAIN), report, checkpoint. At the end: with ``model.classifiers`` the classifier stage on the final encoder's
training-query embeddings (:mod:`vixml_ray.train.classifiers`; ``train.max_minutes`` covers it, the Siamese epochs
stop ``train.classifier_loss.reserve_minutes`` earlier), the test split once, and the inference export.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from vixml_ray.config import Config, ConfigError
from vixml_ray.model import build_embedder, load_tokenizer
from vixml_ray.model.embedder import Embedder
from vixml_ray.train import dist
from vixml_ray.train.classifiers import train_classifiers
from vixml_ray.train.clustering import balanced_clusters
from vixml_ray.train.engine import Engine, TorchEngine
from vixml_ray.train.inputs import TrainInputs, load_inputs
from vixml_ray.train.loss import PrimeLossConfig, TripletLossConfig
from vixml_ray.train.prototypes import init_prototypes, label_centroids
from vixml_ray.train.positives import PositiveSampler
from vixml_ray.train.runtime import Runtime
from vixml_ray.train.sampler import ClusterSchedule, GlobalBatchSampler
from vixml_ray.train.step import make_step_batch, train_step
from vixml_ray.train.validation import embed_rows, retrieval_metrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[Config, Embedder, int, torch.device], Engine]
STATE_FILE, SAMPLER_FILE = "trainer_state.json", "sampler.npz"


def torch_engine(cfg: Config, embedder: Embedder, total_steps: int, device: torch.device) -> Engine:
    return TorchEngine(embedder, cfg.train, total_steps, device)


@dataclass
class LoopState:
    """Where the loop is: the next batch to run is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    train_s: float = 0.0  # seconds spent in run() so far, over every (resumed) process: the max_minutes budget
    first_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Trainer:
    """The pieces of one training run on one worker (see :func:`train_loop`)."""

    cfg: Config
    runtime: Runtime
    inputs: TrainInputs
    engine: Engine
    sampler: GlobalBatchSampler
    positives: PositiveSampler
    schedule: ClusterSchedule
    loss_cfg: TripletLossConfig
    total_steps: int  # planned optimiser steps (the LR schedule's length)
    prime: PrimeLossConfig | None = None  # the PRIME objective when the model has label prototypes
    state: LoopState = field(default_factory=LoopState)
    classifier_summary: dict[str, Any] = field(default_factory=dict)  # what the classifier stage did
    _started: float = field(default=0.0, init=False, repr=False)  # perf_counter() at run() minus earlier runs' time

    # ----------------------------------------------------------------------------------------------- epochs
    def run(self) -> dict[str, Any]:
        train = self.cfg.train
        self._started = time.perf_counter() - self.state.train_s
        stop = self._reached_limit()
        while self.state.epoch < train.epochs and not stop:
            epoch = self.state.epoch
            if self.state.batch == 0:
                self.start_epoch(epoch)
            batches = self.sampler.epoch_batches(epoch)
            sampled = self.positives.sample(epoch)
            losses, queries, grad_norm, start = [], 0, 0.0, time.perf_counter()
            for index in range(self.state.batch, len(batches)):
                batch = make_step_batch(batches[index], sampled, self.inputs.train_labels,
                                        self.inputs.tokens["train"], self.inputs.tokens["label"],
                                        self.inputs.images, train.embed_chunk_rows, self.runtime.device)
                loss, grad_norm = train_step(self.engine, batch, self.loss_cfg, self.prime)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at epoch {epoch}, batch {index} (step {self.state.step})")
                losses.append(loss)
                queries += batch.num_queries
                self.state.step += 1
                self.state.batch = index + 1
                if self.state.first_loss is None:
                    self.state.first_loss = loss
                if self._reached_limit():
                    stop = True
                    break
            seconds = time.perf_counter() - start
            if self.state.batch >= len(batches):
                self.state.epoch, self.state.batch = epoch + 1, 0
            metrics = {
                "epoch": epoch, "step": self.state.step, "loss": float(np.mean(losses)) if losses else float("nan"),
                "last_loss": losses[-1] if losses else float("nan"), "grad_norm": grad_norm,
                "samples_per_s": queries / seconds if seconds > 0 else 0.0, "epoch_s": seconds,
                "cluster_size": self.sampler.cluster_size or 0, **self.engine.learning_rates(),
            }
            last = stop or self.state.epoch >= train.epochs
            if len(self.inputs.val_rows) and (last or (epoch + 1) % train.eval_every_epochs == 0):
                metrics.update(self.validate())
            self.state.history.append(metrics)
            if last or (epoch + 1) % train.checkpoint_every_epochs == 0:
                self.report_with_checkpoint(metrics)
            else:
                self.runtime.report(metrics)
        return self.finish()

    def _reached_limit(self) -> bool:
        """``train.max_steps`` optimiser steps done, or ``train.max_minutes`` of this process's loop spent (less the
        classifier stage's reserve; the decision is rank 0's, so every rank stops after the same step)."""
        train = self.cfg.train
        if train.max_steps is not None and self.state.step >= train.max_steps:
            return True
        reserve = train.classifier_loss.reserve_minutes if self.cfg.model.classifiers.enabled else 0.0
        return self._spent(reserve)

    def _spent(self, reserve_minutes: float = 0.0) -> bool:
        """Whether ``train.max_minutes`` less ``reserve_minutes`` have been spent (rank 0 decides for all)."""
        if self.cfg.train.max_minutes is None:
            return False
        limit = 60.0 * max(0.0, self.cfg.train.max_minutes - reserve_minutes)
        return bool(dist.broadcast_object(self._elapsed() >= limit))

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    def start_epoch(self, epoch: int) -> None:
        """Embeds the training queries once when this epoch needs them (new clusters, prototype centroids), then
        updates the clusters and the centroids."""
        size = self.schedule.cluster_size(epoch)
        new_clusters = size is not None and (self.schedule.refresh(epoch) or self.sampler.cluster_size is None)
        emb = None
        if new_clusters or self.engine.embedder.prototypes is not None:
            emb = self.embed_training_queries()
            self.update_centroids(emb)
        self.update_clusters(epoch, emb)

    def embed_training_queries(self) -> np.ndarray:
        """The current embeddings of the training queries (rows of ``sampler.rows``), the same on every rank."""
        start = time.perf_counter()
        emb = embed_rows(self.engine.embedder, self.inputs.tokens["train"], self.inputs.images, "train",
                         self.sampler.rows, self.cfg.eval.batch_size, self.runtime.device)
        log.info("embedded %d training queries in %.1f s", len(emb), time.perf_counter() - start)
        return emb

    def update_centroids(self, emb: np.ndarray) -> None:
        """With prototypes: every label's centroid = the exact mean of its training queries' embeddings ``emb``."""
        if self.engine.embedder.prototypes is not None:
            centroids = label_centroids(emb, self.inputs.train_labels[self.sampler.rows])
            self.engine.embedder.prototypes.set_centroids(*centroids)

    def update_clusters(self, epoch: int, emb: np.ndarray | None) -> None:
        """Random batches before the start; new clusters from the training queries' embeddings ``emb`` (rows of
        ``sampler.rows``) at refresh epochs (or when there are none); between refreshes, a doubled size merges
        sibling clusters of the same tree."""
        size = self.schedule.cluster_size(epoch)
        if size is None:
            self.sampler.set_clusters(None)
        elif self.schedule.refresh(epoch) or self.sampler.cluster_size is None:
            self.sampler.set_clusters(self.cluster_queries(emb, size, epoch), size)
        else:
            while self.sampler.cluster_size < size:
                self.sampler.merge_siblings(2 * self.sampler.cluster_size)

    def cluster_queries(self, emb: np.ndarray, size: int, epoch: int) -> np.ndarray:
        """Cluster ids of the training queries from their current embeddings (the same on all ranks; clustered on
        rank 0 and broadcast, so every rank uses the very same assignment)."""
        start = time.perf_counter()
        ids = balanced_clusters(emb, size, seed=self.cfg.train.seed + epoch) if dist.rank() == 0 else None
        ids = dist.broadcast_object(ids)
        log.info("clustered %d queries into %d clusters of ~%d in %.1f s", len(ids), int(ids.max()) + 1, size,
                 time.perf_counter() - start)
        return ids

    # ----------------------------------------------------------------------------------------------- evaluation
    def label_embeddings(self) -> np.ndarray:
        """The vectors labels are scored with (prototypes when the model has them)."""
        rows = np.arange(self.inputs.dataset.num_labels)
        return embed_rows(self.engine.embedder, self.inputs.tokens["label"], self.inputs.images, "label", rows,
                          self.cfg.eval.batch_size, self.runtime.device, as_labels=True)

    def validate(self) -> dict[str, float]:
        rows = self.inputs.val_rows
        queries = embed_rows(self.engine.embedder, self.inputs.tokens["train"], self.inputs.images, "train", rows,
                             self.cfg.eval.batch_size, self.runtime.device)
        return retrieval_metrics(queries, self.label_embeddings(), self.inputs.train_labels[rows], k=5, topk=5,
                                 device=self.runtime.device, prefix="val_")

    def test(self) -> dict[str, float]:
        rows = np.arange(self.inputs.dataset.num_test)
        queries = embed_rows(self.engine.embedder, self.inputs.tokens["test"], self.inputs.images, "test", rows,
                             self.cfg.eval.batch_size, self.runtime.device)
        return retrieval_metrics(queries, self.label_embeddings(), self.inputs.test_labels, k=self.cfg.eval.k,
                                 topk=self.cfg.eval.topk, device=self.runtime.device,
                                 inv_propensity=self.inputs.inv_propensity,
                                 filter_pairs=self.inputs.dataset.filter_pairs(), prefix="test_")

    # ------------------------------------------------------------------------------------------- checkpoints
    def report_with_checkpoint(self, metrics: dict[str, Any]) -> None:
        self.state.train_s = self._elapsed()
        directory = tempfile.mkdtemp(prefix="vixml-ckpt-")
        try:
            self.engine.save(directory)
            torch.save(_rng_state(), os.path.join(directory, f"rng_rank{dist.rank()}.pt"))
            if dist.rank() == 0:
                with open(os.path.join(directory, STATE_FILE), "w", encoding="utf-8") as f:
                    json.dump(asdict(self.state), f)
                sampler_state = self.sampler.state_dict()
                np.savez(os.path.join(directory, SAMPLER_FILE),
                         cluster_ids=np.empty(0, np.int32) if sampler_state["cluster_ids"] is None
                         else sampler_state["cluster_ids"],
                         has_clusters=sampler_state["cluster_ids"] is not None,
                         cluster_size=sampler_state["cluster_size"] or 0)
            self.runtime.report(metrics, checkpoint_dir=directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def restore(self, directory: str) -> None:
        """Continues from a checkpoint written by :meth:`report_with_checkpoint`."""
        self.engine.load(directory)
        with open(os.path.join(directory, STATE_FILE), encoding="utf-8") as f:
            self.state = LoopState(**json.load(f))
        with np.load(os.path.join(directory, SAMPLER_FILE)) as saved:
            has = bool(saved["has_clusters"])
            self.sampler.load_state_dict({"cluster_ids": saved["cluster_ids"] if has else None,
                                          "cluster_size": int(saved["cluster_size"]) or None})
        rng_file = os.path.join(directory, f"rng_rank{dist.rank()}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s at epoch %d, batch %d, step %d", directory, self.state.epoch, self.state.batch,
                 self.state.step)

    def train_classifiers(self, emb: np.ndarray) -> None:
        """The classifier stage on the training queries' embeddings ``emb`` (rows of ``sampler.rows``) of the final
        encoder, within what is left of ``train.max_minutes``; attaches the vectors to the model."""
        start = time.perf_counter()
        result = train_classifiers(emb, self.inputs.train_labels[self.sampler.rows], self.cfg.train.classifier_loss,
                                   self.cfg.train.seed, self.runtime.device, stop=self._spent)
        self.engine.embedder.set_classifiers(torch.as_tensor(result.weight), torch.as_tensor(result.trained))
        history = result.history
        self.classifier_summary = {
            "classifier_epochs": result.epochs, "classifier_labels": int(result.trained.sum()),
            "classifier_first_loss": history[0]["loss"] if history else None,
            "classifier_final_loss": history[-1]["loss"] if history else None,
            "classifier_s": round(time.perf_counter() - start, 3),
        }
        log.info("classifier stage: %s", self.classifier_summary)

    # ------------------------------------------------------------------------------------------------- end
    def finish(self) -> dict[str, Any]:
        emb = None
        if self.engine.embedder.prototypes is not None:  # the served centroids are those of the final model
            emb = self.embed_training_queries()
            self.update_centroids(emb)
        if self.cfg.model.classifiers.enabled:
            self.train_classifiers(emb if emb is not None else self.embed_training_queries())
        test = self.test()
        export = self.runtime.output_dir
        self.engine.export(export)
        history = self.state.history
        summary = {
            "checkpoint": export,
            "steps": self.state.step,
            "epochs": self.state.epoch,
            "first_loss": self.state.first_loss,
            "final_loss": history[-1]["last_loss"] if history else None,
            "samples_per_s": float(np.mean([h["samples_per_s"] for h in history])) if history else 0.0,
            **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
            **self.classifier_summary,
            **test,
        }
        return summary


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def planned_steps(sampler: GlobalBatchSampler, schedule: ClusterSchedule, epochs: int) -> int:
    """Optimiser steps of the whole run (for the LR schedule): each cluster-size regime's batch count, measured on
    its first epoch (later epochs of a regime differ by a batch at most)."""
    counts: dict[int | None, int] = {}
    for epoch in range(epochs):
        size = schedule.cluster_size(epoch)
        if size not in counts:
            counts[size] = sampler.num_batches(epoch, size)
    return sum(counts[schedule.cluster_size(epoch)] for epoch in range(epochs))


def build_trainer(cfg: Config, runtime: Runtime, make_engine: EngineFactory = torch_engine) -> Trainer:
    """Reads the inputs, builds the model, engine and samplers, and restores the runtime's latest checkpoint."""
    train = cfg.train
    world = dist.world_size()
    if train.batch_size < 2 * world:
        raise ConfigError(f"'train.batch_size'={train.batch_size} is the GLOBAL batch: it needs at least 2 queries "
                          f"per worker ({world} workers)")
    torch.manual_seed(train.seed)
    inputs = load_inputs(cfg, load_tokenizer(cfg.model, cfg.cache_dir))
    embedder = build_embedder(cfg, inputs.image_dim, inputs.dataset.num_labels)
    resume = runtime.latest_checkpoint()
    if embedder.prototypes is not None or cfg.model.classifiers.enabled:
        embedder.label_catalogue = inputs.dataset.label_catalogue()
    if embedder.prototypes is not None:
        if not resume:
            init_prototypes(embedder, inputs, cfg, runtime.device)
    positives = PositiveSampler(inputs.train_labels, train.seed,
                                inputs.inv_propensity if train.propensity_sampling else None)
    rows = np.intersect1d(inputs.train_rows, positives.rows_with_labels())
    skipped = len(inputs.train_rows) - len(rows)
    if skipped:
        log.warning("%d training queries have no labels and are skipped", skipped)
    sampler = GlobalBatchSampler(rows, train.batch_size, train.seed)
    schedule = ClusterSchedule(train.cluster)
    total = planned_steps(sampler, schedule, train.epochs)
    if train.max_steps is not None:
        total = min(total, train.max_steps)
    trainer = Trainer(cfg=cfg, runtime=runtime, inputs=inputs, engine=make_engine(cfg, embedder, total, runtime.device),
                      sampler=sampler, positives=positives, schedule=schedule,
                      loss_cfg=TripletLossConfig.from_train(train), total_steps=total,
                      prime=PrimeLossConfig.from_train(train) if embedder.prototypes is not None else None)
    if resume:
        trainer.restore(resume)
    return trainer


def train_loop(cfg: Config, runtime: Runtime, make_engine: EngineFactory = torch_engine) -> dict[str, Any]:
    """Trains (or resumes) ``cfg`` on this worker; returns the run summary (the same on every rank)."""
    return build_trainer(cfg, runtime, make_engine).run()
