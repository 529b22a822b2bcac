"""A quick private constructor for frozen, slotted dataclasses (the join's hot path).

A frozen dataclass's ``__init__`` sets every field through ``object.__setattr__`` (its own
``__setattr__`` refuses): ~2-2.5 us for a five-field ``FunnelState`` against ~0.1 us for a tuple,
and the joiner builds several per event. ``fast_new(cls)`` returns a positional constructor that
fills an instance of a plain slotted *twin* class (the same slots in the same order, so the same
memory layout) with ordinary attribute stores and then sets its ``__class__`` to ``cls``: ~0.7 us.
The object is a ``cls`` in every way - ``type``, equality, hashing, ``repr``, ``dataclasses.replace``
and the frozen ``__setattr__`` are ``cls``'s - so the public constructor (with its defaults and
``__post_init__``, which the fast one skips: use it only for classes without one) stays the
way the rest of the code and the tests build them.

Kept in the standard library: no library does this (attrs/msgspec would change the classes
the tests and ``dataclasses.replace`` rely on).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def fast_new(cls: type[T]) -> Callable[..., T]:
    """A constructor ``new(field1, field2, ...)`` (all fields, positional, no defaults) for the
    frozen, slotted dataclass ``cls``; raises TypeError for a class it cannot build that way."""
    if not dataclasses.is_dataclass(cls) or not isinstance(cls, type):
        raise TypeError(f"{cls!r} is not a dataclass")
    names = tuple(f.name for f in dataclasses.fields(cls))
    if cls.__bases__ != (object,) or getattr(cls, "__slots__", None) != names:
        raise TypeError(f"{cls.__name__} must be a slotted dataclass with object as its only base")
    if hasattr(cls, "__post_init__"):
        raise TypeError(f"{cls.__name__} has a __post_init__ the fast constructor would skip")
    twin = type(f"_{cls.__name__}Twin", (), {"__slots__": names})
    src = (
        f"def new({', '.join(names)}):\n    s = _new(_twin)\n"
        + "".join(f"    s.{n} = {n}\n" for n in names)
        + "    s.__class__ = _cls\n    return s\n"
    )
    ns: dict[str, Any] = {"_new": object.__new__, "_twin": twin, "_cls": cls}
    exec(src, ns)  # the source is built from the dataclass's own field names
    new: Callable[..., T] = ns["new"]
    new.__qualname__ = new.__name__ = f"new_{cls.__name__}"
    new.__doc__ = f"{cls.__name__}({', '.join(names)}) without the frozen dataclass's slow __init__."
    return new
