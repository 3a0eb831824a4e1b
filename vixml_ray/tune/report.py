"""The sweep's report, read back from the experiment on storage: one row per trial (its choices, how it ended, its
metrics), a CSV and a markdown table, a PNG comparing the trials, and the best trial's full config as YAML for
``jobs/train.py``; all published together as ``<experiment>/report/``.

A trial ended ``finished`` (it trained every epoch and wrote its test metrics and export), ``stopped`` (ASHA ended it
early) or ``error``.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from vixml_ray import storage
from vixml_ray.config import Config, save_config
from vixml_ray.train.ray_train import SUMMARY
from vixml_ray.tune.space import SearchSpace, apply_choices
from vixml_ray.tune.trial import EPOCHS_DONE, trial_run_dir

REPORT_DIR = "report"
CSV_FILE, MARKDOWN_FILE, PLOT_FILE, BEST_CONFIG_FILE = "results.csv", "results.md", "trials.png", "best.yaml"
EPOCH_METRICS = ("val_P@1", "val_P@5", "loss")
TEST_METRICS = ("test_P@1", "test_P@5")
FINISHED, STOPPED, ERROR = "finished", "stopped", "error"
ENDED = (FINISHED, STOPPED, ERROR)


@dataclass
class TrialRow:
    trial_id: str
    status: str
    choices: dict[str, Any]
    epochs: int
    metrics: dict[str, float]  # the last epoch's metrics, and the test metrics of a finished trial
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epochs done, sweep metric)
    run_dir: str = ""


def collect_rows(experiment: str, space: SearchSpace, metric: str) -> list[TrialRow]:
    """One row per trial of the Tune experiment at ``experiment``."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(experiment)
    frames = analysis.trial_dataframes
    columns = tuple(dict.fromkeys((metric, *EPOCH_METRICS)))
    rows = []
    for trial in analysis.trials:
        last = trial.last_result or {}
        epochs = int(last.get(EPOCHS_DONE, 0))
        run_dir = trial_run_dir(experiment, trial.trial_id)
        summary_path = storage.join(run_dir, SUMMARY)
        summary = storage.read_json(summary_path) if storage.exists(summary_path) else None
        metrics = {k: float(last[k]) for k in columns if isinstance(last.get(k), (int, float))}
        if summary is not None:
            metrics.update({k: float(summary[k]) for k in TEST_METRICS if k in summary})
        rows.append(TrialRow(trial.trial_id, _status(trial.status, epochs, summary), space.choices(trial.config),
                             epochs, metrics, _curve(frames.get(trial.trial_id), metric), run_dir))
    return rows


def _status(tune_status: str, epochs: int, summary: dict[str, Any] | None) -> str:
    """How a trial ended, from Tune's status, the epochs Tune saw and its Train run's summary (written at its end)."""
    if tune_status == "ERROR":
        return ERROR
    if tune_status != "TERMINATED":
        return tune_status.lower()  # pending or running: the sweep was interrupted
    if summary is not None and epochs >= summary["epochs"]:
        return FINISHED
    return STOPPED  # by ASHA (its run may have finished the last epochs before the stop arrived)


def _curve(frame: Any, metric: str) -> list[tuple[int, float]]:
    if frame is None or frame.empty or metric not in frame or EPOCHS_DONE not in frame:
        return []
    points = frame[[EPOCHS_DONE, metric]].dropna().drop_duplicates(EPOCHS_DONE, keep="last")  # a resume re-reports
    return sorted((int(e), float(v)) for e, v in points.itertuples(index=False))


def ranked(rows: Sequence[TrialRow], metric: str, mode: str) -> list[TrialRow]:
    """Best first by the last value of ``metric``; trials without one last."""
    def scored(row: TrialRow) -> bool:
        return not math.isnan(row.metrics.get(metric, math.nan))

    sign = -1.0 if mode == "max" else 1.0
    return (sorted(filter(scored, rows), key=lambda row: sign * row.metrics[metric])
            + [row for row in rows if not scored(row)])


