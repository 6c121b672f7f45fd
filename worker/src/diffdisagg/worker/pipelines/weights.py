"""Loading one diffusers model folder without ``accelerate``.

diffusers refuses ``from_pretrained`` for models that pin some submodules to fp32
(``_keep_in_fp32_modules``, e.g. the Wan transformer) unless ``accelerate`` is installed. The CPU
test environment does not carry it, so for those classes this module builds the model from its
``config.json`` and loads the safetensors (single file or sharded index) with ``strict=True``:
same weights, same module tree; the pinned submodules stay fp32 when another dtype is asked for.
With ``accelerate`` present the ordinary path is used and this module is not involved.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

_WEIGHTS = "diffusion_pytorch_model.safetensors"
_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def needs_manual_load(cls: Any) -> bool:
    return (
        bool(getattr(cls, "_keep_in_fp32_modules", None)) and importlib.util.find_spec("accelerate") is None
    )


def _state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / _WEIGHTS).is_file():
        return load_file(folder / _WEIGHTS)
    index = folder / _INDEX
    if not index.is_file():
        raise FileNotFoundError(f"{folder} has neither {_WEIGHTS} nor {_INDEX}")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(folder / shard))
    return state


def load_model_folder(cls: Any, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """``cls`` from ``folder`` (config.json + safetensors), in ``dtype`` except fp32-pinned submodules."""
    model = cls.from_config(cls.load_config(folder))
    model.load_state_dict(_state_dict(folder), strict=True)
    if dtype != torch.float32:
        model.to(dtype)
        pinned = cls._keep_in_fp32_modules or []
        for name, sub in model.named_modules():
            if any(key in name.split(".") for key in pinned):
                sub.to(torch.float32)
    return model.eval()
