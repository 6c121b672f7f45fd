"""What rank 0 tells the other ranks each step: a fixed header, a msgpack payload, one tensor blob.

A step is, in order:

1. **header** — 4 int64 over the CPU (gloo) group: ``(MAGIC, seq, kind, payload_nbytes)``. Every
   rank checks the magic and that ``seq`` is the one it expects, so a rank that fell out of step is
   detected instead of computing on someone else's data.
2. **payload** (``kind == COMPUTE`` only) — ``payload_nbytes`` of msgpack over the CPU group: the
   batch's request ids, JSON scalars and, per tensor, name / dtype / shape. msgpack, never pickle:
   ``broadcast_object_list`` would unpickle whatever arrives.
3. **blob** — every input tensor's raw bytes concatenated (C order) into one uint8 tensor on the
   device, broadcast over the device group (NCCL/HCCL/gloo) in one collective; the other ranks cut
   it back into tensors by the payload's shapes (views, no copy). Bytes, not values: bf16, NaN
   payloads and -0.0 arrive bit for bit and every backend can move uint8.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import torch

from diffdisagg.transport.codec import DTYPE_ITEMSIZE, dtype_name, tensor_bytes, torch_dtype, validate_scalars
from diffdisagg.transport.errors import CodecError

from .errors import LockstepError

__all__ = [
    "HEADER_LEN",
    "MAGIC",
    "MAX_PAYLOAD_NBYTES",
    "ItemMeta",
    "Kind",
    "TensorMeta",
    "blob_nbytes",
    "decode_payload",
    "encode_batch",
    "make_header",
    "pack_blob",
    "parse_header",
    "unpack_blob",
]

MAGIC = 0x6464_6973_6167_0001  # "ddisag" + protocol version 1
HEADER_LEN = 4
#: A payload is request metadata only (tensors travel in the blob): anything bigger is a bug.
MAX_PAYLOAD_NBYTES = 16 << 20
_MAX_DIMS = 16


class Kind(enum.IntEnum):
    COMPUTE = 1  # run the batch in the payload
    SKIP = 2  # nothing to run: a liveness tick that keeps idle ranks inside their timeouts
    STOP = 3  # leave the loop and exit 0


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class ItemMeta:
    request_id: str
    scalars: dict[str, Any]
    tensors: tuple[TensorMeta, ...]


def make_header(seq: int, kind: Kind, payload_nbytes: int = 0) -> torch.Tensor:
    return torch.tensor([MAGIC, seq, int(kind), payload_nbytes], dtype=torch.int64)


def parse_header(header: torch.Tensor, expected_seq: int) -> tuple[Kind, int]:
    magic, seq, kind, nbytes = (int(v) for v in header.tolist())
    if magic != MAGIC:
        raise LockstepError(f"bad header magic {magic:#x} (peer speaks another protocol version?)")
    if seq != expected_seq:
        raise LockstepError(f"out of step: got step {seq}, expected {expected_seq}")
    try:
        k = Kind(kind)
    except ValueError:
        raise LockstepError(f"unknown step kind {kind}") from None
    if not 0 <= nbytes <= MAX_PAYLOAD_NBYTES or (k is not Kind.COMPUTE and nbytes):
        raise LockstepError(f"bad payload size {nbytes} for {k.name}")
    return k, nbytes


def encode_batch(items: Sequence[Any]) -> tuple[bytes, list[torch.Tensor]]:
    """(payload, tensors in blob order) for a batch of StageInputs. ValueError for what cannot travel.

    Runs before anything is sent, so a request that cannot be encoded fails alone and the ranks
    stay in step.
    """
    out_items: list[dict[str, Any]] = []
    tensors: list[torch.Tensor] = []
    for item in items:
        if not isinstance(item.request_id, str):
            raise ValueError(f"request id must be a string, got {type(item.request_id).__name__}")
        try:
            validate_scalars(item.scalars)
            metas = []
            for name, t in item.tensors.items():
                if not isinstance(t, torch.Tensor):
                    raise CodecError(f"tensor {name!r} is a {type(t).__name__}")
                metas.append([str(name), dtype_name(t.dtype), list(t.shape)])
                tensors.append(t)
        except CodecError as exc:
            raise ValueError(f"{item.request_id}: cannot broadcast to the other ranks: {exc}") from exc
        out_items.append({"id": item.request_id, "scalars": item.scalars, "tensors": metas})
    payload = msgpack.packb({"items": out_items}, use_bin_type=True)
    if len(payload) > MAX_PAYLOAD_NBYTES:
        raise ValueError(f"batch metadata of {len(payload)} B exceeds {MAX_PAYLOAD_NBYTES} B")
    return payload, tensors


def decode_payload(payload: bytes) -> list[ItemMeta]:
    """The batch description rank 0 sent. LockstepError for anything malformed."""
    try:
        data = msgpack.unpackb(payload, raw=False, strict_map_key=True)
        items = data["items"]
        out = []
        for it in items:
            validate_scalars(it["scalars"])
            metas = []
            for name, dtype, shape in it["tensors"]:
                if dtype not in DTYPE_ITEMSIZE or not isinstance(name, str):
                    raise CodecError(f"bad tensor entry {name!r} {dtype!r}")
                if len(shape) > _MAX_DIMS or any(not isinstance(d, int) or d < 0 for d in shape):
                    raise CodecError(f"bad shape {shape!r}")
                metas.append(TensorMeta(name, dtype, tuple(shape)))
            if not isinstance(it["id"], str):
                raise CodecError("request id is not a string")
            out.append(ItemMeta(it["id"], it["scalars"], tuple(metas)))
        return out
    except (CodecError, KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise LockstepError(f"malformed step payload: {exc}") from exc


_BLOB_ALIGN = 16  # every tensor starts at a multiple of this, so .view(dtype) is always legal


def _aligned(n: int) -> int:
    return -(-n // _BLOB_ALIGN) * _BLOB_ALIGN


def pack_blob(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """All tensors' raw bytes in one uint8 tensor on ``device``, each at a 16-byte-aligned offset."""
    parts: list[torch.Tensor] = []
    for t in tensors:
        raw = tensor_bytes(t.to(device))
        parts.append(raw)
        pad = _aligned(raw.numel()) - raw.numel()
        if pad:
            parts.append(torch.zeros(pad, dtype=torch.uint8, device=device))
    if not parts:
        return torch.empty(0, dtype=torch.uint8, device=device)
    return torch.cat(parts)


def blob_nbytes(items: Sequence[ItemMeta]) -> int:
    return sum(_aligned(m.nbytes) for it in items for m in it.tensors)


def unpack_blob(blob: torch.Tensor, items: Sequence[ItemMeta]) -> list[dict[str, torch.Tensor]]:
    """Cut ``blob`` back into each item's named tensors (views into ``blob``)."""
    if blob.numel() != blob_nbytes(items):
        raise LockstepError(f"blob has {blob.numel()} bytes, the payload describes {blob_nbytes(items)}")
    out: list[dict[str, torch.Tensor]] = []
    offset = 0
    for item in items:
        tensors: dict[str, torch.Tensor] = {}
        for meta in item.tensors:
            raw = blob[offset : offset + meta.nbytes]
            offset += _aligned(meta.nbytes)
            tensors[meta.name] = raw.view(torch_dtype(meta.dtype)).reshape(meta.shape)
        out.append(tensors)
    return out
