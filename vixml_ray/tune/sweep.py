"""The sweep driver: Ray up, the dataset prepared once, then a Tuner of :func:`~vixml_ray.tune.trial.run_trial` trials
under ASHA, new or restored, and the report.

Concurrency comes from the cluster's resources: a trial's driver reserves memory only, its Train workers
``train.num_workers x train.cpus_per_worker`` CPUs (and a GPU each with ``train.use_gpu``), so as many trials run at
once as fit beside ``tune.reserve_cpus`` and no trial's workers wait on another's. Running the same config again
(same ``tune.name``) restores the experiment with ``Tuner.restore``: finished trials are kept as they are, interrupted
ones continue from their Train checkpoints, errored ones are retried from theirs.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import ray
from omegaconf import OmegaConf
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from vixml_ray import storage
from vixml_ray.config import Config, flatten, save_config, to_yaml
from vixml_ray.errors import ConfigError
from vixml_ray.pipeline import ensure_dataset
from vixml_ray.ray_utils import init_ray_for
from vixml_ray.train.ray_train import prepare_shared
from vixml_ray.tune.report import ENDED, collect_rows, write_report
from vixml_ray.tune.space import SearchSpace, search_space
from vixml_ray.tune.trial import EPOCHS_DONE, run_trial

log = logging.getLogger(__name__)

SWEEP_CONFIG = "sweep.yaml"  # the config the experiment was started with (a restore must match it)
DEFINING = ("data.", "model.", "prompt.", "train.", "tune.")  # the config sections that define a sweep's trials


def experiment_path(cfg: Config) -> str:
    """``<ray.storage_path or out_dir>/<tune.name>`` (local paths made absolute)."""
    root = cfg.ray.storage_path or cfg.out_dir
    if "://" not in root:
        root = os.path.abspath(root)
    return storage.join(root, cfg.tune.name)


def trial_concurrency(cfg: Config, resources: Mapping[str, float]) -> int:
    """How many trials fit at once in ``resources`` (``ray.cluster_resources()``) beside ``tune.reserve_cpus``,
    capped by ``tune.max_concurrent``."""
    train, tune_cfg = cfg.train, cfg.tune
    cpus = resources.get("CPU", 0.0) - tune_cfg.reserve_cpus
    trial_cpus = train.num_workers * train.cpus_per_worker
    limits = [] if tune_cfg.max_concurrent is None else [tune_cfg.max_concurrent]
    if trial_cpus > 0:
        if cpus < trial_cpus:
            raise ConfigError(f"a trial needs {trial_cpus:g} CPUs (train.num_workers x train.cpus_per_worker) but the "
                              f"cluster has {cpus:g} to give (tune.reserve_cpus={tune_cfg.reserve_cpus:g} kept free)")
        limits.append(int(cpus // trial_cpus))
    if train.use_gpu:
        gpus = resources.get("GPU", 0.0)
        if gpus < train.num_workers:
            raise ConfigError(f"a trial needs {train.num_workers} GPUs (train.num_workers with train.use_gpu) but the "
                              f"cluster has {gpus:g}")
        limits.append(int(gpus // train.num_workers))
    return max(1, min(limits)) if limits else 1


def check_sweep_config(cfg: Config) -> SearchSpace:
    """The sweep's space, after the checks a sweep adds to the config's own."""
    if cfg.train.num_workers < 1:
        raise ConfigError("invalid value for 'train.num_workers': a sweep's trials are Ray Train runs, so at least 1")
    if cfg.train.eval_every_epochs != 1:
        raise ConfigError(f"invalid value for 'train.eval_every_epochs': {cfg.train.eval_every_epochs} (a sweep needs "
                          f"'{cfg.tune.metric}' after every epoch for ASHA: set it to 1)")
    if cfg.tune.metric.startswith("val_") and cfg.data.validation_fraction <= 0:
        raise ConfigError(f"invalid value for 'data.validation_fraction': 0 leaves no validation split for "
                          f"'{cfg.tune.metric}'")
    if cfg.tune.grace_period > cfg.train.epochs:
        raise ConfigError(f"invalid value for 'tune.grace_period': {cfg.tune.grace_period} exceeds 'train.epochs'="
                          f"{cfg.train.epochs}")
    return search_space(cfg)


def run_sweep(cfg: Config) -> dict[str, Any]:
    """The sweep job: runs (or resumes) the sweep of ``cfg`` and writes its report; returns the summary (see
    :func:`vixml_ray.tune.report.write_report`), or ``{"interrupted": true, ...}`` when it was interrupted."""
    space = check_sweep_config(cfg)
    start = time.perf_counter()
    experiment = experiment_path(cfg)
    resumed = tune.Tuner.can_restore(experiment)
    if resumed:
        _check_same_sweep(cfg, experiment)
    else:
        save_config(cfg, storage.join(experiment, SWEEP_CONFIG))
    init_ray_for(cfg)
    base = ensure_dataset(cfg)  # once here, so that trials never race to build it
    prepare_shared(base)  # the tokenised texts and tiny model files every trial reads
    trainable = _trainable(base, space, experiment)
    if resumed:
        log.info("resuming the sweep %s", experiment)
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _new_tuner(base, space, experiment, trainable)
    tuner.fit()
    rows = collect_rows(experiment, space, base.tune.metric)  # as saved: an interrupted run's trials stay unfinished
    unfinished = space.num_trials(base.tune.num_samples) - sum(row.status in ENDED for row in rows)
    if unfinished:
        log.warning("the sweep was interrupted with %d trials unfinished: run the same command to resume it",
                    unfinished)
        return {"interrupted": True, "experiment": experiment, "unfinished": unfinished}
    summary = write_report(base, space, experiment, rows)
    return {**summary, "resumed": resumed, "seconds": round(time.perf_counter() - start, 1)}


def _trainable(base: Config, space: SearchSpace, experiment: str) -> Any:
    bound = tune.with_parameters(run_trial, base=base, space=space, experiment=experiment)
    # memory only: a CPU here would be one less for the trial's own workers (a zero-resource request is rejected)
    return tune.with_resources(bound, {"memory": base.tune.trial_memory_mb * 2**20})


def _new_tuner(base: Config, space: SearchSpace, experiment: str, trainable: Any) -> Any:
    settings = base.tune
    concurrency = trial_concurrency(base, ray.cluster_resources())
    log.info("sweep %s: up to %d trials at once", experiment, concurrency)
    scheduler = ASHAScheduler(time_attr=EPOCHS_DONE, max_t=base.train.epochs, grace_period=settings.grace_period,
                              reduction_factor=settings.reduction_factor,
                              stop_last_trials=False)  # a trial reaching its last epoch finishes (test metrics, export)
    root, name = experiment.rsplit("/", 1)
    return tune.Tuner(
        trainable,
        param_space=space.param_space(),
        tune_config=tune.TuneConfig(metric=settings.metric, mode=settings.mode, scheduler=scheduler,
                                    num_samples=settings.num_samples, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(name=name, storage_path=root, callbacks=[TrialLog(settings.metric)], verbose=1),
    )


def _check_same_sweep(cfg: Config, experiment: str) -> None:
    """A restore keeps the experiment's own space and settings: refuse to resume it under a config whose trials
    would differ (the sections in :data:`DEFINING`)."""
    saved_path = storage.join(experiment, SWEEP_CONFIG)
    if not storage.exists(saved_path):
        raise ConfigError(f"{experiment} holds a Tune experiment that is not a vixml-ray sweep (no {SWEEP_CONFIG})")
    saved = flatten(OmegaConf.to_container(OmegaConf.create(storage.read_text(saved_path))))
    current = flatten(OmegaConf.to_container(OmegaConf.create(to_yaml(cfg))))
    for key in sorted(set(saved) | set(current)):
        if not key.startswith(DEFINING) or saved.get(key) == current.get(key):
            continue
        raise ConfigError(f"{experiment} is a sweep of another config ('{key}' was {saved.get(key)!r}, now "
                          f"{current.get(key)!r}): pick another tune.name or remove that directory")


class TrialLog(tune.Callback):
    """One log line per trial that ends (finished or stopped by ASHA, or failed), with its last metric."""

    def __init__(self, metric: str):
        self.metric = metric

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        log.info("trial %s done after %s epochs: %s=%s", trial.trial_id, result.get(EPOCHS_DONE, 0), self.metric,
                 result.get(self.metric))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        log.warning("trial %s failed (see %s)", trial.trial_id, trial.path)
