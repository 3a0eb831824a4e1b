"""One trial of a sweep: a Tune function trainable that builds and fits one Ray Train run (Train V2 pattern).

The trial's function holds no CPU (its workers do, through Ray Train's own placement group); Ray Train's
``TuneReportCallback`` forwards every epoch's report to Tune, with ``epochs_done`` added as ASHA's clock. The Train
run is named after the trial (``trial-<trial id>``) under ``<experiment>/trials/``, so a trial resumed by
``Tuner.restore`` continues its Train run from the newest checkpoint instead of starting over.
"""

from __future__ import annotations

from typing import Any

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


def trial_config(base: Config, space: SearchSpace, trial_config: dict[str, Any], experiment: str) -> Config:
    """The config one trial trains: the base with the trial's choices, its Train runs under the experiment."""
    cfg = apply_choices(base, space.choices(trial_config))
    return replace(cfg, **{"ray.storage_path": storage.join(experiment, TRIALS_DIR)})


def run_trial(config: dict[str, Any], base: Config, space: SearchSpace, experiment: str) -> None:
    """The Tune function trainable (bind ``base``, ``space`` and ``experiment`` with ``tune.with_parameters``)."""
    from ray import tune

    from vixml_ray.train.ray_train import make_trainer

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base, space, config, experiment)
    trainer, _ = make_trainer(cfg, trial_run_name(trial_id), callbacks=[EpochReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error
