"""The join core's compiled common path (``stream/join/_fastjoin.c``), when it was built.

``pip install`` compiles it (``setup.py``; optional: without a C compiler the install goes on and
the joiner runs the pure Python core alone). What it holds, each the twin of Python kept beside it
(docs/joiner.md, "Round 14"):

- ``parse_records``: a record in the event contract's compact form, read from its bytes (an
  impression's fresh state written as it is read);
- ``advance_impression`` / ``advance_step``: ``funnel.advance`` of an impression on no state or on
  the stub of its events read ahead of it, and of a step's event on no state, a stub or the usual
  state (impression seen, nothing held);
- ``sweep_states``: ``funnel.sweep`` of the usual state, with its samples' bytes and next dues;
- ``gather``, ``advance_groups``, ``sweep_out``: ``FunnelJoin.on_batch``'s pass over a batch's
  records (``FunnelJoin._gather``), its loop of the two above over a partition's groups, and
  ``FunnelJoin.sweep``'s handling of ``sweep_states``' results - the samples appended as outputs
  in C (docs/joiner.md, "Round 20");
- ``DueIndex``: ``stream.join.store.DueIndex`` in C (``new_due_index`` picks it); ``murmur2``:
  the producer's partition of a key (``stream.kafka.partitioner``).

Each declines (``None``) whatever is not its common path, which the Python core then decides: the
rules live in ``stream.join.funnel``, this is a faster copy of their usual cases, compared with it
on random states and records by ``tests/unit/test_fastjoin.py``.

``JOINER_FAST_CORE=0`` turns it off (A/B benches; the Python core's results are the same).
"""

from __future__ import annotations

from typing import Final

from stream.join.funnel import FunnelConfig

try:
    from stream.join import _fastjoin
except ImportError:  # pragma: no cover - built by every install here; the joiner still runs without it
    _fastjoin = None  # type: ignore[assignment]

AVAILABLE: Final = _fastjoin is not None
FastCfg = tuple[int, int, int, int, int, int, int, int, int]


_MAX_MS: Final = 2**53


def fast_cfg(cfg: FunnelConfig) -> FastCfg | None:
    """``cfg`` as ``sweep_states`` reads it: four windows, grace, observe, retention, skew, early;
    None for periods past 2**53 ms (285,000 years), which the Python core alone takes."""
    w = cfg.windows_ms
    if max(*w, cfg.grace_ms, cfg.observe_ms, cfg.retention_ms, cfg.skew_ms) > _MAX_MS:
        return None
    return (w[0], w[1], w[2], w[3], cfg.grace_ms, cfg.observe_ms, cfg.retention_ms, cfg.skew_ms,
            int(cfg.policy == "early"))  # fmt: skip
