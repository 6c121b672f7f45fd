"""What crosses a role boundary (StageInput / StageOutput) and the RoleAdapter interface.

A role adapter is one stage of one model family (prefill, denoise or decode). The worker's
scheduler hands it batches of ``StageInput`` and forwards each ``StageOutput`` to the next stage.
Tensors are named (the names below are the wire names); everything else travels as JSON-able
``scalars`` — the generation parameters included, so every stage sees the same request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Tensor names on the wire.
PROMPT_EMBEDS = "prompt_embeds"
POOLED_PROMPT_EMBEDS = "pooled_prompt_embeds"
NEGATIVE_PROMPT_EMBEDS = "negative_prompt_embeds"
NEGATIVE_POOLED_PROMPT_EMBEDS = "negative_pooled_prompt_embeds"
LATENTS = "latents"


@dataclass
class StageInput:
    """One request entering a stage.

    ``scalars`` holds at least ``"params"`` (``GenerationParams.to_dict()``). ``tensors`` are the
    previous stage's outputs (empty for prefill), each with a leading batch dimension of 1.
    """

    request_id: str
    scalars: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class StageOutput:
    """One request leaving a stage.

    prefill/denoise: ``tensors`` for the next stage (batch dimension 1, on the adapter's device).
    decode: ``media`` (PNG or MP4 bytes) and ``media_type``; ``tensors`` is empty. A decode adapter
    that defers encoding leaves ``media`` None and sets ``encode`` instead: a CPU-only call (the pixels
    are on the host already) that returns the bytes, for the worker to run off its compute thread.
    ``scalars`` passes the request's scalars on, plus what the stage adds (e.g. ``stage_seconds``).
    """

    request_id: str
    scalars: dict[str, Any]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    media: bytes | None = None
    media_type: str | None = None
    encode: Callable[[], bytes] | None = None

    def finish_media(self) -> bytes:
        """The media bytes: encoded now when the adapter deferred it (CPU work, any thread)."""
        if self.media is None and self.encode is not None:
            self.media, self.encode = self.encode(), None
        return self.media or b""


class StageError(RuntimeError):
    """A request this stage cannot run (bad tensors or scalars); the request fails, the worker lives."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"{request_id}: {message}")
        self.request_id = request_id
        self.message = message


class RoleAdapter(ABC):
    """One role of one family, holding only that role's modules.

    ``run_batch`` is called from one compute thread at a time; it must not keep per-request state
    between calls (each request gets its own copy of the noise scheduler).
    """

    family: str
    role: str
    #: Largest batch ``run_batch`` accepts; the scheduler never groups more.
    max_batch_size: int = 8

    @abstractmethod
    def batch_key(self, item: StageInput) -> Hashable:
        """Inputs with equal keys may share one ``run_batch`` call (same shapes and settings)."""

    @abstractmethod
    def run_batch(self, items: Sequence[StageInput]) -> list[StageOutput]:
        """Run the stage for ``items`` (all with one batch key); outputs in input order."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the adapter's modules live and where its input tensors must be loaded."""

    def validate_input(self, item: StageInput) -> None:  # noqa: B027 - optional hook
        """Raise StageError for an input this stage cannot run (checked before batching)."""
