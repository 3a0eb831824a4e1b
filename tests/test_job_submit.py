"""``ray job submit --working-dir . -- python jobs/train.py --config tiny ...`` against a Ray head that this test
starts itself (``ray start --head`` on 127.0.0.1 with its own ports and temp dir, token authentication) and stops by
its pids. It never uses the suite's session Ray: every Ray process here is a subprocess of this test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.own_cluster]

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv: its `ray` CLI, and its `python` for the job's entrypoint
UPLOAD_EXCLUDED = (".venv", ".cache", "outputs", ".git")


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _cluster_env() -> dict[str, str]:
    """This process's environment (conftest's offline/DeepSpeed settings) with token auth, the venv first on PATH
    and no RAY_ADDRESS: the head and the job's driver inherit it, as they would a cluster image's."""
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="token", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    return env


def _session_members(session: int) -> list[int]:
    """Pids of the processes in session ``session`` (the head runs in a new session: every process it starts, and
    every process those start, stays in it)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state ppid pgrp session ...
        if int(fields[3]) == session:
            found.append(int(entry.name))
    return found


def _stop(head: subprocess.Popen) -> None:
    """SIGTERM to ``ray start --block`` (it shuts down what it started), then SIGKILL to any process left in its
    session."""
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
    deadline = time.monotonic() + 15
    while _session_members(head.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_members(head.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def ray_head(env: dict[str, str], log: Path) -> Iterator[tuple[str, str]]:
    """A 2-CPU Ray head on 127.0.0.1 with its own ports and temp dir, in a new session; yields (dashboard URL, temp
    dir)."""
    temp_dir = tempfile.mkdtemp(prefix="vxr-", dir="/tmp")  # short: Ray's unix sockets live under it
    gcs, dashboard, client, agent = _free_ports(4)
    command = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp_dir}", "--num-cpus=2",
        "--disable-usage-stats",
    ]
    url = f"http://127.0.0.1:{dashboard}"
    with open(log, "wb") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # answering (e.g. 401 without a token): up
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray dashboard did not come up:\n{log.read_text()[-3000:]}") from None
                time.sleep(1)
        yield url, temp_dir
    finally:
        _stop(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _job_summary(output: str) -> dict:
    """The job's final one-line JSON summary, found in the logs `ray job submit` streams."""
    for line in reversed(output.splitlines()):
        line = line.strip()
        if line.startswith("{") and '"checkpoint"' in line:
            return json.loads(line)
    raise AssertionError(f"no JSON summary in the job's output:\n{output[-3000:]}")


def test_ray_job_submit_runs_the_tiny_preset(tmp_path: Path) -> None:
    env = _cluster_env()  # the head writes ~/.ray/auth_token on its first start; the CLI sends it
    out = tmp_path / "out"
    with ray_head(env, tmp_path / "head.log") as (url, temp_dir):
        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", url, "--working-dir", ".", "--",
             "python", "jobs/train.py", "--config", "tiny", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}",
             "train.epochs=1", "data.synthetic.num_train=400", "data.synthetic.num_test=100"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
        )
        output = submit.stdout + submit.stderr
        assert submit.returncode == 0, output[-5000:]
        assert "succeeded" in output, output[-3000:]
        files = Path(temp_dir, "session_latest", "runtime_resources", "working_dir_files")
        packages = [p for p in files.glob("_ray_pkg_*") if p.is_dir()]  # the job's unpacked --working-dir
        assert len(packages) == 1, list(files.iterdir())
        uploaded = packages[0]
        assert (uploaded / "jobs" / "train.py").is_file() and (uploaded / "vixml_ray" / "data").is_dir()
        assert not [name for name in UPLOAD_EXCLUDED if (uploaded / name).exists()]

    summary = _job_summary(output)
    assert Path(summary["checkpoint"]) == out / "train" / "export"
    assert (Path(summary["checkpoint"]) / "trainable.safetensors").is_file()
    assert summary["final_loss"] < summary["first_loss"]
    assert summary["samples_per_s"] > 0 and "val_P@1" in summary and "test_P@1" in summary
