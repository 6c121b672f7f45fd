"""Tensor codec: the manifest that describes tensors laid out in a slot, and small self-contained payloads.

Wire format (schema version 1), a msgpack map with exactly three keys:

    {"version": 1,
     "tensors": [{"name": str, "dtype": str, "shape": [int, ...], "offset": int, "nbytes": int}, ...],
     "scalars": {str: JSON value}}

Tensors are raw little-endian bytes at `offset` of the slot (C-contiguous, `nbytes == prod(shape) *
itemsize`); offsets are aligned so every tensor can be viewed in place. Scalars are JSON values only
(no bytes, no NaN/inf, no msgpack extension types), so the same manifest can travel as JSON.

Decoding is strict: anything a peer could get wrong (unknown dtype or key, negative or huge shapes,
tensors outside the slot or overlapping, truncated bytes, wrong version) is a `CodecError`, never
another exception. Bytes are copied raw (uint8 views), so every dtype, bf16 included, round-trips
bit-exactly; nothing goes through numpy's dtypes.

The manifest part imports no torch, so torch-free processes (the gateway, the hand-over channel)
can validate manifests; torch is imported only by the functions that touch tensors.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgpack

from diffdisagg.transport.errors import CodecError

if TYPE_CHECKING:
    import torch

    from diffdisagg.transport.platforms.base import Platform

__all__ = [
    "DTYPE_ITEMSIZE",
    "MAX_NDIM",
    "PAYLOAD_ALIGNMENT",
    "SCHEMA_VERSION",
    "TENSOR_ALIGNMENT",
    "Manifest",
    "TensorSpec",
    "decode_payload",
    "dtype_name",
    "encode_payload",
    "plan",
    "torch_dtype",
    "total_nbytes",
    "validate_scalars",
]

SCHEMA_VERSION = 1
#: Offset alignment of tensors inside a staging slot (a slot itself is aligned at least as much).
TENSOR_ALIGNMENT = 512
#: Offset alignment inside a payload: enough for every dtype's itemsize, wastes little.
PAYLOAD_ALIGNMENT = 8
MAX_NDIM = 16
MAX_TENSORS = 4096
MAX_NAME_LEN = 256
MAX_SCALAR_DEPTH = 32
#: No single tensor or slot is allowed to claim more than this (catches overflowing shapes early).
MAX_NBYTES = 1 << 48
_INT_MIN, _UINT_MAX = -(1 << 63), (1 << 64) - 1

DTYPE_ITEMSIZE: dict[str, int] = {
    "float32": 4,
    "bfloat16": 2,
    "float16": 2,
    "float64": 8,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
}
_MANIFEST_KEYS = frozenset({"version", "tensors", "scalars"})
_SPEC_KEYS = frozenset({"name", "dtype", "shape", "offset", "nbytes"})
_PAYLOAD_KEYS = frozenset({"manifest", "data"})


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _align(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


# --------------------------------------------------------------------------------------- dtypes


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for a wire name; CodecError for an unknown one."""
    import torch

    if name not in DTYPE_ITEMSIZE:
        raise CodecError(f"unknown dtype {name!r}; supported: {', '.join(DTYPE_ITEMSIZE)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; CodecError when it cannot travel."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_ITEMSIZE:
        raise CodecError(f"dtype {dtype} cannot be encoded; supported: {', '.join(DTYPE_ITEMSIZE)}")
    return name


# ------------------------------------------------------------------------------------- manifest


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Where one tensor's bytes lie in a slot. Valid by construction (``__post_init__`` checks every
    field, also of a spec built by hand), so a manifest never re-checks its specs: that re-check was
    most of the fixed cost of every stage and load call."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def __post_init__(self) -> None:
        name, dtype, shape = self.name, self.dtype, self.shape
        offset, nbytes = self.offset, self.nbytes
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_LEN:
            raise CodecError(f"tensor name must be a non-empty string of <= {MAX_NAME_LEN} chars")
        if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
            raise CodecError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list | tuple) or len(shape) > MAX_NDIM:
            raise CodecError(f"tensor {name!r}: shape must be a list of at most {MAX_NDIM} ints")
        itemsize = DTYPE_ITEMSIZE[dtype]
        numel = 1
        for dim in shape:
            if not _is_int(dim) or dim < 0:
                raise CodecError(f"tensor {name!r}: shape {shape!r} has a negative or non-int dimension")
            numel *= dim
            if numel * itemsize > MAX_NBYTES:
                raise CodecError(f"tensor {name!r}: shape {shape!r} overflows the size limit")
        if not _is_int(offset) or not 0 <= offset <= MAX_NBYTES:
            raise CodecError(f"tensor {name!r}: offset must be a non-negative int, got {offset!r}")
        if not _is_int(nbytes) or nbytes != numel * itemsize:
            raise CodecError(
                f"tensor {name!r}: nbytes {nbytes!r} != prod(shape) * itemsize = {numel * itemsize}"
            )
        if offset % itemsize:
            raise CodecError(f"tensor {name!r}: offset {offset} is not aligned to its itemsize")
        if type(shape) is not tuple:
            object.__setattr__(self, "shape", tuple(shape))

    @property
    def end(self) -> int:
        return self.offset + self.nbytes

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }

    @classmethod
    def from_dict(cls, data: object) -> TensorSpec:
        """One spec, checked on its own (placement against the slot is the Manifest's job)."""
        if not isinstance(data, Mapping):
            raise CodecError(f"tensor spec must be a map, got {type(data).__name__}")
        keys = set(data)
        if keys != _SPEC_KEYS:
            raise CodecError(f"tensor spec keys {sorted(map(str, keys))} != {sorted(_SPEC_KEYS)}")
        return cls(
            name=data["name"],
            dtype=data["dtype"],
            shape=data["shape"],
            offset=data["offset"],
            nbytes=data["nbytes"],
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    """The tensors of one hand-over and its JSON scalars."""

    tensors: list[TensorSpec]
    scalars: dict[str, Any] = field(default_factory=dict)
    version: int = SCHEMA_VERSION

    @property
    def total_nbytes(self) -> int:
        """Bytes a slot needs to hold every tensor (the end of the last one)."""
        return max((t.end for t in self.tensors), default=0)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tensors]

    def spec(self, name: str) -> TensorSpec:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def validate(self, slot_nbytes: int | None = None, *, scalars: bool = True) -> None:
        """Check the whole manifest; with `slot_nbytes`, also that it fits that slot. `scalars=False`
        checks the tensors' placement only (for a reader of the tensors that ignores the scalars)."""
        if not _is_int(self.version) or self.version != SCHEMA_VERSION:
            raise CodecError(
                f"manifest version {self.version!r} is not supported (expected {SCHEMA_VERSION})"
            )
        if len(self.tensors) > MAX_TENSORS:
            raise CodecError(f"too many tensors ({len(self.tensors)} > {MAX_TENSORS})")
        seen: set[str] = set()
        for spec in self.tensors:
            # Each spec checked itself when it was built (TensorSpec.__post_init__); what is left is
            # how they sit together and in the slot.
            if not isinstance(spec, TensorSpec):
                raise CodecError(f"manifest tensors must be TensorSpecs, got {type(spec).__name__}")
            if spec.name in seen:
                raise CodecError(f"duplicate tensor name {spec.name!r}")
            seen.add(spec.name)
            if slot_nbytes is not None and spec.end > slot_nbytes:
                raise CodecError(
                    f"tensor {spec.name!r} [{spec.offset}, {spec.end}) lies outside the slot "
                    f"of {slot_nbytes} B"
                )
        placed = sorted((t for t in self.tensors if t.nbytes), key=lambda t: t.offset)
        for left, right in itertools.pairwise(placed):
            if left.end > right.offset:
                raise CodecError(f"tensors {left.name!r} and {right.name!r} overlap")
        if scalars:
            validate_scalars(self.scalars)

    def to_dict(self) -> dict[str, Any]:
        self.validate()
        return {
            "version": self.version,
            "tensors": [t.to_dict() for t in self.tensors],
            "scalars": self.scalars,
        }

    @classmethod
    def from_dict(cls, data: object, slot_nbytes: int | None = None) -> Manifest:
        """Decode and validate; with `slot_nbytes`, every tensor must lie inside that slot."""
        if not isinstance(data, Mapping):
            raise CodecError(f"manifest must be a map, got {type(data).__name__}")
        if set(data) != _MANIFEST_KEYS:
            raise CodecError(f"manifest keys {sorted(map(str, data))} != {sorted(_MANIFEST_KEYS)}")
        version = data["version"]
        if not _is_int(version) or version != SCHEMA_VERSION:
            raise CodecError(f"manifest version {version!r} is not supported (expected {SCHEMA_VERSION})")
        tensors, scalars = data["tensors"], data["scalars"]
        if not isinstance(tensors, list | tuple):
            raise CodecError("manifest tensors must be a list")
        if len(tensors) > MAX_TENSORS:
            raise CodecError(f"too many tensors ({len(tensors)} > {MAX_TENSORS})")
        if not isinstance(scalars, Mapping):
            raise CodecError("manifest scalars must be a map")
        manifest = cls(
            tensors=[TensorSpec.from_dict(t) for t in tensors], scalars=dict(scalars), version=version
        )
        manifest.validate(slot_nbytes)
        return manifest

    def to_bytes(self) -> bytes:
        return msgpack.packb(self.to_dict(), use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes, slot_nbytes: int | None = None) -> Manifest:
        return cls.from_dict(_unpack(data), slot_nbytes)


