"""The three role adapters (prefill, denoise, decode), generic over the family's ``FamilyOps``.

Each adapter owns a diffusers pipeline object that holds only its role's modules (the rest are
``None``), validates its inputs into typed ``StageError``s, groups nothing itself (the scheduler
batches by ``batch_key``) and runs one batch per ``run_batch`` call under ``torch.inference_mode``.
"""

from __future__ import annotations

import copy
import functools
import inspect
import logging
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from . import stages as names
from .media import encode_mp4, encode_png
from .ops_base import FamilyOps
from .params import GenerationParams, ParamError, validate_params
from .stages import RoleAdapter, StageError, StageInput, StageOutput

log = logging.getLogger(__name__)


def request_params(family: str, item: StageInput) -> GenerationParams:
    """The request's validated parameters, from its scalars (re-checked at every stage)."""
    raw = item.scalars.get("params") if isinstance(item.scalars, dict) else None
    try:
        return validate_params(family, GenerationParams.from_dict(raw))  # type: ignore[arg-type]
    except (ParamError, TypeError) as exc:
        raise StageError(item.request_id, f"invalid params: {exc}") from exc


def _split(tensors: dict[str, torch.Tensor], n: int) -> list[dict[str, torch.Tensor]]:
    # clone(): each request's tensors own their storage, so staging one request never pins the batch.
    return [{k: v[i : i + 1].clone() for k, v in tensors.items()} for i in range(n)]


class _Base(RoleAdapter):
    role: str

    def __init__(self, ops: FamilyOps, pipe: Any, device: torch.device, max_batch_size: int) -> None:
        self.ops = ops
        self.family = ops.family
        self.pipe = pipe
        self._device = device
        self.max_batch_size = max_batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def params_of(self, items: Sequence[StageInput]) -> list[GenerationParams]:
        for item in items:
            self.validate_input(item)
        params = [request_params(self.family, it) for it in items]
        keys = {self.batch_key(it) for it in items}
        if len(keys) != 1:
            raise StageError(items[0].request_id, "run_batch got inputs with different batch keys")
        if len(items) > self.max_batch_size:
            raise StageError(items[0].request_id, f"batch of {len(items)} > max {self.max_batch_size}")
        return params

    def _check_tensor(
        self, item: StageInput, name: str, shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        t = item.tensors.get(name)
        if not isinstance(t, torch.Tensor):
            raise StageError(item.request_id, f"missing tensor {name!r}")
        if t.dim() < 2 or t.shape[0] != 1:
            raise StageError(item.request_id, f"tensor {name!r} must have batch dim 1, got {tuple(t.shape)}")
        if shape is not None and tuple(t.shape) != shape:
            raise StageError(item.request_id, f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise StageError(item.request_id, f"tensor {name!r} must be floating point, got {t.dtype}")
        return t


class PrefillAdapter(_Base):
    role = "prefill"

    def validate_input(self, item: StageInput) -> None:
        request_params(self.family, item)

    def batch_key(self, item: StageInput) -> Hashable:
        p = request_params(self.family, item)
        return (p.max_sequence_length, self.ops.uses_cfg(p))

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        params = self.params_of(items)
        with torch.inference_mode():
            out = self.ops.encode(self.pipe, params, self.device)
        return [
            StageOutput(request_id=it.request_id, scalars=dict(it.scalars), tensors=t)
            for it, t in zip(items, _split(out, len(items)), strict=True)
        ]


class DenoiseAdapter(_Base):
    role = "denoise"

    def validate_input(self, item: StageInput) -> None:
        p = request_params(self.family, item)
        expected = self.ops.expected_tensors(p)
        for name in expected:
            self._check_tensor(item, name)
        extra = sorted(set(item.tensors) - set(expected))
        if extra:
            raise StageError(item.request_id, f"unexpected tensors {extra}; expected {list(expected)}")

    def batch_key(self, item: StageInput) -> Hashable:
        p = request_params(self.family, item)
        shapes = tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in item.tensors.items()))
        return (p.height, p.width, p.num_frames, p.num_inference_steps, p.guidance_scale, shapes)

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        params = self.params_of(items)
        p0 = params[0]
        embeds = {
            name: torch.cat([it.tensors[name] for it in items]).to(self.device)
            for name in self.ops.expected_tensors(p0)
        }
        # The only randomness of the whole request: one CPU generator per request, seeded from the
        # scalar that travelled with it (diffusers draws on CPU, then moves to the device).
        gens = [torch.Generator("cpu").manual_seed(p.seed) for p in params]
        # A fresh pipeline shell with its own copy of the noise scheduler per call: schedulers keep
        # step state (step_index, multistep history), which must never leak between requests.
        pipe = self._shell(copy.deepcopy(self.pipe.scheduler))
        with torch.inference_mode():
            latents = pipe(
                **embeds,
                **self.ops.denoise_kwargs(p0),
                generator=gens[0] if len(gens) == 1 else gens,
                output_type="latent",
                return_dict=False,
            )[0]
        return [
            StageOutput(
                request_id=it.request_id, scalars=dict(it.scalars), tensors={names.LATENTS: t[names.LATENTS]}
            )
            for it, t in zip(items, _split({names.LATENTS: latents}, len(items)), strict=True)
        ]

    def _shell(self, scheduler: Any) -> Any:
        """The same pipeline class over the same modules, with ``scheduler``: a cheap constructor call."""
        cls = type(self.pipe)
        kwargs = {name: getattr(self.pipe, name, None) for name in self.pipe.components}
        # Non-module settings registered in the pipeline config (e.g. Wan's boundary_ratio).
        for name in inspect.signature(cls.__init__).parameters:
            if name not in kwargs and name != "self" and name in self.pipe.config:
                kwargs[name] = self.pipe.config[name]
        kwargs["scheduler"] = scheduler
        shell = cls(**kwargs)
        shell.set_progress_bar_config(disable=True)
        return shell


