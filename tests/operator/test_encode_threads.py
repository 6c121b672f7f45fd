"""spec.roles.decode.encodeThreads: the decode workers' media-encoding threads, rendered as
DIFFDISAGG_ENCODE_THREADS into decode pods only; unset leaves the worker's default and the revision."""

from __future__ import annotations

import pytest
from operator_factories import env_of, example, find, rendered, spec

from diffdisagg.operator import contract as c
from diffdisagg.operator.api import schema as s
from diffdisagg.operator.api.types import parse_spec
from diffdisagg.operator.errors import SpecError
from diffdisagg.operator.rollout import revision


def test_rendered_into_decode_pods_only() -> None:
    ms = rendered(spec(**{"roles.decode.encodeThreads": 6}))
    assert env_of(find(ms, "Deployment", "d-decode"))[c.ENV_ENCODE_THREADS] == "6"
    for role in ("prefill", "denoise"):
        assert c.ENV_ENCODE_THREADS not in env_of(find(ms, "Deployment", f"d-{role}")), role


def test_zero_means_inline_and_is_rendered() -> None:
    ms = rendered(spec(**{"roles.decode.encodeThreads": 0}))
    assert env_of(find(ms, "Deployment", "d-decode"))[c.ENV_ENCODE_THREADS] == "0"


def test_unset_renders_nothing_and_keeps_the_revision() -> None:
    ms = rendered(spec())
    assert c.ENV_ENCODE_THREADS not in env_of(find(ms, "Deployment", "d-decode"))
    base = parse_spec(spec())
    assert revision(parse_spec(spec(**{"roles.decode.encodeThreads": 2}))) != revision(base)
    assert revision(parse_spec(spec(**{"roles.decode.encodeThreads": 2}))) != revision(
        parse_spec(spec(**{"roles.decode.encodeThreads": 3}))
    )


def test_the_nvidia_example_sets_it() -> None:
    ms = rendered(example("ddd-nvidia.yaml")["spec"])
    assert env_of(find(ms, "Deployment", "d-decode"))[c.ENV_ENCODE_THREADS] == "4"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"roles.prefill.encodeThreads": 2}, "spec.roles.prefill.encodeThreads is a decode setting"),
        ({"roles.decode.encodeThreads": -1}, "spec.roles.decode.encodeThreads must be an integer between 0"),
        ({"roles.decode.encodeThreads": 65}, "between 0 and 64"),
        ({"roles.decode.encodeThreads": True}, "spec.roles.decode.encodeThreads must be an integer"),
        ({"roles.decode.encodeThreads": "4"}, "spec.roles.decode.encodeThreads must be an integer"),
    ],
)
def test_parse_rejects_naming_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(spec(**overrides))


def test_only_the_decode_role_has_it_in_the_schema() -> None:
    roles = s.ddd_spec_schema()["properties"]["roles"]["properties"]
    assert roles["decode"]["properties"]["encodeThreads"] | {"description": ""} == {
        "type": "integer",
        "description": "",
        "minimum": 0,
        "maximum": s.MAX_ENCODE_THREADS,
    }
    assert "encodeThreads" not in roles["prefill"]["properties"]
    assert "encodeThreads" not in roles["denoise"]["properties"]