def validate_scalars(scalars: object) -> None:
    """Scalars must be a str-keyed map of JSON values (finite floats, no bytes or extension types)."""
    if not isinstance(scalars, Mapping):
        raise CodecError(f"scalars must be a map, got {type(scalars).__name__}")
    _check_json(scalars, "scalars", 0)


def _check_json(value: object, path: str, depth: int) -> None:
    if depth > MAX_SCALAR_DEPTH:
        raise CodecError(f"{path}: nested deeper than {MAX_SCALAR_DEPTH}")
    if value is None or isinstance(value, bool | str):
        return
    if isinstance(value, int):
        if not _INT_MIN <= value <= _UINT_MAX:
            raise CodecError(f"{path}: integer {value} does not fit 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CodecError(f"{path}: {value} is not a JSON number")
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]", depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise CodecError(f"{path}: key {key!r} is not a string")
            _check_json(item, f"{path}.{key}", depth + 1)
        return
    raise CodecError(f"{path}: {type(value).__name__} is not a JSON value")


def _unpack(data: object) -> Any:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    try:
        # raw=False: strings must be UTF-8; strict_map_key: keys must be str/bytes (checked again later).
        return msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many unrelated types (ValueError, ExtraData, StackError...)
        raise CodecError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


# -------------------------------------------------------------------------------------- planning


