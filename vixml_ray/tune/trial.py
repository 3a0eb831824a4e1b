"""One trial of a sweep: a Tune function trainable that builds and fits one Ray Train run (Train V2 pattern).

The trial's function holds no CPU (its workers do, through Ray Train's own placement group); Ray Train's
``TuneReportCallback`` forwards every epoch's report to Tune, with ``epochs_done`` added as ASHA's clock. The Train
run is named after the trial (``trial-<trial id>``) under ``<experiment>/trials/``, so a trial resumed by
``Tuner.restore`` continues its Train run from the newest checkpoint instead of starting over.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from vixml_ray import storage
from vixml_ray.config import Config, replace
from vixml_ray.tune.space import SearchSpace, apply_choices

EPOCHS_DONE = "epochs_done"
TRIALS_DIR = "trials"


def trial_run_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def trial_run_dir(experiment: str, trial_id: str) -> str:
    return storage.join(experiment, TRIALS_DIR, trial_run_name(trial_id))


class EpochReportCallback(TuneReportCallback):
    """Ray Train's Tune callback, adding ``epochs_done`` (the loop's 0-based ``epoch`` + 1). Unlike Tune's
    ``training_iteration``, which restarts at 1 when a trial is resumed, it keeps counting from the checkpoint."""

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        metrics = [{**m, EPOCHS_DONE: int(m["epoch"]) + 1} for m in metrics]
        super().after_report(run_context, metrics, checkpoint)


def trial_config(base: Config, space: SearchSpace, params: dict[str, Any], experiment: str) -> Config:
    """The config one trial trains: the base with the trial's choices, its Train runs under the experiment."""
    cfg = apply_choices(base, space.choices(params))
    return replace(cfg, **{"ray.storage_path": storage.join(experiment, TRIALS_DIR)})


def run_trial(config: dict[str, Any], base: Config, space: SearchSpace, experiment: str) -> None:
    """The Tune function trainable (bind ``base``, ``space`` and ``experiment`` with ``tune.with_parameters``).

    The Train run is driven from a task whose environment names the cluster (``RAY_ADDRESS``), which Ray Train's
    placement-group cleaner (a detached actor) inherits and needs: on a host running several Ray instances it cannot
    find its cluster without it, the placement group of every trial ASHA stops stays behind and the next trials wait
    for its CPUs forever. When Tune stops the trial, the task dies with it (its owner), the Train controller with the
    task, and the cleaner removes the placement group.
    """
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, space, config, experiment)
    env = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    run = _fit_train_run.options(runtime_env=env).remote(cfg, trial_run_name(trial_id), [EpochReportCallback()])
    ray.get(run)


@ray.remote(num_cpus=0, max_retries=0)  # the Train run's own FailureConfig handles worker failures
def _fit_train_run(cfg: Config, run_name: str, callbacks: list[Any]) -> None:
    from vixml_ray.train.ray_train import make_trainer

    trainer, _ = make_trainer(cfg, run_name, callbacks=callbacks)
    result = trainer.fit()
    if result.error is not None:
        raise result.error