class DecodeAdapter(_Base):
    role = "decode"
    #: Leave media encoding (PNG / MP4, CPU only) to the caller: ``run_batch`` returns outputs whose
    #: ``encode`` makes the bytes, so the worker encodes on other threads while the device decodes the
    #: next batch. Encoding a video took as long as its VAE decode in the multi-GPU bench
    #: (bench/RESULTS.md), and inline it leaves the device idle for that time.
    encode_later: bool = False

    def validate_input(self, item: StageInput) -> None:
        p = request_params(self.family, item)
        self._check_tensor(item, names.LATENTS, self.ops.latent_shape(p))
        extra = sorted(set(item.tensors) - {names.LATENTS})
        if extra:
            raise StageError(item.request_id, f"unexpected tensors {extra}; expected ['latents']")

    def batch_key(self, item: StageInput) -> Hashable:
        p = request_params(self.family, item)
        lat = item.tensors.get(names.LATENTS)
        return (p.height, p.width, p.num_frames, None if lat is None else str(lat.dtype))

    def pixels(self, items: Sequence[StageInput]) -> torch.Tensor:
        """Decoded pixels in [0, 1] (batch first), before media encoding; tests hash these."""
        params = self.params_of(items)
        latents = torch.cat([it.tensors[names.LATENTS] for it in items]).to(self.device)
        with torch.inference_mode():
            return self.ops.decode(self.pipe, latents, params[0])

    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        pixels = self.pixels(items)
        media_type = "video/mp4" if self.ops.video else "image/png"
        encode = encode_mp4 if self.ops.video else encode_png
        if self.encode_later:
            host = pixels.to("cpu")  # waits for the device: what is deferred is host work only
            return [
                StageOutput(
                    request_id=it.request_id,
                    scalars=dict(it.scalars),
                    media_type=media_type,
                    encode=functools.partial(encode, host[i]),
                )
                for i, it in enumerate(items)
            ]
        return [
            StageOutput(
                request_id=it.request_id,
                scalars=dict(it.scalars),
                media=encode(pixels[i]),
                media_type=media_type,
            )
            for i, it in enumerate(items)
        ]


ROLE_ADAPTERS: dict[str, type[_Base]] = {
    "prefill": PrefillAdapter,
    "denoise": DenoiseAdapter,
    "decode": DecodeAdapter,
}
