"""The one contract of every job, run as the user runs them (subprocesses): a bad config key, a missing input
path or a malformed input line exits 2 with one ``error:`` line naming the key, path or file:line, before Ray starts;
a bug exits 1 with its traceback; ``vixml-ray --help`` lists the jobs."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from vixml_ray.cli import JOBS

ROOT = Path(__file__).resolve().parent.parent
ENV = {  # what the Makefile exports; PYTHONPATH: this checkout's package
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TORCH_EXTENSIONS_DIR": str(ROOT / ".cache" / "torch_extensions"),
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
}
JOB_NAMES = ["demo", "embed_images", "evaluate", "predict", "prepare_data", "refresh_labels", "serve", "sweep",
             "train"]


def run(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def user_error(proc: subprocess.CompletedProcess, nothing_ran: bool = True) -> str:
    """The one ``error:`` line of a user error: exit 2, no traceback, the last stderr line (the only one when the
    job failed before running anything, else after its log lines)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error: ")] == lines[-1:], proc.stderr
    assert len(lines) == 1 or not nothing_ran, proc.stderr
    return lines[-1]


def test_the_registry_holds_every_job_and_a_shim_each() -> None:
    assert sorted(JOBS) == JOB_NAMES
    for name in JOB_NAMES:
        assert f'job_main("{name}")' in (ROOT / "jobs" / f"{name}.py").read_text()


def job_args(name: str, tmp: Path) -> list[str]:
    """Arguments with which ``name`` would get as far as its inputs (all of them missing under ``tmp``)."""
    missing = str(tmp / "missing")
    return {
        "demo": [],
        "embed_images": ["--dataset", missing],
        "evaluate": ["--checkpoint", missing, "--dataset", missing],
        "predict": ["--checkpoint", missing, "--index", missing, "--queries", missing, "--out", str(tmp / "o.jsonl")],
        "prepare_data": ["--source", missing, "--out", str(tmp / "out")],
        "refresh_labels": ["--checkpoint", missing, "--dataset", missing, "--out", str(tmp / "index")],
        "serve": ["--checkpoint", missing, "--index", missing],
        "sweep": ["--config", "sweep-tiny"],
        "train": ["--config", "tiny"],
    }[name]


@pytest.mark.parametrize("name", JOB_NAMES)
def test_a_misspelled_config_key_is_named_before_any_input_is_read(name: str, tmp_path: Path) -> None:
    line = user_error(run(f"jobs/{name}.py", *job_args(name, tmp_path), "train.epoch=3"))
    assert "unknown config key 'train.epoch'" in line and "did you mean 'train.epochs'?" in line


@pytest.mark.parametrize("name", JOB_NAMES)
def test_a_missing_input_path_is_named(name: str, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-such-dir")
    present = str(tmp_path)
    argv = {
        "demo": [f"data.dataset={missing}"],
        "embed_images": ["--dataset", missing],
        "evaluate": ["--checkpoint", present, "--dataset", missing],
        "predict": ["--checkpoint", present, "--index", present, "--queries", missing, "--out", str(tmp_path / "o")],
        "prepare_data": ["--source", missing, "--out", str(tmp_path / "out")],
        "refresh_labels": ["--checkpoint", missing, "--dataset", present, "--out", str(tmp_path / "index")],
        "serve": ["--checkpoint", present, "--index", missing],
        "sweep": ["--config", "sweep-tiny", f"data.dataset={tmp_path / 'ds'}", f"data.source={missing}"],
        "train": ["--config", "tiny", f"data.dataset={missing}"],
    }[name]
    line = user_error(run("-m", "vixml_ray.cli", name, *argv))
    assert missing in line


def _gz(path: Path, lines: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))


def _raw_source(root: Path) -> Path:
    root.mkdir()
    _gz(root / "lbl.json.gz", [json.dumps({"uid": f"l{i}", "title": f"label {i}"}) for i in range(2)])
    _gz(root / "trn.json.gz", [json.dumps({"uid": f"a{i}", "title": "item", "target_ind": [i % 2]}) for i in range(3)])
    _gz(root / "tst.json.gz", [json.dumps({"uid": "t0", "title": "item", "target_ind": [1]})])
    return root


@pytest.mark.parametrize("bad_file, line, expected", [
    ("trn.json.gz", 2, "malformed JSON line"),
    ("trn_X_Y.txt", 3, "bad 'label:value' pair"),
    ("filter_labels_test.txt", 2, "expected 'test_row label'"),
])
def test_prepare_data_names_the_file_and_line_of_a_malformed_line(tmp_path: Path, bad_file: str, line: int,
                                                                  expected: str) -> None:
    source = _raw_source(tmp_path / "raw")
    if bad_file == "trn.json.gz":
        rows = [json.dumps({"uid": "a0", "title": "item", "target_ind": [0]}), '{"uid": "a1", "title": ']
        _gz(source / bad_file, rows)
    elif bad_file == "trn_X_Y.txt":
        (source / "trn_X_Y.txt").write_text("3 2\n0:1\n1:x\n0:1\n")
        (source / "tst_X_Y.txt").write_text("1 2\n1:1\n")
    else:
        (source / bad_file).write_text("0 1\n0 1 2\n")
    err = user_error(run("jobs/prepare_data.py", "--source", str(source), "--out", str(tmp_path / "out")),
                     nothing_ran=False)
    assert f"{source / bad_file}:{line}: {expected}" in err
    assert not (tmp_path / "out").exists()


def test_a_bug_keeps_its_traceback_and_exits_1() -> None:
    script = ("from vixml_ray.cli import run_job\n"
              "def main():\n"
              "    raise RuntimeError('a bug, not a user error')\n"
              "run_job(main)\n")
    proc = run("-c", script)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "RuntimeError: a bug, not a user error" in proc.stderr
    assert "error: " not in proc.stdout


def test_the_console_entry_point_lists_the_jobs() -> None:
    proc = run("-m", "vixml_ray.cli", "--help")
    assert proc.returncode == 0
    listed = proc.stdout.split("positional arguments:")[1]
    assert all(f"    {name}" in listed for name in JOB_NAMES)
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"vixml-ray": "vixml_ray.cli:main"}
