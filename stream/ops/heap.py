"""The long-lived part of a worker's heap, kept out of the cyclic garbage collector's way.

A joiner holds ~100k objects once started (modules, faust's and aiokafka's services, the
metrics) and allocates a tuple or two per record. CPython's full collections traverse every
tracked object, so each one took 70-125 ms of a bench run's ~1.5 s of joining (3 per run, none
of them freeing anything; measured with ``gc.callbacks``, docs/joiner.md round 16). Moving the
startup objects to the permanent generation (``gc.freeze``) leaves those passes the young
objects alone. Collected first, so no garbage is frozen; the objects made afterwards are
collected as usual.
"""

from __future__ import annotations

import gc


def freeze_long_lived() -> int:
    """Collect, then move every object tracked so far to the permanent generation; how many are
    frozen now."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
