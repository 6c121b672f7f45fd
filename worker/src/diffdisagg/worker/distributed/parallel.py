"""How a role's model uses several ranks: what diffusers 0.42 offers, plus CFG halves, else replicas.

Three ways, chosen per adapter by ``apply_parallelism(adapter, group, mode)``:

- ``context`` — sequence (context) parallel attention through diffusers' own machinery: the
  transformer's ``_cp_plan`` splits the token sequence across ranks and Ulysses attention
  (all-to-all over heads) runs on the ``native`` SDPA backend, which works on gloo/CPU as well as
  NCCL/HCCL. FLUX.1 and Wan2.1 transformers carry a ``_cp_plan``; SD3's does not.
- ``cfg`` — data-parallel classifier-free guidance: a pipeline that runs the conditional and
  unconditional halves as one batch of 2B (SD3) gets the batch split across ranks at the
  transformer's boundary and gathered again after it. Batches that do not divide (CFG off) run
  whole on every rank.
- ``replicate`` — every rank runs the whole stage (correct, no speed-up): prefill and decode, and
  any model neither of the above fits.

``auto`` picks context, then cfg, then replicate. docs/multi-device.md has the table per family.
"""

from __future__ import annotations

import enum
import logging
from typing import Any

import torch
import torch.distributed as dist

from .errors import DistributedError
from .group import RankGroup

__all__ = ["ParallelMode", "apply_parallelism", "choose_mode", "context_split_lengths", "request_blocker"]

log = logging.getLogger(__name__)

#: Families whose pipeline batches the CFG halves into one transformer call (torch.cat([x] * 2)).
CFG_BATCHED_FAMILIES = frozenset({"sd3"})


class ParallelMode(enum.StrEnum):
    AUTO = "auto"
    CONTEXT = "context"
    CFG = "cfg"
    REPLICATE = "replicate"


def _transformer(adapter: Any) -> Any:
    if getattr(adapter, "role", None) != "denoise":
        return None
    return getattr(getattr(adapter, "pipe", None), "transformer", None)


def context_parallel_blocker(adapter: Any, world_size: int) -> str | None:
    """Why ``context`` cannot be used for this adapter (None: it can)."""
    tr = _transformer(adapter)
    if tr is None:
        return "only the denoise role's transformer can be split"
    if getattr(type(tr), "_cp_plan", None) is None:
        return f"{type(tr).__name__} has no _cp_plan in this diffusers"
    heads = getattr(tr.config, "num_attention_heads", None)
    if not isinstance(heads, int) or heads % world_size:
        return f"{heads} attention heads do not divide over {world_size} ranks (Ulysses splits heads)"
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for proc in _processors(tr):
        name = getattr(proc, "_attention_backend", None)
        backend = AttentionBackendName(name) if name else _AttentionBackendRegistry.get_active_backend()[0]
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            return f"attention backend {backend.value!r} has no context-parallel path"
        break
    return None


def choose_mode(adapter: Any, world_size: int, mode: str | ParallelMode = ParallelMode.AUTO) -> ParallelMode:
    """The mode ``apply_parallelism`` would use. DistributedError when an explicit mode cannot be."""
    mode = ParallelMode(mode)
    if world_size == 1 or mode is ParallelMode.REPLICATE:
        return ParallelMode.REPLICATE
    cp_blocker = context_parallel_blocker(adapter, world_size)
    cfg_ok = _transformer(adapter) is not None and getattr(adapter, "family", None) in CFG_BATCHED_FAMILIES
    if mode is ParallelMode.CONTEXT and cp_blocker is not None:
        raise DistributedError(f"context parallel not possible: {cp_blocker}")
    if mode is ParallelMode.CFG and not cfg_ok:
        raise DistributedError(f"CFG-parallel needs a denoise role of {sorted(CFG_BATCHED_FAMILIES)}")
    if mode is ParallelMode.AUTO:
        if cp_blocker is None:
            return ParallelMode.CONTEXT
        return ParallelMode.CFG if cfg_ok else ParallelMode.REPLICATE
    return mode


def apply_parallelism(
    adapter: Any, group: RankGroup, mode: str | ParallelMode = ParallelMode.AUTO
) -> ParallelMode:
    """Prepare ``adapter`` (on every rank, before the first step) to run across ``group``."""
    chosen = choose_mode(adapter, group.world_size, mode)
    if chosen is ParallelMode.CONTEXT:
        _enable_context_parallel(_transformer(adapter), group)
    elif chosen is ParallelMode.CFG:
        _enable_batch_split(_transformer(adapter), group)
    log.info("parallelism", extra={"mode": chosen.value, "world_size": group.world_size, "rank": group.rank})
    return chosen


