"""Distributed training on Ray Train (V2): the per-worker loop of :mod:`vixml_ray.train.loop` on N workers.

The driver (:func:`fit`) prepares what every worker shares (the tiny model files, the token cache), then runs a
``TorchTrainer`` whose workers each run :func:`train_loop` with a :class:`RayTrainRuntime` (metrics and checkpoints
through ``ray.train.report``, resume through ``ray.train.get_checkpoint``) and the engine chosen by
``train.engine``: DDP (:class:`~vixml_ray.train.engine.TorchEngine`) or DeepSpeed ZeRO-2/3
(:class:`~vixml_ray.train.deepspeed_engine.DeepSpeedEngine`). CPU workers use gloo, GPU workers NCCL.

Run directory: ``<ray.storage_path or out_dir>/<run name>/`` holds Ray Train's checkpoints, ``config.yaml``,
``metrics.jsonl``, TensorBoard events, ``curves.png``, ``summary.json`` and the inference ``export/``. Running the
same config again with the same run name resumes from the newest checkpoint (Ray Train restores it).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any, Sequence

import torch

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.errors import ConfigError
from vixml_ray.train import dist
from vixml_ray.train.engine import Engine, TorchEngine
from vixml_ray.train.loop import train_loop
from vixml_ray.train.metrics_log import MetricsLog

log = logging.getLogger(__name__)

SUMMARY = "summary.json"


def make_engine(cfg: Config, embedder: Any, total_steps: int, device: torch.device) -> Engine:
    """The engine ``train.engine`` names."""
    if cfg.train.engine == "deepspeed":
        from vixml_ray.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(cfg, embedder, total_steps, device)
    return TorchEngine(embedder, cfg.train, total_steps, device)


class RayTrainRuntime:
    """The loop's side effects inside a Ray Train worker."""

    def __init__(self, run_dir: str):
        import ray.train.torch

        self.device = ray.train.torch.get_device()
        self.run_dir = run_dir
        self.output_dir = storage.join(run_dir, "export")
        self.metrics_log = MetricsLog(run_dir) if dist.rank() == 0 else None
        self._restored: str | None = None

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None) -> None:
        import ray.train

        if self.metrics_log is not None:
            self.metrics_log.append(metrics)
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> str | None:
        """Ray Train's newest checkpoint (all ranks' parts merged) as a local directory."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.mkdtemp(prefix="vixml-restore-")
        return checkpoint.to_directory(self._restored)

    def close(self) -> None:
        if self._restored:
            shutil.rmtree(self._restored, ignore_errors=True)
        if self.metrics_log is not None:
            self.metrics_log.close()


def _worker(config: dict[str, Any]) -> None:
    """The ``train_loop_per_worker`` of the TorchTrainer."""
    cfg: Config = config["cfg"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    runtime = RayTrainRuntime(config["run_dir"])
    start = time.perf_counter()
    try:
        summary = train_loop(cfg, runtime, make_engine)
        # the worker's whole loop (inputs, model, epochs, evaluation, export): the rest of fit() is Ray's start-up
        summary["loop_s"] = time.perf_counter() - start
        if dist.rank() == 0:
            storage.write_json(storage.join(config["run_dir"], SUMMARY), summary)
            if runtime.metrics_log is not None:
                runtime.metrics_log.plot()
    finally:
        runtime.close()


def prepare_shared(cfg: Config) -> None:
    """What every worker reads and nobody should build concurrently: the tiny model files and the token cache."""
    from vixml_ray.model import load_tokenizer
    from vixml_ray.train.inputs import cached_tokens
    from vixml_ray.data import open_dataset

    if not cfg.data.dataset:
        raise ConfigError("'data.dataset' is not set: train needs a prepared dataset directory")
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    dataset = open_dataset(cfg.data.dataset)
    for split in ("train", "test", "label"):
        cached_tokens(cfg, dataset, split, tokenizer)


def make_trainer(cfg: Config, run_name: str, callbacks: Sequence[Any] = ()) -> tuple[Any, str]:
    """The ``TorchTrainer`` of one training run and its run directory (``callbacks`` go into its RunConfig, e.g.
    Tune's ``TuneReportCallback``). ``cfg`` must already name a prepared dataset."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = _absolute_paths(cfg)
    storage_path = cfg.ray.storage_path or cfg.out_dir
    run_dir = storage.join(storage_path, run_name)
    prepare_shared(cfg)
    save_config(cfg, storage.join(run_dir, "config.yaml"))
    train = cfg.train
    trainer = TorchTrainer(
        train_loop_per_worker=_worker,
        train_loop_config={"cfg": cfg, "run_dir": run_dir},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.use_gpu,
            resources_per_worker={"CPU": train.cpus_per_worker, **({"GPU": 1} if train.use_gpu else {})},
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_to_keep),
            failure_config=FailureConfig(max_failures=train.max_failures),
            callbacks=list(callbacks),
        ),
        torch_config=TorchConfig(backend="nccl" if train.use_gpu else "gloo"),
    )
    return trainer, run_dir


def fit(cfg: Config, run_name: str = "train") -> dict[str, Any]:
    """Trains ``cfg`` with Ray Train on ``train.num_workers`` workers (0 = in the driver process); resumes the run
    ``run_name`` if it has a checkpoint. Returns the summary (``checkpoint`` = the inference export's path)."""
    trainer, run_dir = make_trainer(cfg, run_name)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return read_summary(run_dir)


def read_summary(run_dir: str) -> dict[str, Any]:
    return storage.read_json(storage.join(run_dir, SUMMARY))


def _absolute_paths(cfg: Config) -> Config:
    """Workers may run in another working directory (``ray job submit --working-dir``): make local paths absolute."""
    from vixml_ray.config import replace

    changes = {}
    for key, value in (("out_dir", cfg.out_dir), ("cache_dir", cfg.cache_dir), ("data.dataset", cfg.data.dataset),
                       ("ray.storage_path", cfg.ray.storage_path)):
        if value and "://" not in value and not os.path.isabs(value):
            changes[key] = os.path.abspath(value)
    return replace(cfg, **changes) if changes else cfg
