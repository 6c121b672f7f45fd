"""Generation-parameter limits per family (issue 5, item 5): typed errors that name field and limit."""

from __future__ import annotations

import subprocess
import sys

import pytest

from diffdisagg.worker.pipelines import (
    FAMILIES,
    LIMITS,
    GenerationParams,
    ParamError,
    UnknownFamilyError,
    validate_params,
)


def _p(**kw) -> GenerationParams:
    return GenerationParams(**{"prompt": "a cat", **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_defaults_are_filled_and_valid(family: str) -> None:
    lim = LIMITS[family]
    v = validate_params(family, _p())
    assert (v.height, v.width) == (lim.default_height, lim.default_width)
    assert v.num_inference_steps == lim.default_steps
    assert v.guidance_scale == lim.default_guidance
    assert v.max_sequence_length == lim.default_sequence_length
    assert v.num_frames == (81 if family == "wan" else 1)
    assert validate_params(family, v) == v  # idempotent: every stage may re-validate


@pytest.mark.parametrize(
    ("family", "kw", "field", "needle"),
    [
        ("flux", {"height": 72}, "height", "multiple of 16"),
        ("sd3", {"width": 1000}, "width", "multiple of 16"),
        ("wan", {"width": 840}, "width", "multiple of 16"),
        ("flux", {"height": 32}, "height", "between 64 and 2048"),
        ("flux", {"height": 4096}, "height", "between 64 and 2048"),
        ("wan", {"height": 1280, "width": 1280}, "width", "at most 921600 pixels"),
        ("wan", {"num_frames": 10}, "num_frames", "4k+1"),
        ("wan", {"num_frames": 85}, "num_frames", "between 1 and 81"),
        ("wan", {"num_frames": 0}, "num_frames", "between 1 and 81"),
        ("flux", {"num_frames": 5}, "num_frames", "must be 1"),
        ("sd3", {"num_inference_steps": 0}, "num_inference_steps", "between 1 and 100"),
        ("sd3", {"num_inference_steps": 101}, "num_inference_steps", "between 1 and 100"),
        ("sd3", {"num_inference_steps": 4.5}, "num_inference_steps", "integer"),
        ("wan", {"num_inference_steps": True}, "num_inference_steps", "integer"),
        ("flux", {"guidance_scale": 25.0}, "guidance_scale", "between 0.0 and 20.0"),
        ("sd3", {"guidance_scale": -1}, "guidance_scale", "between 0.0 and 20.0"),
        ("sd3", {"guidance_scale": float("nan")}, "guidance_scale", "finite"),
        ("wan", {"guidance_scale": "7"}, "guidance_scale", "finite number"),
        ("flux", {"seed": -1}, "seed", "between 0 and"),
        ("flux", {"seed": 2**64}, "seed", "between 0 and"),
        ("flux", {"max_sequence_length": 513}, "max_sequence_length", "between 1 and 512"),
        ("flux", {"negative_prompt": "ugly"}, "negative_prompt", "no CFG"),
        ("sd3", {"prompt": ""}, "prompt", "non-empty"),
        ("sd3", {"prompt": "   "}, "prompt", "non-empty"),
        ("wan", {"prompt": "x" * 4001}, "prompt", "at most 4000 characters"),
        ("sd3", {"negative_prompt": "x" * 4001}, "negative_prompt", "at most 4000"),
        ("sd3", {"negative_prompt": 3}, "negative_prompt", "string"),
    ],
)
def test_limits_raise_typed_errors(family: str, kw: dict, field: str, needle: str) -> None:
    with pytest.raises(ParamError) as info:
        validate_params(family, _p(**kw))
    assert info.value.field == field
    assert needle in info.value.message, info.value.message
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("flux", {"height": 64, "width": 2048, "num_inference_steps": 1}),
        ("flux", {"negative_prompt": ""}),  # empty negative is "none", not an error
        ("sd3", {"guidance_scale": 0, "negative_prompt": "ugly"}),
        ("wan", {"num_frames": 1}),
        ("wan", {"num_frames": 81, "height": 720, "width": 1280}),
        ("wan", {"num_frames": 9, "height": 64, "width": 64, "max_sequence_length": 1}),
    ],
)
def test_edges_that_are_allowed(family: str, kw: dict) -> None:
    validate_params(family, _p(**kw))


def test_from_dict_is_strict() -> None:
    assert GenerationParams.from_dict({"prompt": "a", "seed": 3}).seed == 3
    with pytest.raises(ParamError) as info:
        GenerationParams.from_dict({"prompt": "a", "steps": 3})
    assert info.value.field == "steps"
    with pytest.raises(ParamError) as info:
        GenerationParams.from_dict({"seed": 3})
    assert info.value.field == "prompt"
    with pytest.raises(ParamError):
        GenerationParams.from_dict(["prompt"])  # type: ignore[arg-type]
    p = validate_params("wan", _p(num_frames=17, seed=9))
    assert GenerationParams.from_dict(p.to_dict()) == p


def test_tighter_deployment_limits() -> None:
    small = LIMITS["flux"].with_overrides(max_pixels=512 * 512)
    validate_params("flux", _p(height=512, width=512), small)
    with pytest.raises(ParamError, match="262144 pixels"):
        validate_params("flux", _p(height=1024, width=512), small)


def test_unknown_family() -> None:
    with pytest.raises(UnknownFamilyError, match="flux, sd3, wan"):
        validate_params("sdxl", _p())


def test_validation_imports_without_torch() -> None:
    # The torch-free gateway validates requests with this module.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from diffdisagg.worker.pipelines import validate_params, GenerationParams\n"
        "print(validate_params('wan', GenerationParams(prompt='x')).num_frames)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "81"
