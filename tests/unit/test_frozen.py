"""stream/contract/frozen.py: the fast constructor builds the same frozen dataclass objects."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

from stream.contract.events import Event
from stream.contract.frozen import fast_new
from stream.join.funnel import FunnelState, Held, Result, SampleOut


@pytest.mark.parametrize(
    ("cls", "args"),
    [
        (FunnelState, ("bank_1", 5, b'{"f":"v"}', (1, 2, -1, -1), (Held(3, 9, "e", b"raw", 4),))),
        (Held, (2, 7, "e1", b"r", -5)),
        (SampleOut, ("first", 0, (1, 0, 0, 0), (True, False, False, False), 12, 34)),
        (Event, (0, "e", "i", 5, "b", None)),
    ],
)
def test_fast_new_builds_the_same_frozen_object(cls: type, args: tuple[object, ...]) -> None:
    fast, slow = fast_new(cls)(*args), cls(*args)
    assert type(fast) is cls
    assert fast == slow and hash(fast) == hash(slow) and repr(fast) == repr(slow)
    assert tuple(getattr(fast, f.name) for f in dataclasses.fields(cls)) == args
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fast, name, None)
    assert not hasattr(fast, "__dict__")
    changed = dataclasses.replace(fast, **{name: getattr(slow, name)})
    assert changed == slow and type(changed) is cls


def test_fast_new_builds_a_plain_slotted_dataclass_too() -> None:
    new = fast_new(Result)
    a, b = new(None, True, [], [], False), new(None, True, [], [], False)
    assert type(a) is Result and a == Result(None, changed=True) and a.samples is not b.samples
    a.changed = False  # not frozen: stays settable
    assert a == Result(None)


def test_fast_new_refuses_what_it_cannot_build_alike() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(frozen=True, slots=True)
    class Checked:
        a: int

        def __post_init__(self) -> None:
            if self.a < 0:
                raise ValueError("a < 0")

    for cls in (NoSlots, Checked, int):
        with pytest.raises(TypeError):
            fast_new(cls)
