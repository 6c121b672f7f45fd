"""Codec: manifest layout and strict validation, bit-exact payload round-trips, and fuzzing.

`_OnDeviceTensor` is a stand-in for a tensor on an accelerator (none exists here): a real tensor whose
`device.type` reads "npu" and whose `.to("cpu")` is recorded, to prove payload encoding moves such
tensors to the host through the platform layer by device type.
"""

from __future__ import annotations

import copy
import itertools
import math
from types import SimpleNamespace

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffdisagg.transport.codec import (
    DTYPE_ITEMSIZE,
    SCHEMA_VERSION,
    TENSOR_ALIGNMENT,
    Manifest,
    TensorSpec,
    decode_payload,
    dtype_name,
    encode_payload,
    plan,
    read_tensors,
    torch_dtype,
    total_nbytes,
)
from diffdisagg.transport.errors import CodecError
from diffdisagg.transport.platforms import CpuPlatform

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.bool, torch.int16, torch.int8]  # fmt: skip


def _random_tensor(dtype: torch.dtype, shape, seed: int = 0) -> torch.Tensor:
    """Arbitrary bit patterns (NaNs with payloads, denormals, -0.0 included) of `dtype`."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    itemsize = torch.empty(0, dtype=dtype).element_size()
    n = math.prod(shape)
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and _bits(a) == _bits(b)


def _valid_dict() -> dict:
    tensors = {"a": torch.zeros(3, 5, dtype=torch.bfloat16), "b": torch.zeros(7, dtype=torch.int64)}
    return plan(tensors, {"seed": 1, "prompt": "x"}).to_dict()


# -------------------------------------------------------------------------------------------- layout


def test_plan_aligns_offsets_and_totals():
    tensors = {
        "emb": torch.zeros(2, 3, dtype=torch.float16),
        "pooled": torch.zeros(5, dtype=torch.float32),
        "empty": torch.zeros(0, 4),
        "flag": torch.tensor(True),
    }
    m = plan(tensors, {"height": 64})
    specs = {s.name: s for s in m.tensors}
    assert [s.name for s in m.tensors] == list(tensors)
    assert specs["emb"] == TensorSpec("emb", "float16", (2, 3), 0, 12)
    assert specs["pooled"] == TensorSpec("pooled", "float32", (5,), TENSOR_ALIGNMENT, 20)
    assert specs["empty"].nbytes == 0 and specs["empty"].shape == (0, 4)
    assert specs["flag"] == TensorSpec("flag", "bool", (), 2 * TENSOR_ALIGNMENT, 1)
    assert all(s.offset % TENSOR_ALIGNMENT == 0 for s in m.tensors)
    assert m.total_nbytes == 2 * TENSOR_ALIGNMENT + 1 == total_nbytes(tensors)
    assert m.scalars == {"height": 64} and m.version == SCHEMA_VERSION


def test_manifest_dict_and_bytes_round_trip():
    m = plan({"x": torch.zeros(4, 4), "y": torch.zeros(3, dtype=torch.int32)}, {"p": [1, 2.5, None, "s"]})
    assert Manifest.from_dict(m.to_dict(), slot_nbytes=m.total_nbytes) == m
    assert Manifest.from_bytes(m.to_bytes(), slot_nbytes=m.total_nbytes) == m
    assert set(m.to_dict()) == {"version", "tensors", "scalars"}
    assert m.to_dict()["tensors"][0] == {"name": "x", "dtype": "float32", "shape": [4, 4], "offset": 0,
                                         "nbytes": 64}  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtype_names(dtype):
    name = dtype_name(dtype)
    assert torch_dtype(name) == dtype and DTYPE_ITEMSIZE[name] == torch.empty(0, dtype=dtype).element_size()


def test_unsupported_dtypes_and_inputs():
    with pytest.raises(CodecError):
        dtype_name(torch.complex64)
    with pytest.raises(CodecError):
        torch_dtype("float8")
    with pytest.raises(CodecError):
        plan({"z": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(CodecError):
        plan({"z": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(CodecError):
        plan({1: torch.zeros(1)})  # type: ignore[dict-item]
    with pytest.raises(CodecError):
        plan({"z": torch.zeros(1)}, {"s": float("nan")})


# ------------------------------------------------------------------------------------------ payloads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(), (0,), (7,), (3, 5, 2)])
def test_payload_round_trip_is_bit_exact(dtype, shape):
    t = _random_tensor(dtype, shape, seed=DTYPES.index(dtype) * 10 + len(shape))
    tensors, scalars = decode_payload(encode_payload({"t": t}, {"k": [1, "two"]}, platform=CpuPlatform()))
    assert scalars == {"k": [1, "two"]}
    assert _same(tensors["t"], t)
    # Fresh, writable memory, not a view of the payload bytes.
    if t.numel():
        tensors["t"].reshape(-1).view(torch.uint8)[0] ^= 1


def test_payload_of_non_contiguous_tensors():
    base = _random_tensor(torch.bfloat16, (4, 6), seed=3)
    tensors, _ = decode_payload(encode_payload({"t": base.t(), "s": base[:, ::2]}, platform=CpuPlatform()))
    assert _same(tensors["t"], base.t().contiguous()) and _same(tensors["s"], base[:, ::2].contiguous())


class _OnDeviceTensor(torch.Tensor):
    """Stand-in: a tensor that says it lives on an NPU (see module docstring)."""

    moves: list = []

    @property
    def device(self):  # type: ignore[override]
        return SimpleNamespace(type="npu", index=0)

    def to(self, *args, **kwargs):  # type: ignore[override]
        _OnDeviceTensor.moves.append(args)
        return self.as_subclass(torch.Tensor).clone()


def test_encode_payload_moves_device_tensors_to_host_by_device_type():
    _OnDeviceTensor.moves = []
    t = _random_tensor(torch.bfloat16, (3, 3), seed=9)
    remote = t.clone().as_subclass(_OnDeviceTensor)
    tensors, _ = decode_payload(encode_payload({"r": remote, "l": t}, platform=CpuPlatform()))
    assert _OnDeviceTensor.moves == [("cpu",)]
    assert _same(tensors["r"], t) and _same(tensors["l"], t)


def test_payload_rejects_bad_blobs():
    good = encode_payload({"t": torch.arange(10)}, platform=CpuPlatform())
    message = msgpack.unpackb(good)
    for bad in (
        good[:-3],
        b"",
        b"\xc1",
        msgpack.packb([1, 2]),
        msgpack.packb({**message, "extra": 1}),
        msgpack.packb({"manifest": message["manifest"], "data": message["data"][:-1]}),  # truncated
        msgpack.packb({"manifest": message["manifest"], "data": "text"}),
        msgpack.packb({"manifest": {**message["manifest"], "version": 2}, "data": message["data"]}),
    ):
        with pytest.raises(CodecError):
            decode_payload(bad)


def test_bool_bytes_must_be_zero_or_one():
    m = plan({"b": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(CodecError, match="bool"):
        read_tensors(m, bytes([0, 1, 2, 0]))
    with pytest.raises(CodecError, match="truncated"):
        read_tensors(m, bytes(3))


# -------------------------------------------------------------------------------- strict validation


def _mutate(path, value):
    d = _valid_dict()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return d


@pytest.mark.parametrize(
    ("mutated", "message"),
    [
        (_mutate(["version"], 2), "version"),
        (_mutate(["version"], True), "version"),
        (_mutate(["version"], "1"), "version"),
        (_mutate(["tensors", 0, "dtype"], "float8_e4m3"), "unknown dtype"),
        (_mutate(["tensors", 0, "dtype"], 3), "unknown dtype"),
        (_mutate(["tensors", 0, "shape"], [-3, -5]), "negative"),
        (_mutate(["tensors", 0, "shape"], [3, 5.0]), "non-int"),
        (_mutate(["tensors", 0, "shape"], [2**40, 2**40]), "overflow"),
        (_mutate(["tensors", 0, "shape"], [1] * 17), "at most"),
        (_mutate(["tensors", 0, "shape"], "3,5"), "shape"),
        (_mutate(["tensors", 0, "nbytes"], 31), "nbytes"),
        (_mutate(["tensors", 0, "nbytes"], -30), "nbytes"),
        (_mutate(["tensors", 0, "offset"], -512), "offset"),
        (_mutate(["tensors", 0, "offset"], 1), "aligned"),
        (_mutate(["tensors", 1, "offset"], 16), "overlap"),
        (_mutate(["tensors", 1, "offset"], 10**6), "outside the slot"),
        (_mutate(["tensors", 1, "name"], "a"), "duplicate"),
        (_mutate(["tensors", 1, "name"], ""), "name"),
        (_mutate(["tensors", 1, "name"], 5), "name"),
        (_mutate(["tensors", 1], [1, 2]), "map"),
        (_mutate(["tensors"], {"a": 1}), "list"),
        (_mutate(["scalars"], [1]), "scalars"),
        (_mutate(["scalars", "x"], float("inf")), "JSON number"),
        (_mutate(["scalars", "x"], b"bytes"), "not a JSON value"),
        (_mutate(["scalars", "x"], {1: 2}), "not a string"),
        (_mutate(["scalars", "x"], 2**64), "64 bits"),
        (_mutate(["scalars", "x"], msgpack.ExtType(5, b"x")), "not a JSON value"),
    ],
)
def test_strict_decode(mutated, message):
    with pytest.raises(CodecError, match=message):
        Manifest.from_dict(mutated, slot_nbytes=4096)
    try:
        blob = msgpack.packb(mutated, use_bin_type=True)
    except OverflowError:  # msgpack itself cannot carry ints beyond 64 bits
        return
    with pytest.raises(CodecError):  # may be refused earlier, by the msgpack decoder
        Manifest.from_bytes(blob, slot_nbytes=4096)


def test_strict_keys_and_types():
    d = _valid_dict()
    for bad in (
        {**d, "extra": 1},
        {k: v for k, v in d.items() if k != "scalars"},
        _mutate(["tensors", 0, "extra"], 1),
        None,
        [d],
        "manifest",
    ):
        with pytest.raises(CodecError):
            Manifest.from_dict(bad)
    deep: object = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(CodecError, match="deeper"):
        Manifest.from_dict({**d, "scalars": {"deep": deep}})
    # Tensors beyond the slot are caught only when the slot size is known.
    Manifest.from_dict(d)
    with pytest.raises(CodecError, match="outside the slot"):
        Manifest.from_dict(d, slot_nbytes=567)
    assert Manifest.from_dict(d, slot_nbytes=568).total_nbytes == 568
    with pytest.raises(CodecError):
        Manifest.from_bytes("not bytes")  # type: ignore[arg-type]


def test_hand_built_manifest_is_validated():
    bad = Manifest([TensorSpec("a", "float32", (2,), 0, 8), TensorSpec("b", "float32", (2,), 4, 8)], {})
    with pytest.raises(CodecError, match="overlap"):
        bad.to_dict()
    with pytest.raises(CodecError):
        Manifest([TensorSpec("a", "float32", (2,), 0, 7)], {}).validate()


# --------------------------------------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4) | st.integers(0, 3), children, max_size=4),
    max_leaves=12,
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=512))
def test_fuzz_random_bytes_only_raise_codec_error(data):
    for decode in (lambda b: Manifest.from_bytes(b, slot_nbytes=4096), decode_payload):
        try:
            decode(data)
        except CodecError:
            pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=_json)
def test_fuzz_random_documents_only_raise_codec_error(value):
    try:
        Manifest.from_dict(value, slot_nbytes=4096)
    except CodecError:
        pass


_spec_value = st.one_of(
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([*DTYPE_ITEMSIZE, "x"]),
    st.lists(st.integers(-4, 2**33), max_size=4),
    st.none(),
    st.text(max_size=3),
    st.floats(),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from(sorted(_valid_dict()["tensors"][0])), _spec_value),
        min_size=1,
        max_size=3,
    ),
    slot=st.integers(0, 8192),
)
def test_fuzz_mutated_manifests_decode_only_when_consistent(edits, slot):
    d = _valid_dict()
    for index, key, value in edits:
        d["tensors"][index][key] = copy.deepcopy(value)
    blob = msgpack.packb(d, use_bin_type=True)
    try:
        m = Manifest.from_bytes(blob, slot_nbytes=slot)
    except CodecError:
        return
    # Whatever was accepted is consistent: inside the slot, no overlap, sizes match the shapes.
    spans = sorted((t.offset, t.end) for t in m.tensors if t.nbytes)
    assert all(end <= slot for _, end in spans)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in itertools.pairwise(spans))
    for t in m.tensors:
        itemsize = DTYPE_ITEMSIZE[t.dtype]
        assert t.nbytes == math.prod(t.shape) * itemsize and t.offset % itemsize == 0
    # And its tensors can be read out of a slot of that size.
    out = read_tensors(m, bytes(slot))
    assert [tuple(out[t.name].shape) for t in m.tensors] == [t.shape for t in m.tensors]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3), st.integers(0, 10**6)),
        min_size=1,
        max_size=5,
    ),
    scalars=st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**63 - 1) | st.text(max_size=5)),
)
def test_fuzz_payload_round_trip(specs, scalars):
    tensors = {f"t{i}": _random_tensor(dt, tuple(shape), seed) for i, (dt, shape, seed) in enumerate(specs)}
    out, out_scalars = decode_payload(encode_payload(tensors, scalars, platform=CpuPlatform()))
    assert out_scalars == scalars and list(out) == list(tensors)
    assert all(_same(out[k], tensors[k]) for k in tensors)
