"""Ray Tune sweeps: the search space (presets, specs, errors naming the key), trial concurrency from the cluster's
resources, and end to end: a sweep over prompt variants with the tiny model is interrupted, resumed with
``Tuner.restore`` without rerunning its finished trials, ASHA stops trials early, and the best config trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from vixml_ray.config import load_config
from vixml_ray.errors import ConfigError
from vixml_ray.tune import PRESETS, apply_choices, search_space
from vixml_ray.tune.presets import PROMPT_ABLATION

ROOT = Path(__file__).resolve().parent.parent


def _cfg(*overrides: str):
    return load_config("sweep-tiny", list(overrides))


def _tiny(*overrides: str):
    """The tiny training config with no search space of its own."""
    return load_config("tiny", ["train.num_workers=1", *overrides])


# ----------------------------------------------------------------------------------------------- search space
def test_presets_merge_in_order_and_space_wins() -> None:
    cfg = _tiny("tune.presets=[prompt,lora]", "tune.space.model.lora.r.grid=[4,8]")
    space = search_space(cfg)
    assert space.keys == ["prompt.sequence", "model.lora.r", "model.lora.alpha"]
    params = space.param_space()
    assert params["prompt.sequence"] == {"grid_search": PROMPT_ABLATION}
    assert params["model.lora.r"] == {"grid_search": [4, 8]}
    assert "model.lora.alpha" not in params  # same_as is derived per trial, not sampled
    assert space.num_trials(num_samples=2) == 7 * 2 * 2
    choices = space.choices({"prompt.sequence": ["E"], "model.lora.r": 8})
    assert choices == {"prompt.sequence": ["E"], "model.lora.r": 8, "model.lora.alpha": 8}


def test_every_preset_is_valid_on_the_tiny_config() -> None:
    for name in PRESETS:
        assert search_space(_tiny(f"tune.presets=[{name}]")).keys == list(PRESETS[name])


def test_ranges_become_tune_domains() -> None:
    from ray.tune.search.sample import Float, Integer

    space = search_space(_tiny("tune.space.train.lr_backbone.loguniform=[1e-4,1e-2]",
                              "tune.space.train.cluster.initial_size.randint=[4,17]"))
    params = space.param_space()
    assert isinstance(params["train.lr_backbone"], Float) and params["train.lr_backbone"].lower == 1e-4
    size = params["train.cluster.initial_size"]
    assert isinstance(size, Integer) and (size.lower, size.upper) == (4, 17)


@pytest.mark.parametrize("overrides, message", [
    (["tune.space.train.lr_bakbone.grid=[0.1]"], r"'train\.lr_bakbone'.*Did you mean: 'lr_backbone'"),
    (["tune.space.model.num_images.grid=[1,4]"], r"'model\.num_images' value 4 is invalid.*must be <= 3"),
    (["tune.space.prompt.sequence.grid=[[T1,X]]"], r"'prompt\.sequence' value \['T1', 'X'\].*unknown part 'X'"),
    (["tune.space.train.lr_backbone.loguniform=[0,1]"], r"'train\.lr_backbone'.*loguniform' needs low > 0"),
    (["tune.space.train.lr_backbone.uniform=[0.1]"], r"'train\.lr_backbone'.*needs \[low, high\]"),
    (["tune.space.train.lr_backbone.between=[1,2]"], r"'train\.lr_backbone'.*unknown spec 'between'"),
    (["tune.space.train.num_workers.grid=[1,2]"], r"'train\.num_workers' cannot be swept"),
    (["tune.space.data.synthetic.seed.grid=[1,2]"], r"'data\.synthetic\.seed' cannot be swept"),
    (["tune.space.model.lora.alpha.same_as=model.lora.r"], r"'model\.lora\.alpha': same_as 'model\.lora\.r'"),
    (["tune.presets=[prompts]"], r"'tune\.presets': unknown preset 'prompts'"),
    ([], r"nothing to sweep"),
])
def test_bad_spaces_fail_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        search_space(_tiny(*overrides))


def test_a_text_only_prompt_turns_images_off() -> None:
    cfg = _cfg()
    assert cfg.model.use_images
    assert not apply_choices(cfg, {"prompt.sequence": ["T1", "E", "EOS"]}).model.use_images
    with_images = apply_choices(cfg, {"prompt.sequence": ["V", "E", "EOS"], "model.lora.r": 4})
    assert with_images.model.use_images and with_images.model.lora.r == 4


# ----------------------------------------------------------------------------------------------- the driver
def test_concurrency_fits_trials_into_the_cluster() -> None:
    from vixml_ray.tune.sweep import trial_concurrency

    assert trial_concurrency(_cfg(), {"CPU": 2.0}) == 2  # 1 worker x 1 CPU per trial
    assert trial_concurrency(_cfg("tune.reserve_cpus=1"), {"CPU": 2.0}) == 1
    assert trial_concurrency(_cfg("train.num_workers=2"), {"CPU": 5.0}) == 2
    assert trial_concurrency(_cfg("tune.max_concurrent=3"), {"CPU": 16.0}) == 3
    assert trial_concurrency(_cfg("train.use_gpu=true", "train.num_workers=2"), {"CPU": 64.0, "GPU": 4.0}) == 2
    with pytest.raises(ConfigError, match=r"a trial needs 4 CPUs.*has 2"):
        trial_concurrency(_cfg("train.num_workers=4"), {"CPU": 2.0})
    with pytest.raises(ConfigError, match=r"needs 2 GPUs"):
        trial_concurrency(_cfg("train.use_gpu=true", "train.num_workers=2"), {"CPU": 8.0, "GPU": 1.0})


@pytest.mark.parametrize("overrides, message", [
    (["train.eval_every_epochs=2"], r"'train\.eval_every_epochs'.*set it to 1"),
    (["train.num_workers=0"], r"'train\.num_workers'.*at least 1"),
    (["data.validation_fraction=0"], r"'data\.validation_fraction'"),
    (["tune.grace_period=5"], r"'tune\.grace_period': 5 exceeds 'train\.epochs'=3"),
])
def test_sweep_settings_are_checked(overrides, message) -> None:
    from vixml_ray.tune.sweep import check_sweep_config

    with pytest.raises(ConfigError, match=message):
        check_sweep_config(_cfg(*overrides))


# ----------------------------------------------------------------------------------------------- end to end
DONE = re.compile(r"trial (\S+) done after")


def _job_overrides(root: Path) -> list[str]:
    return [f"out_dir={root / 'out'}", f"cache_dir={root / 'cache'}"]


def _interrupt_after_first_trial(overrides: list[str], address: str, log: Path) -> tuple[list[str], dict]:
    """Runs ``jobs/sweep.py`` as a second driver on the session's Ray, sends it SIGINT (Ctrl+C) once a trial is done,
    and returns the ids of the trials it reported done and its final JSON line (its output goes to ``log``)."""
    env = {**os.environ, "RAY_ADDRESS": address}
    proc = subprocess.Popen([sys.executable, "jobs/sweep.py", "--config", "sweep-tiny", *overrides], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    first_done = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            if DONE.search(line):
                first_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        if not first_done.wait(timeout=900):
            pytest.fail("no trial finished:\n" + "".join(lines[-60:]))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=10)
    log.write_text("".join(lines))
    done = [m.group(1) for m in map(DONE.search, lines) if m]
    summaries = [line for line in lines if line.startswith("{")]
    assert summaries, "no JSON summary from the interrupted job:\n" + "".join(lines[-60:])
    return done, json.loads(summaries[-1])


@pytest.fixture(scope="module")
def resumed_sweep(ray_session, tmp_path_factory):
    """A sweep interrupted after its first finished trial, then resumed in this process."""
    from vixml_ray.tune.sweep import experiment_path, run_sweep
    from vixml_ray.tune.trial import trial_run_dir

    root = tmp_path_factory.mktemp("sweep")
    overrides = _job_overrides(root)
    cfg = _cfg(*overrides)
    address = ray_session.get_runtime_context().gcs_address
    done, interrupted = _interrupt_after_first_trial(overrides, address, root / "interrupted-job.log")
    experiment = experiment_path(cfg)
    before = {t: Path(trial_run_dir(experiment, t), "metrics.jsonl").read_text() for t in done}
    summary = run_sweep(cfg)
    return {"cfg": cfg, "root": root, "done": done, "interrupted": interrupted, "before": before,
            "summary": summary, "experiment": experiment}


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_without_rerunning_finished_trials(resumed_sweep) -> None:
    from vixml_ray.tune.trial import trial_run_dir

    interrupted, summary = resumed_sweep["interrupted"], resumed_sweep["summary"]
    assert interrupted["interrupted"] and interrupted["unfinished"] >= 1, interrupted
    assert summary["resumed"] and summary["trials"] == 4, summary
    assert summary["finished"] + summary["early_stopped"] == 4 and summary["errors"] == 0, summary
    for trial_id, metrics in resumed_sweep["before"].items():  # not one more epoch was trained or reported
        assert Path(trial_run_dir(resumed_sweep["experiment"], trial_id), "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_a_sweep_is_not_resumed_under_another_config(resumed_sweep) -> None:
    from vixml_ray.tune.sweep import run_sweep

    changed = _cfg(*_job_overrides(resumed_sweep["root"]), "train.lr_backbone=0.001")
    with pytest.raises(ConfigError, match=r"another config \('train\.lr_backbone' was 0\.002, now 0\.001\)"):
        run_sweep(changed)


@pytest.mark.slow
def test_asha_stops_trials_and_the_best_config_trains(resumed_sweep, ray_session) -> None:
    import csv

    from vixml_ray.pipeline import run_training

    summary, cfg = resumed_sweep["summary"], resumed_sweep["cfg"]
    assert summary["trials"] >= 4 and summary["early_stopped"] >= 1, summary
    with open(summary["results_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["prompt.sequence"] for r in rows) == sorted(
        "+".join(s) for s in cfg.tune.space["prompt.sequence"]["grid"])
    assert float(rows[0]["val_P@1"]) == summary["best_metric"] == max(float(r["val_P@1"]) for r in rows)
    assert {r["status"] for r in rows} <= {"finished", "stopped"}
    assert "| 1 |" in Path(summary["results_md"]).read_text()
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    best = load_config(summary["best_config"], ["train.epochs=1", f"out_dir={resumed_sweep['root'] / 'best'}"])
    assert "+".join(best.prompt.sequence) == summary["best_choices"]["prompt.sequence"]
    trained = run_training(best, run_name="best")
    assert trained["steps"] > 0 and "test_P@1" in trained
