"""A batch of samples as columns: what the trainer's feed hands over and the learner steps on.

Columns instead of ``Sample`` objects because the trainer's feed parses records in a child
process: a batch of a few lists and numpy arrays crosses the pipe for about a microsecond per
sample, where pickled ``Sample`` objects (each with a feature dict) cost as much to rebuild as
the JSON they came from. The learner's work is per column too (feature encoding, delayed-feedback
rows), so nothing is lost on that side.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Final, Literal

import numpy as np

from stream.samples import KINDS, Sample

N_TASKS: Final = 4
FIRST, CORRECTION, FINAL = 0, 1, 2  # kind codes, the order of ``stream.samples.KINDS``
KIND_CODE: Final = {k: i for i, k in enumerate(KINDS)}
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
        n = len(samples)
        features = _columns([s.features for s in samples])
        return cls(
            impression_ids=[s.impression_id for s in samples],
            bank_ids=[s.bank_id for s in samples],
            event_time_ms=np.fromiter((s.event_time_ms for s in samples), np.int64, count=n),
            kind=np.fromiter((KIND_CODE[s.kind] for s in samples), np.int8, count=n),
            seq=np.fromiter((s.seq for s in samples), np.int64, count=n),
            labels=np.array([s.labels for s in samples], np.int8).reshape(n, N_TASKS),
            mature=np.array([s.mature for s in samples], bool).reshape(n, N_TASKS),
            elapsed_ms=np.fromiter((s.elapsed_ms for s in samples), np.int64, count=n),
            watermark_ms=np.fromiter((s.watermark_ms for s in samples), np.int64, count=n),
            features=features,
        )

    @classmethod
    def from_valid(cls, objs: Sequence[dict[str, Any]]) -> SampleBatch:
        """Columns straight from objects ``stream.samples.validate_sample`` accepted (the feed's
        path: no ``Sample`` in between)."""
        n = len(objs)
        feats = [o["features"] for o in objs]
        return cls(
            impression_ids=[o["impression_id"] for o in objs],
            bank_ids=[o["bank_id"] for o in objs],
            event_time_ms=np.fromiter((o["event_time_ms"] for o in objs), np.int64, count=n),
            kind=np.fromiter((KIND_CODE[o["kind"]] for o in objs), np.int8, count=n),
            seq=np.fromiter((o["seq"] for o in objs), np.int64, count=n),
            labels=np.fromiter(chain.from_iterable([o["labels"] for o in objs]), np.int8, count=4 * n).reshape(n, N_TASKS),
            mature=np.fromiter(chain.from_iterable([o["mature"] for o in objs]), bool, count=4 * n).reshape(n, N_TASKS),
            elapsed_ms=np.fromiter((o["elapsed_ms"] for o in objs), np.int64, count=n),
            watermark_ms=np.fromiter((o.get("watermark_ms", 0) for o in objs), np.int64, count=n),
            features=_columns(feats),
        )

    @classmethod
    def empty(cls) -> SampleBatch:
        return cls.from_samples([])

    def take(self, index: np.ndarray | Sequence[int]) -> SampleBatch:
        """The rows at ``index`` (in that order)."""
        idx = np.asarray(index, np.int64)
        rows = idx.tolist()
        return SampleBatch(
            impression_ids=[self.impression_ids[i] for i in rows],
            bank_ids=[self.bank_ids[i] for i in rows],
            event_time_ms=self.event_time_ms[idx],
            kind=self.kind[idx],
            seq=self.seq[idx],
            labels=self.labels[idx],
            mature=self.mature[idx],
            elapsed_ms=self.elapsed_ms[idx],
            watermark_ms=self.watermark_ms[idx],
            features={name: [col[i] for i in rows] for name, col in self.features.items()},
        )

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
        return cls(
            impression_ids=[i for b in parts for i in b.impression_ids],
            bank_ids=[i for b in parts for i in b.bank_ids],
            event_time_ms=np.concatenate([b.event_time_ms for b in parts]),
            kind=np.concatenate([b.kind for b in parts]),
            seq=np.concatenate([b.seq for b in parts]),
            labels=np.concatenate([b.labels for b in parts]),
            mature=np.concatenate([b.mature for b in parts]),
            elapsed_ms=np.concatenate([b.elapsed_ms for b in parts]),
            watermark_ms=np.concatenate([b.watermark_ms for b in parts]),
            features=features,
        )

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



def as_batch(samples: SampleBatch | Sequence[Sample]) -> SampleBatch:
    return samples if isinstance(samples, SampleBatch) else SampleBatch.from_samples(samples)


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
