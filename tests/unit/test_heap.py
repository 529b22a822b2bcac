"""``stream.ops.heap``: a started worker's objects moved out of the garbage collector's passes,
and the joiner's faust worker that does it once started (``JOINER_GC_FREEZE``)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from stream.join.app import joiner_worker
from stream.ops.heap import collect_young_less_often, freeze_long_lived


class Node:
    """A container the collector tracks."""

    def __init__(self) -> None:
        self.ref: object = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    thresholds = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the test session collects as usual
    gc.set_threshold(*thresholds)


def test_objects_made_before_are_frozen_and_garbage_is_collected_first() -> None:
    kept = Node()
    cycle = Node()
    cycle.ref = cycle  # garbage only the collector frees
    freed = weakref.ref(cycle)
    del cycle
    assert gc.get_freeze_count() == 0
    n = freeze_long_lived()
    assert n == gc.get_freeze_count() > 0
    tracked = {id(o) for o in gc.get_objects()}
    assert id(kept) not in tracked  # in the permanent generation: no pass traverses it
    assert freed() is None  # the cycle was collected, not frozen
    later = Node()
    assert id(later) in {id(o) for o in gc.get_objects()}  # objects made afterwards: collected as usual


class FakeWorker:
    """The part of faust's ``Worker`` the joiner's subclass overrides."""

    def __init__(self) -> None:
        self.started = False

    async def on_startup_finished(self) -> None:
        self.started = True


@pytest.mark.parametrize("freeze", [True, False])
def test_the_joiner_worker_freezes_once_started_when_asked(freeze: bool) -> None:
    worker = joiner_worker(FakeWorker, freeze)()
    before = Node()
    assert gc.get_freeze_count() == 0
    asyncio.run(worker.on_startup_finished())
    assert worker.started  # faust's own startup signal still runs
    assert (gc.get_freeze_count() > 0) is freeze
    assert (id(before) in {id(o) for o in gc.get_objects()}) is not freeze


def test_the_youngest_generation_is_collected_less_often_and_0_keeps_the_default() -> None:
    gc.set_threshold(700, 10, 10)
    collect_young_less_often(0)
    assert gc.get_threshold() == (700, 10, 10)
    collect_young_less_often(20_000)
    assert gc.get_threshold() == (20_000, 10, 10)
    gc.collect()
    before = gc.get_count()[0]
    made = [Node() for _ in range(5_000)]  # more than CPython's 700: no pass of the young ones yet
    assert gc.get_count()[0] >= before + len(made)


def test_the_joiner_hands_the_gil_over_sooner_or_keeps_cpythons_interval() -> None:
    import sys

    from stream.ops.heap import switch_gil_sooner

    before = sys.getswitchinterval()
    try:
        switch_gil_sooner(0)
        assert sys.getswitchinterval() == before  # 0 keeps it
        switch_gil_sooner(500)
        assert abs(sys.getswitchinterval() - 0.0005) < 1e-9
    finally:
        sys.setswitchinterval(before)
