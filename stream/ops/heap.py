"""The long-lived part of a worker's heap, kept out of the cyclic garbage collector's way.

A joiner holds ~100k objects once started (modules, faust's and aiokafka's services, the
metrics) and allocates a tuple or two per record. CPython's full collections traverse every
tracked object, so each one took 70-125 ms of a bench run's ~1.5 s of joining (one or two while
joining, freeing almost nothing; measured with ``gc.callbacks``, docs/joiner.md round 16). Moving the
startup objects to the permanent generation (``gc.freeze``) leaves those passes the young
objects alone. Collected first, so no garbage is frozen; the objects made afterwards are
collected as usual.

The youngest generation is also collected less often (``young_threshold``: CPython's 700
allocations between passes, so a pass every few records; 20,000 here): the records' temporaries
are freed by their reference counts between passes, and the passes over what survives them cost
0.07-0.10 s of a bench run's joiner against 0.03-0.04 s (``gc.callbacks``, round 16).
"""

from __future__ import annotations

import gc
import sys


def freeze_long_lived() -> int:
    """Collect, then move every object tracked so far to the permanent generation; how many are
    frozen now."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def collect_young_less_often(young_threshold: int) -> None:
    """Set the allocations between two collections of the youngest generation (0: keep CPython's
    default); the older generations' thresholds are kept."""
    if young_threshold > 0:
        _, older, oldest = gc.get_threshold()
        gc.set_threshold(young_threshold, older, oldest)


def switch_gil_sooner(interval_us: int) -> None:
    """CPython's switch interval (how long a busy thread keeps the GIL once another asks for it) set
    to ``interval_us`` microseconds (0: keep CPython's 5 ms). The joiner's consumer thread takes
    the GIL several times per fetch response (read the socket, parse, hand over) and waited up to
    the interval each time while the join held it (docs/joiner.md, round 21)."""
    if interval_us > 0:
        sys.setswitchinterval(interval_us / 1e6)