# --------------------------------------------------------------------------------- context parallel


def _processors(model: Any) -> list[Any]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [
        m.processor
        for m in model.modules()
        if isinstance(m, Attention | AttentionModuleMixin) and getattr(m, "processor", None) is not None
    ]


def _enable_context_parallel(model: Any, group: RankGroup) -> None:
    from diffusers import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(
        group.platform.device_type, (1, group.world_size), mesh_dim_names=("ring", "ulysses")
    )
    cp = ContextParallelConfig(ulysses_degree=group.world_size, mesh=mesh)
    if group.platform.device_type != "cpu":
        # The documented route (it maps rank -> device itself).
        model.enable_parallelism(config=cp)
        return
    # On CPU, enable_parallelism computes `rank % torch.accelerator.device_count()`, which is 0
    # there: do the same three things it does, with the CPU device.
    from diffusers.hooks.context_parallel import apply_context_parallel

    config = ParallelConfig(context_parallel_config=cp)
    config.setup(group.rank, group.world_size, group.device, mesh=mesh)
    model._parallel_config = config
    for proc in _processors(model):
        if hasattr(proc, "_parallel_config"):
            proc._parallel_config = config
    apply_context_parallel(model, cp, type(model)._cp_plan)


# --------------------------------------------------------------------------------- CFG halves


def _enable_batch_split(model: torch.nn.Module, group: RankGroup) -> None:
    """Each rank runs 1/world of the transformer's batch; the outputs are all-gathered after it."""
    world, rank = group.world_size, group.rank
    split: dict[str, int | None] = {"batch": None}

    def batch_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        hs = kwargs.get("hidden_states", args[0] if args else None)
        return int(hs.shape[0]) if isinstance(hs, torch.Tensor) and hs.dim() > 0 else None

    def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        b = batch_of(args, kwargs)
        if b is None or b < world or b % world:
            split["batch"] = None  # CFG off (batch 1): every rank runs the whole batch
            return None
        split["batch"] = b
        n = b // world

        def cut(x: Any) -> Any:
            if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == b:
                return x[rank * n : (rank + 1) * n]
            return x

        return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}

    def post(_m: Any, _args: tuple[Any, ...], _kwargs: dict[str, Any], output: Any) -> Any:
        if split["batch"] is None:
            return output
        if isinstance(output, tuple):
            return (_gather(output[0], group), *output[1:])
        if hasattr(output, "sample"):
            output.sample = _gather(output.sample, group)
            return output
        return _gather(output, group)

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model.register_forward_hook(post, with_kwargs=True)


def _gather(local: torch.Tensor, group: RankGroup) -> torch.Tensor:
    local = local.contiguous()
    parts = [torch.empty_like(local) for _ in range(group.world_size)]
    group.run("cfg all_gather", group.config.collective_timeout_s, lambda: dist.all_gather(parts, local))
    return torch.cat(parts)


# --------------------------------------------------------------------------------- per-request limits


def context_split_lengths(family: str, params: Any) -> dict[str, int]:
    """The sequence lengths the family's ``_cp_plan`` splits across ranks, for these params.

    FLUX packs 2x2 latent patches (VAE factor 8) into image tokens and splits image and text
    tokens separately; Wan splits the patchified video tokens (patch 1x2x2 over 8x-downsampled
    frames, 4x temporal compression) and keeps the text whole.
    """
    h, w = int(params.height), int(params.width)
    if family == "flux":
        return {"image tokens": (h // 16) * (w // 16), "text tokens": int(params.max_sequence_length)}
    if family == "wan":
        frames = (int(params.num_frames) - 1) // 4 + 1
        return {"video tokens": frames * (h // 16) * (w // 16)}
    return {}


def request_blocker(adapter: Any, mode: ParallelMode, world_size: int, item: Any) -> str | None:
    """Why this request cannot run in ``mode`` over ``world_size`` ranks (None: it can).

    Checked on rank 0 before a step is broadcast, so such a request fails alone with a clear
    message instead of inside the model on every rank.
    """
    if mode is not ParallelMode.CONTEXT:
        return None
    from diffdisagg.worker.pipelines.roles import request_params

    params = request_params(adapter.family, item)
    for what, n in context_split_lengths(adapter.family, params).items():
        if n % world_size:
            return (
                f"{n} {what} do not split evenly over {world_size} context-parallel ranks; "
                f"choose a size whose {what} count is a multiple of {world_size}"
            )
    return None
