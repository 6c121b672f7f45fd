"""SlotAllocator: alignment, coalescing, generation-checked handles, accounting, thread safety."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from diffdisagg.transport.allocator import ALIGNMENT_2MIB, SlotAllocator, SlotHandle
from diffdisagg.transport.errors import (
    AllocatorError,
    BufferFullError,
    DoubleFreeError,
    InvalidSizeError,
    StaleHandleError,
)

KIB = 1024


def test_torch_free_modules_do_not_import_torch():
    # The gateway and the hand-over channel import these without torch installed.
    code = (
        "import sys; import diffdisagg.transport.allocator, diffdisagg.transport.errors, "
        "diffdisagg.transport.codec; print(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def test_rounds_up_to_alignment_and_accounts():
    a = SlotAllocator(8 * KIB)
    h = a.allocate(1)
    assert (h.offset, h.nbytes) == (0, 1)
    assert a.used_bytes == 512 and a.free_bytes == 8 * KIB - 512
    h2 = a.allocate(513)
    assert h2.offset == 512 and a.used_bytes == 512 + 1024
    assert a.live_slots == 2
    a.free(h)
    a.free(h2)
    assert a.used_bytes == 0 and a.free_blocks() == [(0, 8 * KIB)]


def test_two_mib_alignment():
    a = SlotAllocator(8 * ALIGNMENT_2MIB, alignment=ALIGNMENT_2MIB)
    handles = [a.allocate(n) for n in (1, ALIGNMENT_2MIB + 1, 3)]
    assert [h.offset % ALIGNMENT_2MIB for h in handles] == [0, 0, 0]
    assert a.used_bytes == 4 * ALIGNMENT_2MIB


@pytest.mark.parametrize(
    ("capacity", "alignment"),
    [(0, 512), (-512, 512), (1000, 512), (4096, 100), (4096, 256), (4096, 0), (True, 512), (4096.0, 512)],
)
def test_rejects_bad_geometry(capacity, alignment):
    with pytest.raises(InvalidSizeError):
        SlotAllocator(capacity, alignment)


def test_rejects_bad_strategy():
    with pytest.raises(InvalidSizeError):
        SlotAllocator(4096, strategy="worst-fit")  # type: ignore[arg-type]


@pytest.mark.parametrize("nbytes", [0, -1, True, 1.5, "10", None, 8 * KIB + 1])
def test_rejects_bad_sizes(nbytes):
    a = SlotAllocator(8 * KIB)
    with pytest.raises(InvalidSizeError):
        a.allocate(nbytes)
    assert a.used_bytes == 0 and a.live_slots == 0


def test_full_buffer_is_buffer_full_not_invalid():
    a = SlotAllocator(4 * KIB)
    h = a.allocate(3 * KIB)
    with pytest.raises(BufferFullError):
        a.allocate(2 * KIB)
    assert not a.can_allocate(2 * KIB) and a.can_allocate(KIB)
    a.free(h)
    a.allocate(4 * KIB)


def test_fragmentation_reported_and_fixed_by_coalescing():
    a = SlotAllocator(8 * KIB)
    hs = [a.allocate(KIB) for _ in range(8)]
    for h in hs[::2]:
        a.free(h)
    # 4 KiB free in four 1 KiB holes: a 2 KiB request cannot fit.
    assert a.free_bytes == 4 * KIB and a.largest_free_block == KIB
    assert a.fragmentation == pytest.approx(0.75)
    with pytest.raises(BufferFullError):
        a.allocate(2 * KIB)
    for h in hs[1::2]:
        a.free(h)
    assert a.fragmentation == 0.0 and a.largest_free_block == 8 * KIB
    stats = a.stats()
    assert (stats.free_blocks, stats.occupancy, stats.live_slots) == (1, 0.0, 0)


def test_best_fit_and_first_fit_choose_differently():
    def carve(strategy):
        a = SlotAllocator(16 * KIB, strategy=strategy)
        x = [a.allocate(n) for n in (4 * KIB, KIB, 2 * KIB, KIB, 8 * KIB)]
        a.free(x[0])  # 4 KiB hole at 0
        a.free(x[2])  # 2 KiB hole at 5 KiB
        return a.allocate(2 * KIB).offset

    assert carve("first-fit") == 0
    assert carve("best-fit") == 5 * KIB


def test_double_free_and_stale_handles():
    a = SlotAllocator(8 * KIB)
    h = a.allocate(KIB)
    a.free(h)
    with pytest.raises(DoubleFreeError):
        a.free(h)
    with pytest.raises(StaleHandleError):
        a.validate(h)
    # The slot id is reused with a new generation: the old handle still cannot touch it.
    h2 = a.allocate(KIB)
    assert h2.slot_id == h.slot_id and h2.generation == h.generation + 1
    with pytest.raises(DoubleFreeError):
        a.free(h)
    with pytest.raises(StaleHandleError):
        a.validate(h)
    a.validate(h2)
    assert a.live_slots == 1 and a.used_bytes == KIB


@pytest.mark.parametrize(
    "forge",
    [
        lambda h: SlotHandle(h.slot_id, h.offset + 512, h.nbytes, h.generation),
        lambda h: SlotHandle(h.slot_id, h.offset, h.nbytes + 1, h.generation),
        lambda h: SlotHandle(h.slot_id, h.offset, h.nbytes, h.generation + 1),
        lambda h: SlotHandle(h.slot_id + 7, h.offset, h.nbytes, 1),
        lambda h: (h.slot_id, h.offset, h.nbytes, h.generation),
    ],
)
def test_forged_handles_are_stale(forge):
    a = SlotAllocator(8 * KIB)
    h = a.allocate(KIB)
    bad = forge(h)
    with pytest.raises(StaleHandleError):
        a.free(bad)
    with pytest.raises(StaleHandleError):
        a.validate(bad)
    assert a.is_live(h) and a.used_bytes == KIB


def test_errors_are_allocator_errors():
    for cls in (BufferFullError, DoubleFreeError, StaleHandleError, InvalidSizeError):
        assert issubclass(cls, AllocatorError)


def test_thread_safety_under_contention():
    a = SlotAllocator(256 * KIB)
    errors: list[BaseException] = []
    owned: list[list[SlotHandle]] = [[] for _ in range(4)]

    def worker(i: int) -> None:
        rng = random.Random(i)
        try:
            for _ in range(2000):
                if owned[i] and (rng.random() < 0.5 or len(owned[i]) > 8):
                    a.free(owned[i].pop(rng.randrange(len(owned[i]))))
                else:
                    try:
                        owned[i].append(a.allocate(rng.randint(1, 8 * KIB)))
                    except BufferFullError:
                        pass
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    live = sorted((h for hs in owned for h in hs), key=lambda h: h.offset)
    for left, right in itertools.pairwise(live):
        assert left.offset + a.reserved_nbytes(left.nbytes) <= right.offset
    assert a.live_slots == len(live)
    assert a.used_bytes == sum(a.reserved_nbytes(h.nbytes) for h in live)
    for h in live:
        a.free(h)
    assert a.free_blocks() == [(0, 256 * KIB)]


# ------------------------------------------------------------------------------------ property tests


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences against a model of which byte ranges are owned."""

    handles = Bundle("handles")
    strategy = "best-fit"

    def __init__(self) -> None:
        super().__init__()
        self.alignment = 512
        self.capacity = 64 * self.alignment
        self.a = SlotAllocator(self.capacity, self.alignment, strategy=self.strategy)
        self.live: dict[int, SlotHandle] = {}
        self.freed: list[SlotHandle] = []

    @rule(target=handles, nbytes=st.integers(min_value=1, max_value=20 * 512))
    def allocate(self, nbytes):
        try:
            h = self.a.allocate(nbytes)
        except BufferFullError:
            # Only allowed when no free block is large enough.
            assert self.a.largest_free_block < self.a.reserved_nbytes(nbytes)
            return None
        assert h.slot_id not in self.live
        assert h.nbytes == nbytes and h.offset % self.alignment == 0
        assert h.offset + self.a.reserved_nbytes(nbytes) <= self.capacity
        self.live[h.slot_id] = h
        return h

    @rule(h=consumes(handles))
    def free(self, h):
        if h is None:
            return
        self.a.free(h)
        del self.live[h.slot_id]
        self.freed.append(h)

    @rule(data=st.data())
    def reuse_freed_handle(self, data):
        if not self.freed:
            return
        h = data.draw(st.sampled_from(self.freed))
        with pytest.raises(DoubleFreeError):
            self.a.free(h)
        with pytest.raises(StaleHandleError):
            self.a.validate(h)

    @invariant()
    def no_overlap_and_exact_accounting(self):
        spans = sorted((h.offset, h.offset + self.a.reserved_nbytes(h.nbytes)) for h in self.live.values())
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start
        used = sum(e - s for s, e in spans)
        assert self.a.used_bytes == used
        assert self.a.free_bytes == self.capacity - used
        assert self.a.live_slots == len(self.live)
        blocks = self.a.free_blocks()
        assert sum(size for _, size in blocks) == self.capacity - used
        # Free blocks and live slots tile the region exactly; neighbouring free blocks are merged.
        pieces = sorted([(o, o + n, "free") for o, n in blocks] + [(s, e, "used") for s, e in spans])
        cursor = 0
        for start, end, _kind in pieces:
            assert start == cursor
            cursor = end
        assert cursor == self.capacity
        for (_, _, k1), (_, _, k2) in itertools.pairwise(pieces):
            assert not (k1 == k2 == "free")
        free = self.capacity - used
        expected_frag = 0.0 if free == 0 else 1 - max(n for _, n in blocks) / free
        assert self.a.fragmentation == pytest.approx(expected_frag)

    def teardown(self):
        for h in list(self.live.values()):
            self.a.free(h)
        assert self.a.free_blocks() == [(0, self.capacity)]
        assert self.a.used_bytes == 0 and self.a.fragmentation == 0.0


class FirstFitMachine(AllocatorMachine):
    strategy = "first-fit"


_MACHINE_SETTINGS = settings(
    max_examples=50, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBestFitAllocator = AllocatorMachine.TestCase
TestBestFitAllocator.settings = _MACHINE_SETTINGS
TestFirstFitAllocator = FirstFitMachine.TestCase
TestFirstFitAllocator.settings = _MACHINE_SETTINGS


@settings(max_examples=100, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=1, max_value=4096), min_size=1, max_size=40),
    order=st.randoms(use_true_random=False),
)
def test_free_all_in_any_order_restores_one_block(sizes, order):
    a = SlotAllocator(32 * 4096)
    handles = []
    for n in sizes:
        try:
            handles.append(a.allocate(n))
        except BufferFullError:
            break
    order.shuffle(handles)
    for h in handles:
        a.free(h)
    assert a.free_blocks() == [(0, 32 * 4096)]
    assert (a.used_bytes, a.live_slots, a.fragmentation) == (0, 0, 0.0)
