"""The per-worker training loop, written once for one process and for every Ray Train worker.

Side effects go through a :class:`~vixml_ray.train.runtime.Runtime` (metrics, checkpoints, resume point, device) and
the model is stepped through an :class:`~vixml_ray.train.engine.Engine` (plain/DDP or DeepSpeed), so the maths here
is the same whatever runs it. Per epoch: update the clusters by the schedule (and, with PRIME prototypes, every
label's centroid of its training queries' embeddings), run the global batches, validate (P@k on a split carved from
TRAIN), report, checkpoint. At the end: with ``model.classifiers`` the classifier stage on the final encoder's
training-query embeddings (:mod:`vixml_ray.train.classifiers`), the test split once, and the inference export.
With ``train.classifier_loss.joint`` that stage runs first instead, on the initial encoder, and every epoch embeds
the training queries (their shortlists under the current vectors, and the clusters) before steps that train the
encoder and the vectors together on the classifier loss (:func:`~vixml_ray.train.step.classifier_step`); the
vectors and their Adagrad state are checkpointed with the rest.

``train.max_minutes`` bounds the whole training side, everything before the test: the prototypes' label clustering,
every clustering and centroid pass, the steps, validations and checkpoints, the final pass over the training
queries and the classifier stage. The loop stops before a step (or an epoch's start passes) when the time spent plus
what must still follow (the last validation and final pass, predicted from the measured embedding rate, and
``train.classifier_loss.reserve_minutes`` for the final classifier stage, which stops itself at the budget) reaches
it; a budget smaller than the prototypes' set-up and final centroid pass themselves gets those two and no step.
The time spent is carried across resumes and the decision is rank 0's; the run summary reports it as
``train_side_s``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import numpy as np
import scipy.sparse as sp
import torch

from vixml_ray.config import Config
from vixml_ray.data.filters import rows_pairs
from vixml_ray.errors import ConfigError
from vixml_ray.eval.metrics import inverse_propensity
from vixml_ray.model import build_embedder, load_tokenizer
from vixml_ray.model.embedder import Embedder
from vixml_ray.train import dist
from vixml_ray.train.classifiers import ClassifierResult, ClassifierTable, train_classifiers
from vixml_ray.train.clustering import balanced_clusters
from vixml_ray.train.lexical import fit_lexical
from vixml_ray.train.engine import Engine, TorchEngine, learning_rates
from vixml_ray.train.inputs import TrainInputs, load_inputs
from vixml_ray.train.loss import PrimeLossConfig, TripletLossConfig
from vixml_ray.train.positives import PositiveSampler
from vixml_ray.train.prototypes import init_prototypes, label_centroids
from vixml_ray.train.runtime import Runtime
from vixml_ray.train.sampler import ClusterSchedule, GlobalBatchSampler
from vixml_ray.train.step import classifier_step, make_step_batch, train_step
from vixml_ray.train.validation import embed_rows, exact_top_k, validation_metrics

log = logging.getLogger(__name__)

EngineFactory = Callable[[Config, Embedder, int, torch.device], Engine]
STATE_FILE, SAMPLER_FILE, CLASSIFIERS_FILE = "trainer_state.json", "sampler.npz", "classifiers.pt"


def torch_engine(cfg: Config, embedder: Embedder, total_steps: int, device: torch.device) -> Engine:
    return TorchEngine(embedder, cfg.train, total_steps, device)


@dataclass
class LoopState:
    """Where the loop is: the next batch to run is ``batch`` of ``epoch``."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    train_s: float = 0.0  # training-side seconds so far (set-up, run()), over every (resumed) process: the budget
    first_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EpochProgress:
    """Rank 0's progress line within an epoch, at most every ``every_s`` seconds (``train.progress_every_s``):
    epoch, batch/batches, mean loss since the previous line, samples/s and the time left in the epoch."""

    epoch: int
    batches: int
    first: int  # the batch this process starts the epoch at (a resumed run starts mid-epoch)
    every_s: float
    started: float = field(default_factory=time.perf_counter)
    shown_at: float = field(default_factory=time.perf_counter)
    shown: int = 0  # losses already summarised

    def after(self, index: int, losses: list[float], queries: int) -> None:
        """Called after batch ``index``; ``losses`` and ``queries`` count this process's batches of the epoch."""
        now = time.perf_counter()
        if self.every_s <= 0 or now - self.shown_at < self.every_s or dist.rank() != 0:
            return
        elapsed, done = now - self.started, index + 1 - self.first
        left = elapsed / done * (self.batches - index - 1)
        log.info("epoch %d batch %d/%d loss %.4f %.1f samples/s, %s left in the epoch", self.epoch, index + 1,
                 self.batches, float(np.mean(losses[self.shown:])), queries / elapsed,
                 timedelta(seconds=round(left)))
        self.shown_at, self.shown = now, len(losses)


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
    # joint classifier training: the vectors, the current shortlists (rows of sampler.rows) and the fresh embeddings
    # of the training queries the next epoch start may reuse
    classifier_table: ClassifierTable | None = None
    shortlist: np.ndarray | None = None
    _fresh_emb: np.ndarray | None = field(default=None, init=False, repr=False)
    _started: float = field(default=0.0, init=False, repr=False)  # perf_counter() at run() minus earlier runs' time
    # seconds per row of the latest no-grad embedding pass (None before one; the prototypes' set-up gives the first),
    # per item of the steps so far, and of the latest query clustering: what predicts the passes still to come
    embed_s_per_row: float | None = None
    _step_s_per_item: float | None = field(default=None, init=False, repr=False)
    _cluster_s: float = field(default=0.0, init=False, repr=False)

    # ----------------------------------------------------------------------------------------------- epochs
    def run(self) -> dict[str, Any]:
        train = self.cfg.train
        self._started = time.perf_counter() - self.state.train_s
        if self.joint and self.classifier_table is None:
            self.start_joint()
        stop = self._reached_limit(upcoming=self._start_epoch_s(self.state.epoch) if self.state.batch == 0 else 0.0)
        while self.state.epoch < train.epochs and not stop:
            epoch = self.state.epoch
            if self.state.batch == 0:
                self.start_epoch(epoch)
            batches = self.sampler.epoch_batches(epoch)
            sampled = self.positives.sample(epoch)
            losses, queries, items, grad_norm, start = [], 0, 0, 0.0, time.perf_counter()
            progress = EpochProgress(epoch, len(batches), self.state.batch, train.progress_every_s)
            for index in range(self.state.batch, len(batches)):
                label_tokens = None if self.joint else self.inputs.tokens["label"]  # joint: queries only
                batch = make_step_batch(batches[index], sampled, self.inputs.train_labels,
                                        self.inputs.tokens["train"], label_tokens,
                                        self.inputs.images, train.embed_chunk_rows, self.runtime.device)
                if self.joint:
                    loss, grad_norm = classifier_step(self.engine, batch, self.classifier_table,
                                                      np.searchsorted(self.sampler.rows, batches[index]),
                                                      self.joint_labels, self.shortlist)
                else:
                    loss, grad_norm = train_step(self.engine, batch, self.loss_cfg, self.prime)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at epoch {epoch}, batch {index} (step {self.state.step})")
                losses.append(loss)
                queries += batch.num_queries
                items += sum(batch.sizes)
                self._step_s_per_item = (time.perf_counter() - start) / items
                self.state.step += 1
                self.state.batch = index + 1
                if self.state.first_loss is None:
                    self.state.first_loss = loss
                progress.after(index, losses, queries)
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
                "cluster_size": self.sampler.cluster_size or 0, **learning_rates(self.engine.optimizer),
            }
            validate_now = len(self.inputs.val_rows) > 0 and (epoch + 1) % train.eval_every_epochs == 0
            if not stop and self.state.batch == 0 and self.state.epoch < train.epochs:  # room for another epoch?
                stop = self._reached_limit(upcoming=self._start_epoch_s(self.state.epoch)
                                           + (self._validation_s() if validate_now else 0.0))
            last = stop or self.state.epoch >= train.epochs
            if len(self.inputs.val_rows) and (last or validate_now):
                metrics.update(self.validate())
            self.state.history.append(metrics)
            if last or (epoch + 1) % train.checkpoint_every_epochs == 0:
                self.report_with_checkpoint(metrics)
            else:
                self.runtime.report(metrics)
        return self.finish()

    def _reached_limit(self, upcoming: float = 0.0) -> bool:
        """``train.max_steps`` optimiser steps done, or the ``train.max_minutes`` budget reached by the training-side
        time spent plus ``upcoming`` seconds of work before the next step plus the predicted end passes and, with
        classifier vectors, ``train.classifier_loss.reserve_minutes`` for their stage (the decision is rank 0's, so
        every rank stops at the same point)."""
        train = self.cfg.train
        if train.max_steps is not None and self.state.step >= train.max_steps:
            return True
        reserve = 60.0 * train.classifier_loss.reserve_minutes if self.final_stage else 0.0
        return self._spent(upcoming + self._end_passes_s() + reserve)

    @property
    def joint(self) -> bool:
        """Whether the encoder and the classifier vectors train together (``train.classifier_loss.joint``)."""
        return self.cfg.model.classifiers.enabled and self.cfg.train.classifier_loss.joint

    @property
    def final_stage(self) -> bool:
        """Whether the frozen classifier stage follows the last epoch."""
        return self.cfg.model.classifiers.enabled and not self.joint

    def _spent(self, ahead_s: float = 0.0) -> bool:
        """Whether the training-side time spent plus ``ahead_s`` seconds reaches ``train.max_minutes`` (rank 0
        decides for all)."""
        if self.cfg.train.max_minutes is None:
            return False
        return bool(dist.broadcast_object(self._elapsed() + ahead_s >= 60.0 * self.cfg.train.max_minutes))

    def _elapsed(self) -> float:
        return time.perf_counter() - self._started

    def _pass_s(self, rows: int) -> float:
        """Predicted seconds of a no-grad embedding pass over ``rows`` rows: the latest pass's rate, else a third of
        the training steps' time per embedded item (a forward without backward), else 0."""
        if self.embed_s_per_row is not None:
            return rows * self.embed_s_per_row
        return rows * self._step_s_per_item / 3 if self._step_s_per_item is not None else 0.0

    def _validation_s(self) -> float:
        """Predicted seconds of a validation: its queries and every label (0 without a validation split)."""
        return self._pass_s(len(self.inputs.val_rows) + self.inputs.dataset.num_labels) if len(self.inputs.val_rows) \
            else 0.0

    def _end_passes_s(self) -> float:
        """Predicted seconds of what follows the last step before the test: the last validation; with prototypes,
        classifier vectors or the lexical head, the final pass over the training queries; with the lexical head, the
        pass over the labels its shortlists are drawn from (its own fit, seconds, is not predicted)."""
        lexical = self.cfg.model.lexical.enabled
        final_pass = self.engine.embedder.prototypes is not None or self.final_stage or lexical
        return (self._validation_s() + (self._pass_s(len(self.sampler.rows)) if final_pass else 0.0)
                + (self._pass_s(self.inputs.dataset.num_labels) if lexical else 0.0))

    def _start_epoch_s(self, epoch: int) -> float:
        """Predicted seconds of :meth:`start_epoch` (0 when it embeds nothing): a pass over the training queries,
        and a clustering as long as the latest one when the epoch clusters anew."""
        size = self.schedule.cluster_size(epoch)
        new_clusters = size is not None and (self.schedule.refresh(epoch) or self.sampler.cluster_size is None)
        if not new_clusters and self.engine.embedder.prototypes is None and not self.joint:
            return 0.0
        return self._pass_s(len(self.sampler.rows)) + (self._cluster_s if new_clusters else 0.0)

    def _embed(self, split: str, rows: np.ndarray, as_labels: bool = False) -> np.ndarray:
        """:func:`embed_rows` of ``rows`` of ``split`` with this run's model, timed (the rate predicts later passes)."""
        start = time.perf_counter()
        emb = embed_rows(self.engine.embedder, self.inputs.tokens[split], self.inputs.images, split, rows,
                         self.cfg.eval.batch_size, self.runtime.device, as_labels=as_labels)
        if len(rows):
            self.embed_s_per_row = (time.perf_counter() - start) / len(rows)
        return emb

    def start_epoch(self, epoch: int) -> None:
        """Embeds the training queries once when this epoch needs them (new clusters, prototype centroids, joint
        classifier shortlists), then updates the clusters, the centroids and the shortlists."""
        size = self.schedule.cluster_size(epoch)
        new_clusters = size is not None and (self.schedule.refresh(epoch) or self.sampler.cluster_size is None)
        emb, self._fresh_emb = self._fresh_emb, None
        if emb is None and (new_clusters or self.engine.embedder.prototypes is not None or self.joint):
            emb = self.embed_training_queries()
        if emb is not None:
            self.update_centroids(emb)
        if self.joint:
            self.shortlist = self.classifier_table.shortlist(torch.as_tensor(emb, device=self.runtime.device))
        self.update_clusters(epoch, emb)

    def start_joint(self) -> None:
        """The classifier stage on the initial encoder, whose vectors (and Adagrad state) the joint epochs go on
        training."""
        emb = self.embed_training_queries()
        result = self.train_classifiers(emb)
        self.classifier_table = result.table or ClassifierTable(result.weight, result.trained,
                                                                self.cfg.train.classifier_loss, self.runtime.device)
        self._fresh_emb = emb

    @functools.cached_property
    def joint_labels(self) -> sp.csr_matrix:
        """The positives of the training queries (rows of ``sampler.rows``), as the classifier loss reads them."""
        return sp.csr_matrix(self.inputs.train_labels[self.sampler.rows]).astype(bool).astype(np.float32)

    @contextlib.contextmanager
    def serving_joint_vectors(self) -> Iterator[None]:
        """The model scores labels with the joint vectors inside the block (no-op without them)."""
        if self.classifier_table is None:
            yield
            return
        embedder = self.engine.embedder
        embedder.set_classifiers(torch.as_tensor(self.classifier_table.weight()),
                                 torch.as_tensor(self.classifier_table.trained))
        try:
            yield
        finally:
            embedder.classifiers = None

    def embed_training_queries(self) -> np.ndarray:
        """The current embeddings of the training queries (rows of ``sampler.rows``), the same on every rank."""
        start = time.perf_counter()
        emb = self._embed("train", self.sampler.rows)
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
        self._cluster_s = time.perf_counter() - start
        log.info("clustered %d queries into %d clusters of ~%d in %.1f s", len(ids), int(ids.max()) + 1, size,
                 time.perf_counter() - start)
        return ids

    # ----------------------------------------------------------------------------------------------- evaluation
    def label_embeddings(self) -> np.ndarray:
        """The vectors labels are scored with (prototypes when the model has them)."""
        return self._embed("label", np.arange(self.inputs.dataset.num_labels), as_labels=True)

    def validate(self) -> dict[str, float]:
        rows = self.inputs.val_rows
        queries = self._embed("train", rows)
        with self.serving_joint_vectors():
            labels = self.label_embeddings()
        return validation_metrics(queries, labels, self.inputs.train_labels[rows], k=5, topk=5,
                                  device=self.runtime.device, prefix="val_")

    def fit_lexical(self, emb: np.ndarray, label_emb: np.ndarray) -> dict[str, Any]:
        """Fits the sparse lexical head (``model.lexical``) of the final model, whose training-query embeddings are
        ``emb`` (rows of ``sampler.rows``) and label vectors ``label_emb``; in the exporting process (rank 0)."""
        cfg = self.cfg.model.lexical
        if dist.rank() != 0:
            return {}
        start = time.perf_counter()
        shortlist, _ = exact_top_k(emb, label_emb, cfg.negatives, self.runtime.device)
        texts = self.inputs.dataset.texts("train")
        head = fit_lexical(cfg, [texts[row] for row in self.sampler.rows], self.inputs.train_labels[self.sampler.rows],
                           shortlist, self.cfg.train.seed)
        self.engine.embedder.lexical = head
        return {"lexical_labels": int(head.trained.sum()), "lexical_weights": int(head.weights.nnz),
                "lexical_s": round(time.perf_counter() - start, 3)}

    def test(self, label_emb: np.ndarray | None = None) -> dict[str, float]:
        """``test_*`` metrics of the final model on the test split, or on its ``eval.sample_size`` sample (the evaluate
        job's rows: the scan is test rows x labels, so at a million labels only a sample is affordable); propensities
        from every TRAIN row, as in the evaluation job (which searches the index instead: see
        :mod:`vixml_ray.train.validation`)."""
        eval_cfg, dataset = self.cfg.eval, self.inputs.dataset
        rows = dataset.sample_rows("test", eval_cfg.sample_size, eval_cfg.sample_seed)
        queries = self._embed("test", rows)
        inv = inverse_propensity(self.inputs.train_labels, eval_cfg.propensity_a, eval_cfg.propensity_b)
        label_emb = self.label_embeddings() if label_emb is None else label_emb
        return validation_metrics(queries, label_emb, self.inputs.test_labels[rows], k=eval_cfg.k,
                                  topk=eval_cfg.topk, device=self.runtime.device, inv_propensity=inv,
                                  filter_pairs=rows_pairs(dataset.filter_pairs(), rows), prefix="test_")

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
                if self.classifier_table is not None:  # replicated: rank 0's copy is every rank's
                    torch.save({"table": self.classifier_table.state_dict(), "summary": self.classifier_summary,
                                "shortlist": None if self.shortlist is None else torch.as_tensor(self.shortlist)},
                               os.path.join(directory, CLASSIFIERS_FILE))
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
        if self.joint:
            saved = torch.load(os.path.join(directory, CLASSIFIERS_FILE), weights_only=True)
            self.classifier_table = ClassifierTable.from_state_dict(saved["table"], self.cfg.train.classifier_loss,
                                                                    self.runtime.device)
            self.classifier_summary = saved["summary"]
            self.shortlist = None if saved["shortlist"] is None else saved["shortlist"].numpy()
        rng_file = os.path.join(directory, f"rng_rank{dist.rank()}.pt")
        if os.path.exists(rng_file):
            _set_rng_state(torch.load(rng_file, weights_only=True))
        log.info("resumed from %s at epoch %d, batch %d, step %d", directory, self.state.epoch, self.state.batch,
                 self.state.step)

    def train_classifiers(self, emb: np.ndarray) -> ClassifierResult:
        """The classifier stage on the training queries' embeddings ``emb`` (rows of ``sampler.rows``) of the final
        encoder (of the initial one when ``joint``), within what is left of ``train.max_minutes``."""
        start = time.perf_counter()
        result = train_classifiers(emb, self.inputs.train_labels[self.sampler.rows], self.cfg.train.classifier_loss,
                                   self.cfg.train.seed, self.runtime.device, stop=self._spent)
        history = result.history
        self.classifier_summary = {
            "classifier_epochs": result.epochs, "classifier_labels": int(result.trained.sum()),
            "classifier_first_loss": history[0]["loss"] if history else None,
            "classifier_final_loss": history[-1]["loss"] if history else None,
            "classifier_s": round(time.perf_counter() - start, 3),
        }
        log.info("classifier stage: %s", self.classifier_summary)
        return result

    # ------------------------------------------------------------------------------------------------- end
    def finish(self) -> dict[str, Any]:
        prototypes, lexical = self.engine.embedder.prototypes is not None, self.cfg.model.lexical.enabled
        emb = self.embed_training_queries() if prototypes or self.final_stage or lexical else None  # final model
        if prototypes:
            self.update_centroids(emb)
        if self.final_stage:
            result = self.train_classifiers(emb)
            self.engine.embedder.set_classifiers(torch.as_tensor(result.weight), torch.as_tensor(result.trained))
        if self.classifier_table is not None:
            self.engine.embedder.set_classifiers(torch.as_tensor(self.classifier_table.weight()),
                                                 torch.as_tensor(self.classifier_table.trained))
        label_emb = self.label_embeddings() if lexical else None  # the final vectors (all ranks)
        lexical_summary = self.fit_lexical(emb, label_emb) if lexical else {}
        self.state.train_s = self._elapsed()  # everything before the test
        test = self.test(label_emb)
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
            "train_side_s": round(self.state.train_s, 3),
            **{k: v for k, v in (history[-1] if history else {}).items() if k.startswith("val_")},
            **self.classifier_summary,
            **({"classifier_joint": True} if self.joint else {}),
            **lexical_summary,
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
    setup_s = 0.0  # training-side time before the loop (inside the budget; a resumed run carries its own)
    if embedder.prototypes is not None or cfg.model.classifiers.enabled or cfg.model.lexical.enabled:
        embedder.label_catalogue = inputs.dataset.label_catalogue()
    if embedder.prototypes is not None:
        if not resume:
            start = time.perf_counter()
            init_prototypes(embedder, inputs, cfg, runtime.device)
            setup_s = time.perf_counter() - start
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
                      prime=PrimeLossConfig.from_train(train) if embedder.prototypes is not None else None,
                      embed_s_per_row=setup_s / inputs.dataset.num_labels if setup_s else None)
    if resume:
        trainer.restore(resume)
    else:
        trainer.state.train_s = setup_s
    return trainer


def train_loop(cfg: Config, runtime: Runtime, make_engine: EngineFactory = torch_engine) -> dict[str, Any]:
    """Trains (or resumes) ``cfg`` on this worker; returns the run summary (the same on every rank)."""
    return build_trainer(cfg, runtime, make_engine).run()
