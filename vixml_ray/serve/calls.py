"""The ingress's calls to the deployments it composes (the query encoder, the index shards).

A failed call is retried once: Serve routes the retry to another replica, so with two replicas a killed one fails no
request. A deployment whose only replica died is another case: Serve keeps every call to it waiting in the caller's
router until its controller has started a new replica (seconds for a small shard, minutes for a large one). So once a
call has waited :data:`STALL_S`, and while a deployment is down, :class:`Caller` reads Serve's status of the
application: a deployment that is unhealthy with no running replica is down, its waiting calls are cancelled and new
ones refused at once (:class:`Unavailable`: 503) until a replica runs again. The controller health-checks the replicas
every :data:`HEALTH_CHECK_PERIOD_S`, so it notices (and replaces) a dead one within about that.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import Any

from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

log = logging.getLogger(__name__)

HEALTH_CHECK_PERIOD_S = 1.0  # Serve's health check of the encoder and shard replicas (its default: 10 s)
STALL_S = 0.5  # a call waiting longer makes the ingress read Serve's status
WATCH_S = 0.5  # the watcher's period: stalled calls, and Serve's status while one stalls or a deployment is down
DOWN_STATUSES = ("UNHEALTHY", "DEPLOY_FAILED")  # with no running replica: down (not UPDATING: a deploy in progress)


class Unavailable(RuntimeError):
    """A deployment did not answer (after the retry) or has no running replica: the request gets 503."""


class Caller:
    """Calls to the deployments of the application ``app_name``; its watcher thread ends when ``stop`` is set."""

    def __init__(self, app_name: str, stop: threading.Event):
        self.app_name, self._stop = app_name, stop
        self.down: frozenset[str] = frozenset()  # deployments unhealthy with no running replica
        self._waiting: dict[int, tuple[str, float, DeploymentResponse]] = {}  # by call id: deployment, start
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _waiting
        threading.Thread(target=self._watch, name="deployment-watcher", daemon=True).start()

    def __call__(self, handle: DeploymentHandle, method: str, timeout_s: float, *args: Any) -> Any:
        """``handle.method(*args)``, retried once on failure; :class:`Unavailable` after the retry, or at once while
        the deployment is down."""
        name = handle.deployment_name
        for attempt in (1, 2):
            if name in self.down:
                raise Unavailable(f"{name} has no running replica (Serve is replacing it)")
            response = getattr(handle, method).remote(*args)
            key = next(self._ids)
            with self._lock:
                self._waiting[key] = (name, time.monotonic(), response)
            try:
                return response.result(timeout_s=timeout_s)
            except Exception as err:  # noqa: BLE001 - a dead replica, a timeout, back-pressure: retry, then 503
                if name in self.down:  # cancelled by the watcher
                    raise Unavailable(f"{name} has no running replica (Serve is replacing it)") from err
                if attempt == 2:
                    raise Unavailable(f"{name}.{method} failed twice: {type(err).__name__}: "
                                      f"{str(err).splitlines()[0] if str(err) else ''}") from err
                log.warning("%s.%s failed (%s), retrying once", name, method, type(err).__name__)
            finally:
                with self._lock:
                    del self._waiting[key]
        raise AssertionError("unreachable")

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_S):
            now = time.monotonic()
            with self._lock:
                stalled = any(now - start > STALL_S for _, start, _ in self._waiting.values())
            if not (stalled or self.down):
                continue
            try:
                deployments = serve.status().applications[self.app_name].deployments
            except Exception as err:  # noqa: BLE001 - the controller restarting, the app deleted: look again next time
                log.warning("reading Serve's status of application %s failed: %r", self.app_name, err)
                continue
            down = frozenset(name for name, d in deployments.items()
                             if d.status in DOWN_STATUSES and not d.replica_states.get("RUNNING", 0))
            if down != self.down:
                log.warning("deployments without a running replica: %s", sorted(down) or "none")
            self.down = down
            with self._lock:
                doomed = [response for name, _, response in self._waiting.values() if name in down]
            for response in doomed:
                response.cancel()
