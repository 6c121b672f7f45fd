"""Diffusers pipelines split into role adapters (prefill / denoise / decode) for FLUX.1, SD3, Wan2.1.

Public API (see docs/pipelines.md):
``FAMILIES``, ``ROLES``, ``GenerationParams``, ``validate_params``, ``ParamError``, ``FamilyLimits``,
``LIMITS`` (torch-free), and — importing torch — ``load_role``, ``RoleAdapter``, ``StageInput``,
``StageOutput``, ``StageError``, ``build_tiny_model``, ``tiny_model_dir``, ``load_pipeline``,
``monolithic_call``. The torch-importing names are loaded lazily so the gateway can import the
parameter validation without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .families import FAMILIES, MEDIA_TYPES, ROLES, UnknownFamilyError
from .limits import LIMITS, FamilyLimits
from .params import GenerationParams, ParamError, validate_params

_LAZY = {
    "load_role": "loading",
    "load_pipeline": "loading",
    "monolithic_call": "loading",
    "RoleAdapter": "stages",
    "StageInput": "stages",
    "StageOutput": "stages",
    "StageError": "stages",
    "build_tiny_model": "tiny",
    "tiny_model_dir": "tiny",
}

__all__ = [
    "FAMILIES",
    "LIMITS",
    "MEDIA_TYPES",
    "ROLES",
    "FamilyLimits",
    "GenerationParams",
    "ParamError",
    "UnknownFamilyError",
    "validate_params",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