def plan(
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Any] | None = None,
    alignment: int = TENSOR_ALIGNMENT,
) -> Manifest:
    """Lay `tensors` out back to back, each offset aligned, in the mapping's order."""
    import torch

    if not isinstance(tensors, Mapping):
        raise CodecError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    if alignment <= 0 or alignment & (alignment - 1):
        raise CodecError(f"alignment must be a power of two, got {alignment}")
    specs: list[TensorSpec] = []
    offset = 0
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise CodecError(f"tensor names must be strings, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        dtype = dtype_name(tensor.dtype)
        nbytes = tensor.numel() * tensor.element_size()
        if not nbytes:
            # An empty tensor occupies nothing; offset 0 keeps it inside any slot.
            specs.append(TensorSpec(name, dtype, tuple(tensor.shape), 0, 0))
            continue
        offset = _align(offset, alignment)
        specs.append(TensorSpec(name, dtype, tuple(tensor.shape), offset, nbytes))
        offset += nbytes
    manifest = Manifest(tensors=specs, scalars=dict(scalars or {}))
    manifest.validate()
    return manifest


def total_nbytes(tensors: Mapping[str, torch.Tensor], alignment: int = TENSOR_ALIGNMENT) -> int:
    """The slot size `plan(tensors)` needs (what a sender offers)."""
    return plan(tensors, alignment=alignment).total_nbytes


# --------------------------------------------------------------------------------------- payloads


def tensor_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bytes of a host tensor as a flat uint8 tensor (C order; no dtype conversion)."""
    import torch

    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8) if flat.dtype != torch.uint8 else flat


def encode_payload(
    tensors: Mapping[str, torch.Tensor],
    scalars: Mapping[str, Any] | None = None,
    platform: Platform | None = None,
) -> bytes:
    """Tensors + scalars as one self-contained msgpack blob (control payloads, results).

    Tensors not on the host are moved there first through the platform layer (by `device.type`).
    """
    import torch

    if platform is None:
        from diffdisagg.transport.platforms import current_platform

        platform = current_platform()
    if not isinstance(tensors, Mapping):
        raise CodecError(f"tensors must be a mapping of name -> tensor, got {type(tensors).__name__}")
    host: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise CodecError(f"{name!r} is a {type(tensor).__name__}, not a tensor")
        host[name] = platform.to_host(tensor)
    manifest = plan(host, scalars, alignment=PAYLOAD_ALIGNMENT)
    data = bytearray(manifest.total_nbytes)
    view = memoryview(data)
    for spec in manifest.tensors:
        if spec.nbytes:
            view[spec.offset : spec.end] = tensor_bytes(host[spec.name]).numpy().tobytes()
    return msgpack.packb({"manifest": manifest.to_dict(), "data": bytes(data)}, use_bin_type=True)


def decode_payload(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of `encode_payload`: fresh host tensors (writable, not sharing `data`) and scalars."""
    message = _unpack(data)
    if not isinstance(message, dict) or set(message) != _PAYLOAD_KEYS:
        raise CodecError(f"payload must be a map with keys {sorted(_PAYLOAD_KEYS)}")
    blob = message["data"]
    if not isinstance(blob, bytes):
        raise CodecError("payload data must be bytes")
    manifest = Manifest.from_dict(message["manifest"], slot_nbytes=len(blob))
    return read_tensors(manifest, memoryview(blob)), dict(manifest.scalars)


def read_tensors(manifest: Manifest, slot: memoryview | bytes) -> dict[str, torch.Tensor]:
    """Copy each tensor of a validated manifest out of host `slot` bytes."""
    import torch

    view = memoryview(slot).cast("B")
    if manifest.total_nbytes > len(view):
        raise CodecError(f"truncated: manifest needs {manifest.total_nbytes} B, slot has {len(view)} B")
    out: dict[str, torch.Tensor] = {}
    for spec in manifest.tensors:
        dtype = torch_dtype(spec.dtype)
        if spec.nbytes == 0:
            out[spec.name] = torch.empty(spec.shape, dtype=dtype)
            continue
        raw = torch.frombuffer(bytearray(view[spec.offset : spec.end]), dtype=torch.uint8)
        if dtype == torch.bool and bool((raw > 1).any()):
            raise CodecError(f"tensor {spec.name!r}: bool bytes must be 0 or 1")
        out[spec.name] = raw.view(dtype).reshape(spec.shape)
    return out
