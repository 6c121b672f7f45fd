"""Fixtures of the cluster tier: a real control plane (tests/cluster/plane.py) for tests/cluster.

Fixture API (stable; other teams' operator and chart tests build on it — see tests/cluster/README.md):

- `plane` (session): a running, verified `Plane`. `.kubeconfig: Path` (admin), `.kubectl(*args, input=None,
  check=True, timeout=60) -> CompletedProcess[str]` (raises `KubectlError` with stderr when check fails),
  `.kubectl_json(*args)`, `.apply(manifest, namespace=None)`, `.helm(*args, input=None, check=True)`,
  `.server: str` (https://<netns_ip>:6443), `.audit_log: Path`, `.netns: str`, `.netns_ip: str`,
  `.host_ip: str`,
  `.netns_popen(argv, **popen_kwargs)` (a process inside the namespace, e.g. an aggregated API server),
  `.issue_server_cert(name, dns_names) -> (crt, key)` signed by `plane.pki / "ca.crt"`, `.env()` (KUBECONFIG +
  helm homes for subprocesses such as a kopf operator), `.hpa_sync_period: str`, `.bin_dir: Path`.
  During the session KUBECONFIG is set to the plane's, so subprocesses never reach another cluster.
- `namespace` (function): the name of a fresh namespace whose `default` ServiceAccount exists (pods can be
  created at once); deleted after the test without waiting.
- `wait_for(predicate, timeout, interval=0.2, message=...)`: `from tests.cluster.waiting import wait_for`.

Which plane: the one `make cluster-up` started (state in $DIFFDISAGG_PLANE_DIR/default) when it is
healthy — the fast dev loop — else a plane of its own for this session, stopped at the end. Its HPA sync
period is $DIFFDISAGG_HPA_SYNC_PERIOD, default 5s for a session plane (`make cluster-up` defaults to 15s; read
`plane.hpa_sync_period`). The binaries are built (or found cached) once per session before the first test,
outside pytest-timeout's per-test limit. Skipped only when Go is absent, nothing is cached and CI is unset;
under CI=true a plane that cannot be built or started fails the tests. A KUBECONFIG that is not a local
plane's is refused, never used.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.plane import (
    ForeignClusterError,
    Plane,
    PlaneConfig,
    PlaneError,
    build,
    check_kubeconfig,
    down,
    load,
    up,
)
from tests.cluster.waiting import wait_for

HERE = Path(__file__).resolve().parent
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
SESSION_HPA_SYNC_PERIOD = "5s"
_build: dict[str, str] = {}  # outcome of the session's build: {"skip"|"fail"|"ok": detail}


def _ensure_built() -> None:
    if _build:
        return
    config = PlaneConfig.from_env()
    cached = (config.cache_root / config.k8s_version / "stamp").exists()
    if shutil.which("go") is None and not cached and not IN_CI:
        _build["skip"] = "no Go toolchain and no cached control-plane binaries (CI is unset)"
        return
    try:
        _build["ok"] = str(build(config))
    except (PlaneError, OSError) as exc:
        _build["fail"] = f"building the control plane failed: {exc}"


def pytest_collection_finish(session: pytest.Session) -> None:
    # Build here, not in the fixture: a cold build (minutes) must not count against the first test's timeout.
    if any(Path(str(item.path)).is_relative_to(HERE) for item in session.items):
        _ensure_built()


def _plane_from_env_kubeconfig(config: PlaneConfig) -> Plane | None:
    raw = os.environ.get("KUBECONFIG")
    if not raw:
        return None
    path = Path(raw)
    check_kubeconfig(path, config)  # ForeignClusterError for anything that is not a local plane
    plane = load(config.__class__.from_env(state_root=path.parent.parent), path.parent.name)
    if plane.kubeconfig.resolve() != path.resolve():
        raise ForeignClusterError(f"KUBECONFIG={path} is not the admin kubeconfig of plane {plane.name}")
    plane.verify()
    return plane


@pytest.fixture(scope="session")
def plane() -> Iterator[Plane]:
    _ensure_built()
    if "skip" in _build:
        pytest.skip(_build["skip"])
    if "fail" in _build:
        pytest.fail(_build["fail"], pytrace=False)
    config = PlaneConfig.from_env()
    owned = False
    try:
        found = _plane_from_env_kubeconfig(config)
        if found is None:
            try:
                found = load(config)
                found.verify()
            except ForeignClusterError:
                raise
            except PlaneError:
                found = None
        if found is None:
            # A session plane reacts faster than kube-controller-manager's 15 s default: the HPA controller
            # first looks at a new autoscaler one sync period after it appears.
            period = os.environ.get("DIFFDISAGG_HPA_SYNC_PERIOD", SESSION_HPA_SYNC_PERIOD)
            config = PlaneConfig.from_env(name=f"pytest-{os.getpid()}", hpa_sync_period=period)
            found = up(config, owner_pid=os.getpid())
            owned = True
    except ForeignClusterError as exc:
        pytest.fail(f"refusing a cluster that is not a local plane: {exc}", pytrace=False)
    except PlaneError as exc:
        pytest.fail(str(exc), pytrace=False)
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(found.kubeconfig)
    try:
        yield found
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        if owned:
            down(config)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-") or "t"


@pytest.fixture
def namespace(plane: Plane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"{_slug(request.node.name)}-{secrets.token_hex(3)}"
    plane.kubectl("create", "namespace", name)
    plane.kubectl("label", "namespace", name, "diffdisagg.io/test=true")
    # The ServiceAccount admission plugin rejects pods until the controller manager made `default`.
    wait_for(
        lambda: plane.kubectl("get", "serviceaccount", "default", "-n", name, check=False).returncode == 0,
        30,
        message=f"ServiceAccount default in {name}",
    )
    try:
        yield name
    finally:
        plane.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)
