"""Online categorical encoding: per-field string values -> local ids, 0 being out-of-vocabulary.

Two modes: ``threshold`` admits a value once it has been seen ``min_count`` times (while the
field has room); ``hash`` maps every value to ``1 + crc32(value) % (capacity - 1)``. The
encoder serialises to plain data (``state_dict``) for checkpoints.

>>> enc = FeatureEncoder(("city",), capacity=8, min_count=2)
>>> enc.encode_dicts([{"city": "oslo"}], update=True).tolist()  # seen once: out of vocabulary
[[0]]
>>> enc.encode_dicts([{"city": "oslo"}], update=True).tolist()  # twice: admitted as id 1
[[1]]
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import itemgetter
from typing import Any

import numpy as np

OOV = 0
MODES = ("threshold", "hash")



def columns_of(fields: Sequence[str], rows: Sequence[Mapping[str, str]]) -> list[Sequence[str]]:
    """Feature dicts -> one column of values per field, in ``fields`` order; a missing field is ``""``
    (one C-level pass per row; a row missing a field falls back to ``.get``)."""
    try:
        getter = itemgetter(*fields)
        table = [getter(r) for r in rows]  # (N,) tuples of F values (a bare value if F = 1)
        return list(zip(*table, strict=True)) if len(fields) > 1 else [table]
    except KeyError:
        return [[r.get(name, "") for r in rows] for name in fields]


def field_column(columns: Mapping[str, Sequence[str]], name: str, n: int) -> Sequence[str]:
    """Field ``name``'s column of ``n`` values (``""`` for each when absent); a column of another
    length is an error."""
    col = columns.get(name)
    if col is None:
        return [""] * n
    if len(col) != n:
        raise ValueError(f"column {name!r} has {len(col)} values, expected {n}")
    return col

class FeatureEncoder:
    """Maps ``{field: value_str}`` rows to an int64 id matrix (N, F); ids are per field."""

    def __init__(
        self,
        fields: Sequence[str],
        capacity: int | Sequence[int] = 100_000,
        min_count: int = 10,
        mode: str = "threshold",
        max_pending: int = 1_000_000,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        caps = [capacity] * len(fields) if isinstance(capacity, int) else list(capacity)
        if len(caps) != len(fields) or min(caps, default=2) < 2:
            raise ValueError(f"one capacity >= 2 per field, got {caps} for {len(fields)} fields")
        self.fields = tuple(fields)
        self.capacities = tuple(int(c) for c in caps)
        self.min_count = int(min_count)
        self.mode = mode
        self.max_pending = max_pending  # bound on counted-but-not-admitted values per field
        self.vocab: list[dict[str, int]] = [{} for _ in self.fields]
        self.pending: list[dict[str, int]] = [{} for _ in self.fields]
        self.lookups = np.zeros(len(self.fields), np.int64)  # training look-ups per field (not saved)
        self.misses = np.zeros(len(self.fields), np.int64)  # ... that were out of vocabulary

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Embedding rows per field (fixed: the capacity, OOV included), for the model config."""
        return self.capacities

    def _admit(self, f: int, value: str, count: int) -> None:
        """Count ``count`` sightings of ``value`` in field ``f``; give it an id at ``min_count``."""
        vocab = self.vocab[f]
        if value in vocab or len(vocab) + 1 >= self.capacities[f]:
            return
        pending = self.pending[f]
        seen = pending.get(value, 0) + count
        if seen >= self.min_count:
            vocab[value] = len(vocab) + 1
            pending.pop(value, None)
            return
        pending[value] = seen
        if len(pending) > self.max_pending:  # forget values seen once so memory stays bounded
            self.pending[f] = {v: c for v, c in pending.items() if c > 1}

    def _lookup(self, f: int, value: str) -> int:
        if self.mode == "hash":
            return 1 + zlib.crc32(value.encode()) % (self.capacities[f] - 1)
        return self.vocab[f].get(value, OOV)

    def encode_column(self, f: int, values: Sequence[str] | np.ndarray, update: bool = False) -> np.ndarray:
        """Encode one field's values (N,) -> ids (N,) int64; counts them first if ``update``."""
        ids = self._encode_column(f, values, update)
        if update:
            self.lookups[f] += len(ids)
            self.misses[f] += int((ids == OOV).sum())
        return ids

    def _encode_column(self, f: int, values: Sequence[str] | np.ndarray, update: bool) -> np.ndarray:
        """``encode_column`` without the look-up counts.

        A numpy array (offline, large N) goes through ``np.unique``; a list of strings (a
        streaming batch) through plain dict look-ups, which is faster for small batches.
        """
        if isinstance(values, np.ndarray):
            uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
            keys = [str(u) for u in uniq.tolist()]
            if update and self.mode == "threshold":
                # lexicographic order, as on the dict path, so both assign the same ids
                for key, c in sorted(zip(keys, counts.tolist(), strict=True)):
                    self._admit(f, key, int(c))
            ids = np.fromiter((self._lookup(f, k) for k in keys), np.int64, count=len(keys))
            return ids[inverse.reshape(-1)]  # (N,)
        if self.mode == "hash":
            return np.fromiter((self._lookup(f, v) for v in values), np.int64, count=len(values))
        # map() with a repeated default runs the look-ups in C: no Python frame per value
        vocab = self.vocab[f]
        ids = np.fromiter(map(vocab.get, values, repeat(OOV)), np.int64, count=len(values))
        if update and len(vocab) + 1 < self.capacities[f]:
            # only values not in the vocabulary are counted towards admission (the rest would be
            # skipped by _admit_counts anyway); those admitted now are looked up again
            miss = np.flatnonzero(ids == OOV)
            if miss.size:
                missing = [values[i] for i in miss.tolist()]
                before = len(vocab)
                self._admit_counts(f, Counter(missing))
                if len(vocab) != before:
                    ids[miss] = np.fromiter(map(vocab.get, missing, repeat(OOV)), np.int64, count=len(missing))
        return ids

    def _admit_counts(self, f: int, counts: Mapping[str, int]) -> None:
        """``_admit`` each counted value not yet in the vocabulary, in lexicographic order."""
        vocab = self.vocab[f]
        if len(vocab) + 1 >= self.capacities[f]:
            return  # full: nothing more can be admitted (or counted)
        for key in sorted(k for k in counts if k not in vocab):
            self._admit(f, key, counts[key])

    def encode_array(self, values: np.ndarray, update: bool = False) -> np.ndarray:
        """Encode a value matrix (N, F) (strings or codes, str() of each is the value) -> (N, F)."""
        if values.ndim != 2 or values.shape[1] != len(self.fields):
            raise ValueError(f"expected (N, {len(self.fields)}) values, got {values.shape}")
        cols = [self.encode_column(f, values[:, f], update) for f in range(len(self.fields))]
        return np.stack(cols, axis=1) if cols else np.zeros((len(values), 0), np.int64)

    def encode_dicts(self, rows: Sequence[Mapping[str, str]], update: bool = False) -> np.ndarray:
        """Encode feature dicts ``{field: value_str}`` -> (N, F); a missing field is ``""``."""
        if not self.fields:
            return np.empty((len(rows), 0), dtype=np.int64)
        columns = columns_of(self.fields, rows)
        return self.encode_columns(dict(zip(self.fields, columns, strict=True)), len(rows), update)

    def encode_columns(self, columns: Mapping[str, Sequence[str]], n: int, update: bool = False,
                       event_time_ms: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Encode feature columns ``{field: (N,) values}`` -> (N, F); a missing field is ``""``.
        (``event_time_ms`` is for the dynamic table's expiry; this encoder never expires ids.)"""
        out = np.empty((n, len(self.fields)), dtype=np.int64)
        for f, name in enumerate(self.fields):
            out[:, f] = self.encode_column(f, field_column(columns, name, n), update)
        return out

    def take_assigned(self) -> np.ndarray:
        """Rows given since the last call that need a reset: none (ids are never reused here)."""
        return np.zeros(0, np.int64)

    def oov_rows(self, rows: np.ndarray) -> np.ndarray:
        return np.zeros(0, np.int64)

    def marker(self) -> list[int] | None:
        """Ids per field known now (threshold ids are given in order), None if hashed."""
        return [len(v) for v in self.vocab] if self.mode == "threshold" else None

    def known_as_of(self, ids: np.ndarray, marker: Any) -> np.ndarray:
        """``ids`` (N, F) with ids given after ``marker`` (an earlier ``marker()``) mapped to OOV."""
        return ids if marker is None else np.where(ids > np.asarray(marker), OOV, ids)

    def state_dict(self) -> dict[str, Any]:
        """Plain-data state (str/int/list/dict only), safe for ``torch.load(weights_only=True)``."""
        return {
            "fields": list(self.fields),
            "capacities": list(self.capacities),
            "min_count": self.min_count,
            "mode": self.mode,
            "max_pending": self.max_pending,
            "vocab": [dict(v) for v in self.vocab],
            "pending": [dict(p) for p in self.pending],
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> FeatureEncoder:
        """Rebuild an encoder saved by ``state_dict``."""
        enc = cls(
            state["fields"],
            capacity=state["capacities"],
            min_count=state["min_count"],
            mode=state["mode"],
            max_pending=state["max_pending"],
        )
        enc.vocab = [dict(v) for v in state["vocab"]]
        enc.pending = [dict(p) for p in state["pending"]]
        return enc
