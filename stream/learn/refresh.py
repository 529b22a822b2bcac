"""The trainer's side of the serving refresh: each published version's serving artifact, a delta
(rows changed since the previous version + dense weights) or every ``full_every`` versions a full
snapshot, chained by checksum (``aitm.artifact``; scorers: ``stream.serve.replica``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from aitm.artifact import delta_artifact, full_artifact
from aitm.embedding_table import DynamicTable, Encoder
from aitm.model import AITM


class ServingWriter:
    """Builds the artifact of each published version (a snapshot, built on the training thread).
    A writer that has published nothing yet (a start, a resume) starts with a full snapshot."""

    def __init__(self, full_every: int) -> None:
        if full_every < 1:
            raise ValueError(f"full_every (MODEL_STORE_FULL_EVERY) must be >= 1, got {full_every}")
        self.full_every = full_every
        self.base: tuple[int, str] | None = None  # (version, chain) of the previous artifact
        self.since_full = 0
        self._field: np.ndarray | None = None  # the table's row holders as last published
        self._seq: np.ndarray | None = None

    def artifacts(self, version: int, model: AITM, encoder: Encoder, changed_rows: np.ndarray,
                  full: bool = False, postpone_full: bool = False) -> list[dict[str, Any]]:
        """The artifacts of ``version``: ``model`` served with ``encoder``; ``changed_rows`` the table
        rows changed since the previous version. A delta; every ``full_every`` versions (or with
        ``full``: on demand) a full snapshot beside it, with its chain; a writer's first: a full
        snapshot alone. None for an encoder without a dynamic table (scorers then load the checkpoint).
        ``postpone_full``: the periodic snapshot waits for a later version (the previous one is
        still being written). A snapshot beside a delta is built deferred (``aitm.artifact.finish``
        completes it on the writer's thread)."""
        if not isinstance(encoder, DynamicTable):
            return []
        holders = encoder.row_field, encoder.row_seq
        out: list[dict[str, Any]] = []
        if self.base is not None and self._field is not None and self._seq is not None:
            moved = np.flatnonzero((holders[0] != self._field) | (holders[1] != self._seq))  # assigned or freed
            out.append(delta_artifact(version, self.base[0], self.base[1], model, encoder,
                                      np.union1d(changed_rows, moved), moved))
            self.since_full += 1
        if not out or full or (self.since_full >= self.full_every and not postpone_full):
            chain = str(out[0]["chain"]) if out else None
            out.append(full_artifact(version, model, encoder, self.base[1] if self.base else "", chain,
                                     defer=chain is not None))
            self.since_full = 0
        if out[0]["kind"] == "delta" and self._field is not None and self._seq is not None:
            # only the rows that moved differ: updated in place (copying 10M holders afresh each
            # version cost ~0.3 s of the training thread, mostly page faults)
            self._field[moved] = holders[0][moved]
            self._seq[moved] = holders[1][moved]
        else:
            self._field, self._seq = holders[0].copy(), holders[1].copy()
        self.base = (version, str(out[0]["chain"]))
        return out
