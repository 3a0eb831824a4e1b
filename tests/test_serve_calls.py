"""The ingress's calls to its deployments (vixml_ray.serve.calls, with fake handles and a fake Serve status): a failed
call is retried once; a call waiting for a deployment that Serve reports unhealthy without a running replica is
cancelled and gets Unavailable, later calls get it at once without reaching the handle, until a replica runs again;
a deployment still being deployed is waited for."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from vixml_ray.serve import calls
from vixml_ray.serve.calls import Caller, Unavailable

HANG = object()  # a call that waits (for a replica) until cancelled


class FakeResponse:
    def __init__(self, outcome: Any):
        self.outcome, self.cancelled = outcome, threading.Event()

    def result(self, timeout_s: float) -> Any:
        if self.outcome is HANG:
            if not self.cancelled.wait(timeout_s):
                raise TimeoutError("timed out")
            raise RuntimeError("cancelled")
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome

    def cancel(self) -> None:
        self.cancelled.set()


class FakeHandle:
    """``handle.any_method.remote()`` answers the next of ``outcomes``."""

    deployment_name = "shard-0"

    def __init__(self, *outcomes: Any):
        self.outcomes, self.sent = list(outcomes), 0

    def __getattr__(self, method: str) -> "FakeHandle":
        return self

    def remote(self, *args: Any) -> FakeResponse:
        self.sent += 1
        return FakeResponse(self.outcomes.pop(0))


@pytest.fixture
def status(monkeypatch) -> dict:
    """shard-0's status as ``serve.status()`` reports it; the watcher looks every 20 ms, at calls older than 50 ms."""
    shard = {"status": "HEALTHY", "replica_states": {"RUNNING": 1}}
    monkeypatch.setattr(calls, "WATCH_S", 0.02)
    monkeypatch.setattr(calls, "STALL_S", 0.05)
    monkeypatch.setattr(calls.serve, "status", lambda: SimpleNamespace(applications={"app": SimpleNamespace(
        deployments={"shard-0": SimpleNamespace(**shard)})}))
    return shard


@pytest.fixture
def caller(status):
    stop = threading.Event()
    yield Caller("app", stop)
    stop.set()


def test_a_failed_call_is_retried_once(caller):
    handle = FakeHandle(RuntimeError("replica died"), "ok")
    assert caller(handle, "search", 5.0) == "ok" and handle.sent == 2
    with pytest.raises(Unavailable, match="shard-0.search failed twice: RuntimeError: again"):
        caller(FakeHandle(RuntimeError("died"), RuntimeError("again")), "search", 5.0)


def test_calls_to_a_deployment_without_a_running_replica_fail_at_once_until_it_runs_again(caller, status):
    status.update(status="UNHEALTHY", replica_states={"STARTING": 1})
    start = time.monotonic()
    with pytest.raises(Unavailable, match="shard-0 has no running replica"):
        caller(FakeHandle(HANG), "search", 30.0)
    assert time.monotonic() - start < 5.0  # cancelled, not timed out
    refused = FakeHandle("unused")
    with pytest.raises(Unavailable, match="no running replica"):
        caller(refused, "search", 30.0)
    assert refused.sent == 0
    status.update(status="HEALTHY", replica_states={"RUNNING": 1})
    deadline = time.monotonic() + 5.0
    while caller.down:
        assert time.monotonic() < deadline, "shard-0 still down after its replica runs again"
        time.sleep(0.02)
    assert caller(FakeHandle("ok"), "search", 5.0) == "ok"


def test_a_deployment_being_deployed_is_waited_for(caller, status):
    status.update(status="UPDATING", replica_states={"STARTING": 1})
    with pytest.raises(Unavailable, match="failed twice: TimeoutError"):
        caller(FakeHandle(HANG, HANG), "search", 0.3)
    assert not caller.down
