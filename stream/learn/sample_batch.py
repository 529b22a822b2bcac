"""A batch of samples as columns: what the trainer's feed hands over and the learner steps on.

Columns instead of ``Sample`` objects because the trainer's feed parses records in a child
process: a batch of a few lists and numpy arrays crosses the pipe for about a microsecond per
sample, where pickled ``Sample`` objects (each with a feature dict) cost as much to rebuild as
the JSON they came from. The learner's work is per column too (feature encoding, delayed-feedback
rows), so nothing is lost on that side.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from operator import attrgetter, itemgetter
from typing import Any, Final, Literal

import numpy as np

from stream.contract.samples import KINDS, Sample, SampleRecord, feature_names

N_TASKS: Final = 4
FIRST, CORRECTION, FINAL = 0, 1, 2  # kind codes, the order of ``stream.contract.samples.KINDS``
KIND_CODE: Final = {k: i for i, k in enumerate(KINDS)}
_TASK_BITS: Final = np.arange(N_TASKS, dtype=np.uint8)
_KIND_NAMES: Final[tuple[Literal["first"], Literal["correction"], Literal["final"]]] = ("first", "correction", "final")


@dataclass(frozen=True, eq=False)
class SampleBatch:
    """N samples as columns; ``features`` maps a field to its N values ("" where a sample lacks it)."""

    impression_ids: list[str]
    bank_ids: list[str]
    event_time_ms: np.ndarray  # (N,) int64
    kind: np.ndarray  # (N,) int8: FIRST / CORRECTION / FINAL
    seq: np.ndarray  # (N,) int64
    labels: np.ndarray  # (N, T) int8
    mature: np.ndarray  # (N, T) bool
    elapsed_ms: np.ndarray  # (N,) int64
    watermark_ms: np.ndarray  # (N,) int64
    features: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.impression_ids)

    @classmethod
    def from_samples(cls, samples: Sequence[Sample]) -> SampleBatch:
        return cls._build(samples, getattr)

    @classmethod
    def from_valid(cls, objs: Sequence[dict[str, Any]]) -> SampleBatch:
        """Columns straight from objects ``stream.contract.samples.validate_sample`` accepted (the feed's
        path: no ``Sample`` in between; their keys are ``Sample``'s field names)."""
        return cls._build(objs, dict.__getitem__)

    @classmethod
    def from_records(cls, records: Sequence[SampleRecord]) -> SampleBatch:
        """Columns from decoded records (``stream.contract.samples.decode_record``: either encoding)."""
        n = len(records)

        def ints(name: str, dtype: type = np.int64) -> np.ndarray:
            return np.fromiter(map(attrgetter(name), records), dtype, count=n)

        flags = ints("flags", np.uint8)[:, None]  # (N, 1): bit t label, bit 4 + t mature
        return cls(
            impression_ids=list(map(attrgetter("impression_id"), records)),
            bank_ids=list(map(attrgetter("bank_id"), records)),
            event_time_ms=ints("event_time_ms"),
            kind=ints("kind", np.int8),
            seq=ints("seq"),
            labels=(flags >> _TASK_BITS & 1).astype(np.int8),
            mature=(flags >> (_TASK_BITS + N_TASKS) & 1).astype(bool),
            elapsed_ms=ints("elapsed_ms"),
            watermark_ms=ints("watermark_ms"),
            features=_record_columns(records),
        )

    @classmethod
    def _build(cls, rows: Sequence[Any], get: Callable[[Any, str], Any]) -> SampleBatch:
        """``rows`` read by field name with ``get`` (``getattr`` or ``dict.__getitem__``): every
        look-up is a ``map`` in C, no Python frame per row."""
        n = len(rows)

        def column(name: str) -> Iterator[Any]:
            return map(get, rows, repeat(name))

        def ints(name: str) -> np.ndarray:
            return np.fromiter(column(name), np.int64, count=n)

        def per_task(name: str, dtype: type) -> np.ndarray:
            return np.fromiter(chain.from_iterable(column(name)), dtype, count=N_TASKS * n).reshape(n, N_TASKS)

        return cls(
            impression_ids=list(column("impression_id")),
            bank_ids=list(column("bank_id")),
            event_time_ms=ints("event_time_ms"),
            kind=np.fromiter(map(KIND_CODE.__getitem__, column("kind")), np.int8, count=n),
            seq=ints("seq"),
            labels=per_task("labels", np.int8),
            mature=per_task("mature", bool),
            elapsed_ms=ints("elapsed_ms"),
            watermark_ms=ints("watermark_ms"),
            features=_columns(list(column("features"))),
        )

    @classmethod
    def empty(cls) -> SampleBatch:
        return cls.from_samples([])

    def take(self, index: np.ndarray | Sequence[int]) -> SampleBatch:
        """The rows at ``index`` (in that order)."""
        idx = np.asarray(index, np.int64)
        rows = idx.tolist()
        columns: dict[str, Any] = {name: [getattr(self, name)[i] for i in rows] for name in _LISTS}
        columns.update({name: getattr(self, name)[idx] for name in _ARRAYS})
        return SampleBatch(**columns, features={name: [col[i] for i in rows] for name, col in self.features.items()})

    @classmethod
    def concat(cls, batches: Iterable[SampleBatch]) -> SampleBatch:
        parts = [b for b in batches if len(b)]
        if len(parts) == 1:
            return parts[0]
        if not parts:
            return cls.empty()
        names = sorted({name for b in parts for name in b.features})
        features: dict[str, list[str]] = {}
        for name in names:
            col: list[str] = []
            for b in parts:
                got = b.features.get(name)
                col += got if got is not None else [""] * len(b)
            features[name] = col
        columns: dict[str, Any] = {name: [x for b in parts for x in getattr(b, name)] for name in _LISTS}
        columns.update({name: np.concatenate([getattr(b, name) for b in parts]) for name in _ARRAYS})
        return cls(**columns, features=features)

    def kind_counts(self) -> dict[str, int]:
        counts = np.bincount(self.kind, minlength=len(KINDS))
        return {k: int(c) for k, c in zip(KINDS, counts.tolist(), strict=False) if c}

    def sample(self, i: int) -> Sample:
        """Row ``i`` as a ``Sample`` (features without the "" fill of fields it lacked)."""
        labels = self.labels[i].tolist()
        mature = self.mature[i].tolist()
        return Sample(
            impression_id=self.impression_ids[i],
            bank_id=self.bank_ids[i],
            event_time_ms=int(self.event_time_ms[i]),
            features={name: col[i] for name, col in self.features.items() if col[i] != ""},
            labels=(labels[0], labels[1], labels[2], labels[3]),
            mature=(mature[0], mature[1], mature[2], mature[3]),
            kind=_KIND_NAMES[int(self.kind[i])],
            elapsed_ms=int(self.elapsed_ms[i]),
            seq=int(self.seq[i]),
            watermark_ms=int(self.watermark_ms[i]),
        )


_LISTS: Final = ("impression_ids", "bank_ids")  # the row-wise columns besides ``features``
_ARRAYS: Final = ("event_time_ms", "kind", "seq", "labels", "mature", "elapsed_ms", "watermark_ms")


def as_batch(samples: SampleBatch | Sequence[Sample]) -> SampleBatch:
    return samples if isinstance(samples, SampleBatch) else SampleBatch.from_samples(samples)


def _record_columns(records: Sequence[SampleRecord]) -> dict[str, list[str]]:
    """The feature columns of decoded records, sorted by field: one transpose when they share one
    field list (the usual case: one joiner, one impression schema), else via feature dicts."""
    if not records:
        return {}
    packed = set(map(bytes, map(attrgetter("names"), records)))
    if len(packed) > 1:
        return _columns([r.features for r in records])
    names = feature_names(packed.pop())
    if not names:
        return {}
    values = zip(*map(attrgetter("values"), records), strict=True)  # (F,) tuples of N values
    return dict(sorted(zip(names, map(list, values), strict=True)))


def _columns(rows: Sequence[dict[str, str]]) -> dict[str, list[str]]:
    """Feature dicts -> ``{field: values}``, sorted by field; "" where a row lacks the field."""
    if not rows:
        return {}
    names = sorted(rows[0])
    if names and all(len(r) == len(names) for r in rows):
        try:  # the usual case, every row with the same fields: one C-level pass per row
            get = itemgetter(*names)
            values = [get(r) for r in rows]
            if len(names) == 1:
                return {names[0]: list(values)}
            return dict(zip(names, map(list, zip(*values, strict=True)), strict=True))
        except KeyError:
            pass
    every: set[str] = set()
    for r in rows:
        every.update(r)
    return {name: [r.get(name, "") for r in rows] for name in sorted(every)}