def format_value(value: Any) -> str:
    """A choice as a short cell: prompt parts joined by '+', mappings as k=v, floats in 4 significant digits."""
    if isinstance(value, (list, tuple)):
        return "+".join(value) if value and all(isinstance(v, str) for v in value) else str(list(value))
    if isinstance(value, dict):
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_csv(rows: Sequence[TrialRow], keys: Sequence[str], metrics: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["trial", "status", *keys, "epochs", *metrics, "run_dir"])
    for row in rows:
        writer.writerow([row.trial_id, row.status, *(format_value(row.choices[k]) for k in keys), row.epochs,
                         *(row.metrics.get(m, "") for m in metrics), row.run_dir])
    return out.getvalue()


def to_markdown(rows: Sequence[TrialRow], keys: Sequence[str], metrics: Sequence[str], title: str) -> str:
    header = ["#", "trial", "status", *keys, "epochs", *metrics]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, 1):
        cells = [str(rank), row.trial_id, row.status, *(format_value(row.choices[k]) for k in keys), str(row.epochs),
                 *(f"{row.metrics[m]:.4g}" if m in row.metrics else "" for m in metrics)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[TrialRow], keys: Sequence[str], metric: str) -> bytes:
    """PNG: the metric per epoch of every trial (stopped ones dashed), and every trial's last value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = {FINISHED: "tab:green", STOPPED: "tab:orange", ERROR: "tab:red"}
    labels = [", ".join(format_value(row.choices[k]) for k in keys) for row in rows]
    fig, (curves, bars) = plt.subplots(1, 2, figsize=(13, 0.9 + 0.45 * max(4, len(rows))),
                                       gridspec_kw={"width_ratios": [1, 1.3]})
    for row, label in zip(rows, labels):
        if row.curve:
            curves.plot(*zip(*row.curve), marker="o", linestyle="--" if row.status == STOPPED else "-", label=label)
    curves.set_xlabel("epochs")
    curves.xaxis.set_major_locator(MaxNLocator(integer=True))
    curves.set_ylabel(metric)
    curves.set_title(f"{metric} per epoch (dashed: stopped by ASHA)")
    curves.grid(alpha=0.3)
    if any(row.curve for row in rows):
        curves.legend(fontsize=7)
    y = list(range(len(rows)))[::-1]
    bars.barh(y, [row.metrics.get(metric, 0.0) for row in rows], color=[colours.get(r.status, "grey") for r in rows])
    bars.set_yticks(y, labels, fontsize=7)
    bars.set_xlabel(f"last {metric}")
    bars.set_title("trials, best first (green finished, orange stopped, red error)")
    bars.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_report(base: Config, space: SearchSpace, experiment: str, rows: Sequence[TrialRow]) -> dict[str, Any]:
    """Writes ``<experiment>/report/`` (CSV, markdown, PNG, the best trial's config) for the trials ``rows`` of
    :func:`collect_rows`; returns the sweep's summary."""
    metric, mode = base.tune.metric, base.tune.mode
    rows = ranked(rows, metric, mode)
    if not rows or math.isnan(rows[0].metrics.get(metric, math.nan)):
        raise RuntimeError(f"no trial of {experiment} reported '{metric}' (see the trials' errors in {experiment})")
    best = rows[0]
    keys = space.keys
    metrics = list(dict.fromkeys((metric, *EPOCH_METRICS, *TEST_METRICS)))
    report = storage.join(experiment, REPORT_DIR)
    with storage.publish(report, overwrite=True) as staging:
        storage.write_text(storage.join(staging, CSV_FILE), to_csv(rows, keys, metrics))
        storage.write_text(storage.join(staging, MARKDOWN_FILE),
                           to_markdown(rows, keys, metrics, f"Sweep {base.tune.name}: trials by {metric}"))
        storage.write_bytes(storage.join(staging, PLOT_FILE), plot(rows, keys, metric))
        save_config(apply_choices(base, best.choices), storage.join(staging, BEST_CONFIG_FILE))
    final = storage.resolve(report)
    return {
        "trials": len(rows),
        "finished": sum(r.status == FINISHED for r in rows),
        "early_stopped": sum(r.status == STOPPED for r in rows),
        "errors": sum(r.status == ERROR for r in rows),
        "metric": metric,
        "best_trial": best.trial_id,
        "best_metric": best.metrics[metric],
        "best_choices": {k: format_value(v) for k, v in best.choices.items()},
        "best_config": storage.join(final, BEST_CONFIG_FILE),
        "results_csv": storage.join(final, CSV_FILE),
        "results_md": storage.join(final, MARKDOWN_FILE),
        "plot": storage.join(final, PLOT_FILE),
        "experiment": experiment,
    }

