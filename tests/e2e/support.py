"""Helpers of the e2e tier, loaded by file path from conftest.py and the tests (tests are not a package)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

HEARTBEAT_S = 0.25
MISSES = 4
DENOISE_DELAY_S = 0.6


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.1, message: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message or predicate}")
        time.sleep(interval)


def http_json(method: str, url: str, body: dict | None = None, timeout: float = 60.0) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def worker_load(url: str, worker: str, kind: str) -> float | None:
    for (name, labels), v in metrics(url).items():
        d = dict(labels)
        if name == "diffdisagg_worker_load" and d.get("worker") == worker and d.get("kind") == kind:
            return v
    return None


def live_workers(url: str, role: str) -> int:
    return int(metrics(url)[("diffdisagg_live_workers", (("deployment", "local"), ("role", role)))])


def queue_depth(url: str, role: str) -> float:
    return metrics(url)[("diffdisagg_queue_depth", (("deployment", "local"), ("role", role)))]
