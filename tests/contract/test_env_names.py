"""The operator's and the worker's copies of the contract agree: same constant names, same values,
and every DIFFDISAGG_* variable the operator actually renders is one the worker reads.

Both modules are imported side by side (neither imports torch). The operator never imports the
worker; only this test sees both.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import yaml

from diffdisagg.operator import contract as op
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.render import Observed, make_owner, render
from diffdisagg.worker import contract as wk

ROOT = Path(__file__).resolve().parents[2]
# ENV_PREFIX: the operator's CRD rule. The container entry points and the /dev/shm path are what the
# operator puts in the pod; the worker has no constant for them — test_render_then_run.py runs them.
OPERATOR_ONLY = {"ENV_PREFIX", "WORKER_ARGS", "GATEWAY_COMMAND", "SHM_PATH"}


def _constants(mod: ModuleType) -> dict[str, object]:
    return {k: v for k, v in vars(mod).items() if k.isupper() and not k.startswith("_")}


def test_every_operator_constant_exists_in_the_worker_with_the_same_value() -> None:
    ops, wks = _constants(op), _constants(wk)
    missing = sorted(set(ops) - set(wks) - OPERATOR_ONLY)
    assert not missing, f"operator constants the worker lacks: {missing}"
    differ = {k: (ops[k], wks[k]) for k in ops if k in wks and ops[k] != wks[k]}
    assert not differ, f"values differ (operator, worker): {differ}"


def test_env_var_sets_are_identical() -> None:
    assert set(op.ENV_VARS) == set(wk.ENV_VARS)
    assert all(v.startswith(op.ENV_PREFIX) for v in op.ENV_VARS)
    assert len(set(op.ENV_VARS)) == len(op.ENV_VARS)


def test_rendered_env_names_are_read_by_the_worker() -> None:
    rendered: set[str] = set()
    for example in ("ddd-nvidia.yaml", "ddd-ascend.yaml"):
        doc = yaml.safe_load((ROOT / "examples" / example).read_text())
        for tcp in (False, True):
            spec = dict(doc["spec"])
            if tcp:
                spec["transfer"] = {"backend": "tcp"}
            spec["gateway"] = {**spec["gateway"], "apiKeySecret": {"name": "k"}}
            owner = make_owner("d", "ns", "u", 1, parse_spec(spec))
            for m in render(owner, Observed(new_token="t")):
                if m["kind"] != "Deployment":
                    continue
                for e in m["spec"]["template"]["spec"]["containers"][0]["env"]:
                    if e["name"].startswith(op.ENV_PREFIX):
                        rendered.add(e["name"])
    unknown = rendered - set(wk.ENV_VARS)
    assert not unknown, f"the operator writes variables the worker does not read: {sorted(unknown)}"
    # and the operator writes every one of them in some configuration
    assert rendered == set(op.ENV_VARS)
