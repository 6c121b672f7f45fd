"""The model families and roles this package serves, and the diffusers pipeline class of each family.

Torch-free at import time (the gateway validates requests with ``params`` and may import this).
"""

from __future__ import annotations

from typing import Any, Literal

FAMILIES: tuple[str, ...] = ("flux", "sd3", "wan")
ROLES: tuple[str, ...] = ("prefill", "denoise", "decode")

Family = Literal["flux", "sd3", "wan"]
Role = Literal["prefill", "denoise", "decode"]

# What the decode role of each family produces.
MEDIA_TYPES: dict[str, str] = {"flux": "image/png", "sd3": "image/png", "wan": "video/mp4"}


class UnknownFamilyError(ValueError):
    """A family or role name outside FAMILIES / ROLES."""


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise UnknownFamilyError(f"unknown model family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def check_role(role: str) -> str:
    if role not in ROLES:
        raise UnknownFamilyError(f"unknown role {role!r}; expected one of {', '.join(ROLES)}")
    return role


def pipeline_class(family: str) -> Any:
    """The diffusers pipeline class for ``family`` (imported lazily: it pulls in torch)."""
    check_family(family)
    import diffusers

    return {
        "flux": diffusers.FluxPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
        "wan": diffusers.WanPipeline,
    }[family]
