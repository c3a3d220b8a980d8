"""Autoscaling and fault recovery of the model deployment, on a real local Ray cluster.

The autoscaling metric push intervals are shortened before Ray starts (they are read when
Serve's processes start), so the controller sees load within a second instead of ten.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.serve_utils import free_port, make_tiny_checkpoint, start_ray_serve, stop_ray_serve, wait_healthy

pytestmark = pytest.mark.slow

APP = "scale"
TINY = "tiny"
FAST_PUSH = {
    "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
    "RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S": "0.5",
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from ray import serve

    from deployments.sdsat import build_app

    saved = {name: os.environ.get(name) for name in FAST_PUSH}
    os.environ.update(FAST_PUSH)
    tiny = make_tiny_checkpoint(tmp_path_factory.mktemp("serve_scaling") / "tiny")
    port = free_port()
    start_ray_serve(port)
    try:
        args = {
            "model": str(tiny),
            "model_name": TINY,
            "dtype": "float32",
            "replicas": 1,
            "max_replicas": 2,
            "target_ongoing_requests": 1,
            "upscale_delay_s": 0,
            "downscale_delay_s": 2,
            "cpus_per_replica": 0.5,
            "max_ongoing_requests": 4,
            "max_batch_size": 4,
            "router_cpus": 0.05,
        }
        serve.run(build_app(args), name=APP, route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base)
        yield base
    finally:
        stop_ray_serve()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Load:
    """Clients sending long completions back to back until stopped; records every outcome."""

    def __init__(self, base: str, clients: int, max_tokens: int = 200):
        self.base, self.max_tokens = base, max_tokens
        self.stop = threading.Event()
        self.outcomes: list[tuple[float, float, int, dict]] = []  # (sent, answered, status, body)
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        with httpx.Client(timeout=120) as http:
            while not self.stop.is_set():
                body = {"model": TINY, "prompt": f"client {i} says", "max_tokens": self.max_tokens}
                sent = time.monotonic()
                response = http.post(f"{self.base}/v1/completions", json=body)
                self.outcomes.append((sent, time.monotonic(), response.status_code, response.json()))

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=120)


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications[APP].deployments["SDSATServer"]
    return deployment.replica_states.get("RUNNING", 0)


def replica_actors() -> dict:
    """Live model replica actors by name (the named-actor list still holds stopped ones)."""
    import ray

    live = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if f"{APP}#SDSATServer#" in entry["name"]:
            try:
                live[entry["name"]] = ray.get_actor(entry["name"], namespace=entry["namespace"])
            except ValueError:
                pass  # stopped
    return live


def one_settled_replica() -> bool:
    """Exactly one replica, running, and no other replica actor still stopping or starting."""
    from ray import serve

    deployment = serve.status().applications[APP].deployments["SDSATServer"]
    return dict(deployment.replica_states) == {"RUNNING": 1} and len(replica_actors()) == 1


def wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def test_autoscales_up_under_load_and_back_down(base_url):
    assert running_replicas() == 1
    with Load(base_url, clients=6) as load:
        wait_for(lambda: running_replicas() == 2, 90, "a second replica under load")
    assert load.outcomes and all(status == 200 for _, _, status, _ in load.outcomes)
    wait_for(lambda: running_replicas() == 1, 90, "scaling back to one replica when idle")


def test_killed_replica_loses_no_request_and_is_replaced(base_url):
    """Requests in flight on a killed replica are sent again by the router; none fails."""
    import ray

    # The autoscaler may still be moving after the last test (a replica stopping, one starting):
    # start from one settled replica, so the victim is the replica that serves.
    wait_for(one_settled_replica, 90, "one settled replica")
    before = replica_actors()
    with Load(base_url, clients=3) as load:
        wait_for(lambda: len(load.outcomes) >= 3, 60, "requests under load")
        victim = sorted(before)[0]
        ray.kill(before[victim], no_restart=True)
        killed_at = time.monotonic()
        wait_for(lambda: set(replica_actors()) - set(before) and running_replicas() >= 1, 90, "a replacement replica")
        recovered_at = time.monotonic()
        wait_for(lambda: sum(sent > recovered_at for sent, _, _, _ in load.outcomes) >= 3, 90, "requests after recovery")
    statuses = Counter(status for _, _, status, _ in load.outcomes)
    assert set(statuses) == {200}, (statuses, [body for _, _, status, body in load.outcomes if status != 200][:3])
    in_flight = [1 for sent, answered, _, _ in load.outcomes if sent < killed_at < answered]
    assert in_flight, "no request was in flight when the replica was killed"
    assert victim not in replica_actors() and killed_at < recovered_at
    sequential = httpx.post(f"{base_url}/v1/completions", json={"model": TINY, "prompt": "ok?", "max_tokens": 8}, timeout=60)
    assert sequential.status_code == 200
