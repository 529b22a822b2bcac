"""The dynamic embedding table's vocabulary: one row budget shared by every field, rows given to
values seen often enough, and recycled from values not seen for a TTL (event time).

Why our own and not TorchRec's managed-collision modules: docs/embedding_table.md (measured).

Layout, so that the model (``aitm.layers.FusedEmbedding``) is unchanged: the model is built with
``vocab_sizes = (1,) * (F - 1) + (1 + rows,)``, whose field offsets are ``0, 1, ..., F - 1``.
Global row ``f`` is field ``f``'s out-of-vocabulary row; rows ``F .. F + rows - 1`` are the shared
pool. Field ``f``'s local id for pool row ``r`` is ``r - f`` (the model adds the offset back), and
its local id 0 is its OOV row, as with ``aitm.features.FeatureEncoder``.

- **Admission** (frequency filter): a value gets a row once it has been seen ``min_count`` times,
  counted in a count-min sketch of fixed size (``aitm.sketch``): the long tail of values seen once
  costs no memory per value.
- **No collisions**: while rows are free, every admitted value has its own row.
- **Expiry**: every row remembers the newest event time it was seen at. When a value is due a row
  and none is free, every row not seen for ``ttl_ms`` (event time, as the stream's newest event
  sees it) is recycled at once; a value that finds no free and no expired row stays OOV
  (``refused``) until one expires.
- **Reset**: every row given to a value (new or recycled) is listed by ``take_assigned``; the
  learner sets it to its field's OOV row (a new value starts where its OOV predictions were) and
  clears its optimizer state.
- ``row_seq`` numbers the assignments, so that a copy of the model taken earlier (the frozen
  baseline, the served version a publication gate compares with) can treat rows assigned after it
  as OOV: ``known_as_of(ids, marker())``.

>>> t = DynamicTable(("city", "user"), rows=2, min_count=2, ttl_ms=1000, sketch_width=64)
>>> t.encode_columns({"city": ["oslo"], "user": ["u1"]}, 1, update=True, event_time_ms=[0]).tolist()
[[0, 0]]
>>> t.encode_columns({"city": ["oslo"], "user": ["u1"]}, 1, update=True, event_time_ms=[10]).tolist()
[[2, 2]]
>>> t.take_assigned().tolist()  # global rows 2 and 3 (field offsets 0 and 1)
[2, 3]
>>> # the budget is full; at t=2000 both rows have expired, so bergen takes the first one back
>>> t.encode_columns({"city": ["bergen", "bergen"], "user": ["u1", "u1"]}, 2, update=True,
...                  event_time_ms=[2000, 2000]).tolist()
[[2, 2], [2, 2]]
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import numpy as np
import torch

from aitm.features import FeatureEncoder, columns_of, field_column
from aitm.sketch import CountMinSketch

OOV = 0
NEVER = np.iinfo(np.int64).min // 2  # last-seen time of a free row
KIND = "dynamic"


class DynamicTable:
    """Maps ``{field: value}`` rows to local ids (N, F) with a shared, recycled row budget."""

    def __init__(self, fields: Sequence[str], rows: int, min_count: int = 10, ttl_ms: int = 7 * 86_400_000,
                 sketch_width: int = 1 << 20, sketch_depth: int = 3) -> None:
        if not fields:
            raise ValueError("a dynamic table needs at least one field")
        if rows < 1:
            raise ValueError(f"rows (TRAINER_EMBEDDING_ROWS) must be >= 1, got {rows}")
        if not 1 <= min_count <= 255 or ttl_ms < 1:
            raise ValueError(f"min_count must be in 1..255 (the sketch's counters are bytes) and ttl_ms >= 1, "
                             f"got {min_count} and {ttl_ms}")
        self.fields = tuple(fields)
        self.n_fields = len(self.fields)
        self.rows = int(rows)
        self.min_count = int(min_count)
        self.ttl_ms = int(ttl_ms)
        self.sketch = CountMinSketch(sketch_width, sketch_depth)
        self.vocab: list[dict[str, int]] = [{} for _ in self.fields]  # value -> local id (row - field)
        total = self.n_fields + self.rows
        self.last_seen = np.full(total, NEVER, np.int64)  # (R,) event time; NEVER = free / OOV row
        self.row_seq = np.zeros(total, np.int64)  # (R,) assignment number of the row's holder
        self.row_field = np.full(total, -1, np.int16)  # (R,) -1 = free
        self.row_value: list[str | None] = [None] * total
        # free pool rows, a stack: the lowest rows are handed out first
        self.free = np.arange(total - 1, self.n_fields - 1, -1, dtype=np.int64)
        self.n_free = self.rows
        self.assigned: list[int] = []  # rows given since the last take_assigned()
        self.now_ms = NEVER  # newest event time seen
        self.next_expiry_ms = NEVER  # no row can have expired before this event time
        self.admissions = 0  # lifetime counters
        self.evictions = 0
        self.refused = 0  # admissions due that found no free or expired row
        self.lookups = np.zeros(self.n_fields, np.int64)  # training look-ups per field
        self.misses = np.zeros(self.n_fields, np.int64)  # ... that were OOV

    # --- the model's shape -----------------------------------------------------------------------

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """The model's ``vocab_sizes``: offsets 0..F-1, F + rows rows in all (see the module doc)."""
        return (1,) * (self.n_fields - 1) + (1 + self.rows,)

    @property
    def rows_used(self) -> int:
        return self.rows - self.n_free

    @property
    def mode(self) -> str:
        return KIND

    # --- encoding --------------------------------------------------------------------------------

    def encode_column(self, f: int, values: Sequence[str], update: bool = False,
                      event_time_ms: np.ndarray | None = None) -> np.ndarray:
        """One field's values (N,) -> local ids (N,); with ``update``, count, admit and touch."""
        vocab = self.vocab[f]
        ids = np.fromiter(map(vocab.get, values, repeat(OOV)), np.int64, count=len(values))
        if not update:
            return ids
        if event_time_ms is None:
            raise ValueError("a training encode needs the rows' event times (event_time_ms)")
        times = np.asarray(event_time_ms, np.int64)
        hit = ids != OOV
        rows = ids[hit] + f
        # the newest sighting per row (a row listed twice keeps one of its times: within a batch)
        self.last_seen[rows] = np.maximum(self.last_seen[rows], times[hit])
        miss = np.flatnonzero(~hit)
        self.lookups[f] += len(values)
        if miss.size:
            missing = [values[i] for i in miss.tolist()]
            if self._admit(f, Counter(missing), int(times[miss].max())):
                again = np.fromiter(map(vocab.get, missing, repeat(OOV)), np.int64, count=len(missing))
                ids[miss] = again
            self.misses[f] += int((ids[miss] == OOV).sum())
        return ids

    def _admit(self, f: int, counts: Counter[str], time_ms: int) -> bool:
        """Count the sightings of values with no row; give a row to those seen ``min_count`` times."""
        keys = list(counts)
        prefix = f"{f}\x1f"
        est = self.sketch.add([prefix + k for k in keys], [counts[k] for k in keys])
        due = [k for k, e in zip(keys, est.tolist(), strict=True) if e >= self.min_count]
        admitted = False
        for i, key in enumerate(due):
            row = self._take_row()
            if row is None:
                self.refused += len(due) - i
                break
            self.vocab[f][key] = row - f
            self.row_field[row] = f
            self.row_value[row] = key
            self.last_seen[row] = time_ms
            self.admissions += 1
            self.row_seq[row] = self.admissions
            self.assigned.append(row)
            admitted = True
        return admitted

    def _take_row(self) -> int | None:
        if self.n_free == 0 and self.now_ms - self.ttl_ms >= self.next_expiry_ms:
            self._recycle_expired()
        if self.n_free == 0:
            return None
        self.n_free -= 1
        return int(self.free[self.n_free])

    def _recycle_expired(self) -> None:
        """Free every row not seen for ``ttl_ms`` of event time; note when the next one can expire."""
        used = self.row_field >= 0
        cutoff = self.now_ms - self.ttl_ms
        expired = np.flatnonzero(used & (self.last_seen < cutoff))
        for row in expired.tolist():
            f = int(self.row_field[row])
            value = self.row_value[row]
            assert value is not None, "a used row has a value"
            del self.vocab[f][value]
            self.row_field[row] = -1
            self.row_value[row] = None
            self.last_seen[row] = NEVER
        # lowest rows on top of the stack, after whatever is still free
        self.free[self.n_free : self.n_free + expired.size] = expired[::-1]
        self.n_free += int(expired.size)
        self.evictions += int(expired.size)
        left = self.last_seen[self.row_field >= 0]
        self.next_expiry_ms = int(left.min()) + 1 if left.size else NEVER

    def encode_columns(self, columns: Mapping[str, Sequence[str]], n: int, update: bool = False,
                       event_time_ms: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Encode feature columns ``{field: (N,) values}`` -> (N, F); a missing field is ``""``.

        ``update`` (training) counts, admits and touches, at the rows' ``event_time_ms`` (N,)."""
        times = None if event_time_ms is None else np.asarray(event_time_ms, np.int64)
        if update:
            if times is None or len(times) != n:
                raise ValueError(f"a training encode needs {n} event times (event_time_ms)")
            if n:
                self.now_ms = max(self.now_ms, int(times.max()))
        out = np.empty((n, self.n_fields), dtype=np.int64)
        for f, name in enumerate(self.fields):
            out[:, f] = self.encode_column(f, field_column(columns, name, n), update, times)
        return out

    def encode_dicts(self, rows: Sequence[Mapping[str, str]], update: bool = False,
                     event_time_ms: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Encode feature dicts ``{field: value_str}`` -> (N, F); a missing field is ``""``."""
        columns = columns_of(self.fields, rows)
        return self.encode_columns(dict(zip(self.fields, columns, strict=True)), len(rows), update, event_time_ms)

    # --- what the learner and the baselines need -----------------------------------------------

    def take_assigned(self) -> np.ndarray:
        """Global rows given to a value since the last call (N,): to reset, with their optimizer
        state, before the model uses them."""
        out = np.asarray(self.assigned, np.int64)
        self.assigned = []
        return out

    def oov_rows(self, rows: np.ndarray) -> np.ndarray:
        """The OOV row of each given global row's field (N,)."""
        return self.row_field[rows].astype(np.int64)

    def marker(self) -> int:
        """The assignments so far: ``known_as_of(ids, marker)`` later maps rows given since to OOV."""
        return self.admissions

    def known_as_of(self, ids: np.ndarray, marker: Any) -> np.ndarray:
        """``ids`` (N, F) with every row assigned after ``marker`` replaced by OOV (0)."""
        if marker is None:
            return ids
        rows = ids + np.arange(self.n_fields)  # (N, F) global rows
        return np.where(self.row_seq[rows] > int(marker), OOV, ids)

    def memory_bytes(self) -> int:
        """Bytes of the vocabulary: the per-row arrays, the sketch and the value dicts (estimated
        with ``sys.getsizeof``; the embedding rows themselves are the model's)."""
        arrays = self.last_seen.nbytes + self.row_seq.nbytes + self.row_field.nbytes + self.free.nbytes
        lists = sys.getsizeof(self.row_value)
        dicts = sum(sys.getsizeof(v) + sum(sys.getsizeof(k) for k in v) for v in self.vocab)
        return int(arrays + lists + dicts + self.sketch.nbytes)

    def stats(self) -> dict[str, Any]:
        return {"rows": self.rows, "rows_used": self.rows_used, "admissions": self.admissions,
                "evictions": self.evictions, "refused": self.refused}

    # --- state -----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain data and tensors, safe for ``torch.load(weights_only=True)``; exact on reload."""
        used = np.flatnonzero(self.row_field >= 0).astype(np.int64)
        seq = np.flatnonzero(self.row_seq > 0).astype(np.int64)
        return {
            "kind": KIND,
            "fields": list(self.fields),
            "rows": self.rows,
            "min_count": self.min_count,
            "ttl_ms": self.ttl_ms,
            "sketch": self.sketch.state_dict(),
            "vocab": [dict(v) for v in self.vocab],
            # per-row state only where there is some: last-seen times of the rows in use, assignment
            # numbers of the rows ever assigned (a freed row keeps its last holder's, for ids encoded
            # before); the free stack in its order (which row goes next), as int32
            "used_rows": torch.from_numpy(used),
            "used_last_seen": torch.from_numpy(self.last_seen[used]),
            "seq_rows": torch.from_numpy(seq),
            "seq_values": torch.from_numpy(self.row_seq[seq]),
            "free": torch.from_numpy(self.free[: self.n_free].astype(np.int32)),
            "assigned": list(self.assigned),
            "now_ms": self.now_ms,
            "next_expiry_ms": self.next_expiry_ms,
            "admissions": self.admissions,
            "evictions": self.evictions,
            "refused": self.refused,
            "lookups": torch.from_numpy(self.lookups.copy()),
            "misses": torch.from_numpy(self.misses.copy()),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DynamicTable:
        sk = state["sketch"]
        t = cls(state["fields"], int(state["rows"]), int(state["min_count"]), int(state["ttl_ms"]),
                int(sk["width"]), int(sk["depth"]))
        t.sketch = CountMinSketch.from_state_dict(sk)
        t.vocab = [dict(v) for v in state["vocab"]]
        for f, vocab in enumerate(t.vocab):  # the row -> value map is the vocabulary inverted
            for value, local in vocab.items():
                t.row_field[local + f] = f
                t.row_value[local + f] = value
        used = state["used_rows"].numpy()
        t.last_seen[used] = state["used_last_seen"].numpy()
        t.row_seq[state["seq_rows"].numpy()] = state["seq_values"].numpy()
        free = state["free"].numpy().astype(np.int64)
        t.n_free = int(free.size)
        t.free[: t.n_free] = free
        t.assigned = [int(r) for r in state["assigned"]]
        t.now_ms = int(state["now_ms"])
        t.next_expiry_ms = int(state["next_expiry_ms"])
        t.admissions = int(state["admissions"])
        t.evictions = int(state["evictions"])
        t.refused = int(state["refused"])
        t.lookups = state["lookups"].numpy().copy()
        t.misses = state["misses"].numpy().copy()
        return t


def oov_rate(table: DynamicTable) -> dict[str, float]:
    """Lifetime share of training look-ups that were OOV, per field (NaN before any)."""
    return {name: float(table.misses[f] / table.lookups[f]) if table.lookups[f] else float("nan")
            for f, name in enumerate(table.fields)}


Encoder = FeatureEncoder | DynamicTable  # what the learner, the scorer and the baselines accept


def encoder_from_state(state: Mapping[str, Any]) -> Encoder:
    """The encoder a checkpoint's ``feature_maps`` describe: a dynamic table or a fixed encoder."""
    if state.get("kind") == KIND:
        return DynamicTable.from_state_dict(state)
    return FeatureEncoder.from_state_dict(state)
