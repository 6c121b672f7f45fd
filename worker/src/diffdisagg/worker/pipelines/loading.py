"""``load_role``: build one role's adapter from a local HF-layout model directory (offline).

Each role loads only its own modules through the pipeline's ordinary ``from_pretrained`` with the
other components passed as ``None`` (so their weights are never read), ``local_files_only=True``
(nothing is ever fetched from a hub), every module in ``eval()`` with gradients off.
``model_path=None`` means the cached tiny model of the family (built on first use).
"""

from __future__ import annotations

import importlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch

from .families import check_family, check_role
from .flux import FluxOps
from .ops_base import FamilyOps
from .roles import ROLE_ADAPTERS
from .sd3 import SD3Ops
from .stages import RoleAdapter
from .tiny import tiny_model_dir
from .wan import WanOps
from .weights import load_model_folder, needs_manual_load

log = logging.getLogger(__name__)

OPS: dict[str, FamilyOps] = {"flux": FluxOps(), "sd3": SD3Ops(), "wan": WanOps()}


def _components_of(ops: FamilyOps, role: str | None) -> tuple[str, ...]:
    if role is None:
        return ops.all_components()
    return {
        "prefill": ops.prefill_components,
        "denoise": ops.denoise_components,
        "decode": ops.decode_components,
    }[role]


def _preload_pinned(ops: FamilyOps, path: Path, keep: tuple[str, ...], dtype: torch.dtype) -> dict[str, Any]:
    """Components diffusers cannot load without accelerate, loaded by ``weights`` instead."""
    index = json.loads((path / "model_index.json").read_text())
    out: dict[str, Any] = {}
    for name in keep:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers"):
            continue
        cls = getattr(importlib.import_module("diffusers"), entry[1])
        if needs_manual_load(cls):
            out[name] = load_model_folder(cls, path / name, dtype)
    return out


def _enforce_dtype(pipe: Any, dtype: torch.dtype) -> None:
    """Cast modules that ``from_pretrained`` left in another dtype (diffusers 0.42.1 keeps the SD3
    transformer in fp32 whatever ``torch_dtype`` says); modules with fp32-pinned parts are left as
    loaded, since their mixed dtypes are intended."""
    for module in pipe.components.values():
        if not isinstance(module, torch.nn.Module) or getattr(module, "_keep_in_fp32_modules", None):
            continue
        if any(p.is_floating_point() and p.dtype != dtype for p in module.parameters()):
            module.to(dtype)


def load_pipeline(
    family: str,
    model_path: str | Path | None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    role: str | None = None,
) -> Any:
    """The family's diffusers pipeline with ``role``'s modules only (all of them when ``role`` is None)."""
    ops = OPS[check_family(family)]
    path = Path(model_path) if model_path is not None else tiny_model_dir(family)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers model directory (no model_index.json)")
    keep = _components_of(ops, role)
    skipped = {name: None for name in ops.all_components() if name not in keep}
    # fp32 is what diffusers loads by default; asking for it explicitly would route the Wan
    # transformer (it has fp32-pinned modules) through accelerate's low-memory loader, which the
    # CPU install does not carry. Other dtypes are passed through (the GPU images ship accelerate).
    dtype_kw: dict[str, Any] = {} if dtype == torch.float32 else {"torch_dtype": dtype}
    preloaded = _preload_pinned(ops, path, keep, dtype)
    with warnings.catch_warnings():
        # diffusers 0.42 calls torch_dtype deprecated, but its models still ignore the new `dtype`.
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = ops.pipeline_cls.from_pretrained(
            path, local_files_only=True, **dtype_kw, **skipped, **preloaded
        )
    pipe.to(torch.device(device))
    if dtype == torch.float32:
        pipe.to(dtype=torch.float32)  # a bf16 checkpoint would otherwise stay bf16 (transformers' "auto")
    else:
        _enforce_dtype(pipe, dtype)
    if getattr(pipe, "vae", None) is not None:
        pipe.vae.to(dtype=ops.vae_dtype(dtype))
    for module in pipe.components.values():
        # Mandatory: modules built or loaded in train mode make T5 dropout random per call.
        if isinstance(module, torch.nn.Module):
            module.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def quiet_hf_logging() -> None:
    """Silence diffusers/transformers progress bars and info chatter (process-wide; call from main)."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_role(
    family: str,
    role: str,
    model_path: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    *,
    max_batch_size: int = 8,
) -> RoleAdapter:
    """The ``role`` adapter of ``family``, loading only that role's modules from ``model_path``."""
    check_role(role)
    pipe = load_pipeline(family, model_path, device, dtype, role)
    log.info("role loaded", extra={"family": family, "role": role, "path": str(model_path or "tiny")})
    return ROLE_ADAPTERS[role](OPS[family], pipe, torch.device(device), max_batch_size)


def monolithic_call(pipe: Any, family: str, params: Any, output_type: str = "pt") -> torch.Tensor:
    """The plain diffusers ``pipe(...)`` call for validated ``params``: the reference of every split."""
    ops = OPS[check_family(family)]
    with torch.inference_mode():
        return pipe(
            **ops.prompt_kwargs(params),
            **ops.denoise_kwargs(params),
            generator=torch.Generator("cpu").manual_seed(params.seed),
            output_type=output_type,
            return_dict=False,
        )[0]
