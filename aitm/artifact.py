"""Serving artifacts: what a scorer needs of a model version, apart from the training checkpoint.

A training checkpoint carries the served model, the trained weights, the optimizer's moments, the
weight average, the evaluators and the table's sketch: ~6 copies of the embedding table. A scorer
needs one copy of the served weights and the vocabulary. Two kinds, plain dicts of tensors and
lists (``torch.load(weights_only=True)``-safe; written with ``aitm.checkpoint.save_checkpoint``):

- **full**: the model config, every dense weight (everything but the embedding table), the
  whole table, and the vocabulary (every row in use: its field and value);
- **delta**: the dense weights, and only the table rows changed since the previous version
  (``base_version``): their new values, and for rows whose holder changed their new field and
  value (field -1: freed).

A checksum chain ties them: every artifact carries the sha256 of its content (``digest``, over
every tensor and value it carries) and its version's ``chain``: ``sha256(base_chain + digest)``
of the version's delta (of the full snapshot, for a version with none: a writer's first). Every
``full_every`` versions the writer adds a full snapshot beside the delta, with the delta's chain:
a scorer in step applies the delta, one that starts or has lost the chain loads the snapshot. A
reader applies a delta only to the version it was made against (``base_version`` and
``base_chain`` equal to its own) and only if its digest and chain recompute; otherwise it falls
back to a full snapshot. Applying a delta to the
previous version gives exactly the full snapshot's weights and vocabulary (tested bit for bit).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import torch

from aitm.checkpoint import config_from_dict
from aitm.embedding_table import DynamicTable
from aitm.model import AITM

TABLE: Final = "embedding.table.weight"
FORMAT: Final = 1
FULL: Final = "full"
DELTA: Final = "delta"


class ArtifactError(Exception):
    """A serving artifact that does not fit: another base, a broken chain, a damaged payload."""


def dense_state(model: AITM) -> dict[str, torch.Tensor]:
    """Every entry of the model's state but the embedding table, cloned to the CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if k != TABLE}


def _vocab_of(table: DynamicTable, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """The vocabulary of ``rows``: their fields, and their values as one UTF-8 text (a uint8
    tensor) with each value's length in characters - not a list of strings, which
    ``torch.save``/``torch.load(weights_only=True)`` pickle one Python object at a time (minutes
    at 10M rows; this is seconds)."""
    return _vocab_from(table.row_field, table.row_value, rows)


def _vocab_from(row_field: np.ndarray, row_value: list[str | None], rows: np.ndarray) -> dict[str, torch.Tensor]:
    values = [row_value[r] or "" for r in rows.tolist()]
    text = "".join(values).encode()
    return {"vocab_rows": torch.from_numpy(rows.astype(np.int64)),
            "vocab_fields": torch.from_numpy(row_field[rows].astype(np.int16)),
            "vocab_text": torch.frombuffer(bytearray(text), dtype=torch.uint8) if text else torch.zeros(0, dtype=torch.uint8),
            "vocab_lengths": torch.from_numpy(np.fromiter(map(len, values), np.int64, count=len(values)))}


def vocab_values(art: Mapping[str, Any]) -> list[str]:
    """The values of an artifact's ``vocab_rows``, in order."""
    text = art["vocab_text"].numpy().tobytes().decode()
    ends = np.cumsum(art["vocab_lengths"].numpy()).tolist()
    return [text[a:b] for a, b in zip([0, *ends][: len(ends)], ends, strict=True)]


def content_digest(art: Mapping[str, Any]) -> str:
    """sha256 over what the artifact carries (kind, versions, rows, values, dense weights, vocabulary)."""
    h = hashlib.sha256()
    h.update(f"{art['kind']}|{art['version']}|{art.get('base_version')}|".encode())
    for name in ("rows", "values", "vocab_rows", "vocab_fields", "vocab_text", "vocab_lengths"):
        h.update(np.ascontiguousarray(art[name].numpy()).tobytes())
    for name in sorted(art["dense"]):
        h.update(name.encode())
        h.update(np.ascontiguousarray(art["dense"][name].numpy()).tobytes())
    return h.hexdigest()


def chained(base_chain: str, digest: str) -> str:
    return hashlib.sha256((base_chain + digest).encode()).hexdigest()


def _seal(art: dict[str, Any], chain: str | None = None) -> dict[str, Any]:
    art["digest"] = content_digest(art)
    art["chain"] = chain if chain is not None else chained(art["base_chain"], art["digest"])
    return art


def full_artifact(version: int, model: AITM, table: DynamicTable, base_chain: str = "",
                  chain: str | None = None, defer: bool = False) -> dict[str, Any]:
    """The whole served version (a snapshot: cloned). ``base_chain`` continues the writer's chain;
    ``chain``: the version's chain when its delta defines it (a snapshot written beside a delta).
    ``defer`` (with ``chain``): only the copies are made here (the table's weights, the row
    holders: memcpy and a list of references); the vocabulary text and the digest - seconds of
    Python at 10M rows - are left to ``finish``, on the thread that writes it."""
    used = np.flatnonzero(table.row_field >= 0).astype(np.int64)
    weight = model.state_dict()[TABLE].detach().cpu()
    art = {
        "format": FORMAT, "kind": FULL, "version": int(version), "base_version": None, "base_chain": base_chain,
        "config": dataclasses.asdict(model.config), "fields": list(table.fields), "table_rows": table.rows,
        "rows": torch.arange(weight.shape[0], dtype=torch.int64), "values": weight.clone(),
        "dense": dense_state(model),
    }
    if defer and chain is not None:
        art[_PENDING] = (table.row_field.copy(), list(table.row_value), used, chain)
        art["chain"] = chain  # known now (the delta's); the digest waits for ``finish``
        return art
    return _seal({**art, **_vocab_of(table, used)}, chain)


_PENDING: Final = "_pending_vocab"


def finish(art: dict[str, Any]) -> dict[str, Any]:
    """A deferred full snapshot (``full_artifact(..., defer=True)``) made whole: its vocabulary
    built from the holders copied then, and sealed. Anything else: as it is."""
    if _PENDING not in art:
        return art
    row_field, row_value, used, chain = art.pop(_PENDING)
    art.update(_vocab_from(row_field, row_value, used))
    return _seal(art, chain)


def delta_artifact(version: int, base_version: int, base_chain: str, model: AITM, table: DynamicTable,
                   rows: np.ndarray, vocab_rows: np.ndarray) -> dict[str, Any]:
    """The rows ``rows`` of the served table (changed since ``base_version``) and the dense weights;
    the vocabulary of ``vocab_rows`` (rows whose holder changed: assigned or freed)."""
    weight = model.state_dict()[TABLE].detach()
    at = torch.from_numpy(np.unique(rows).astype(np.int64))
    return _seal({
        "format": FORMAT, "kind": DELTA, "version": int(version), "base_version": int(base_version),
        "base_chain": base_chain, "rows": at, "values": weight[at.to(weight.device)].cpu().clone(),
        "dense": dense_state(model), **_vocab_of(table, np.unique(vocab_rows).astype(np.int64)),
    })


def verify(art: Mapping[str, Any]) -> None:
    """Raise ``ArtifactError`` unless the artifact's digest (and a delta's chain) match its content."""
    if art.get("format") != FORMAT or art.get("kind") not in (FULL, DELTA):
        raise ArtifactError(f"not a serving artifact of format {FORMAT}")
    digest = content_digest(art)
    if digest != art["digest"] or (art["kind"] == DELTA and chained(art["base_chain"], digest) != art["chain"]):
        raise ArtifactError(f"version {art['version']}: its content does not match its checksums")


@dataclasses.dataclass
class Replica:
    """A scorer's copy of the served model: one model, one vocabulary, changed in place by deltas."""

    version: int
    chain: str
    model: AITM
    table: DynamicTable

    @classmethod
    def from_full(cls, art: Mapping[str, Any]) -> Replica:
        art = finish(dict(art))  # one built deferred, not yet written
        verify(art)
        if art["kind"] != FULL:
            raise ArtifactError(f"version {art['version']} is a delta, not a full snapshot")
        model = AITM(config_from_dict(art["config"]))
        state = dict(art["dense"])
        state[TABLE] = art["values"]
        model.load_state_dict(state)
        model.eval()
        # the serving vocabulary: no sketch to speak of, never updated
        table = DynamicTable(art["fields"], int(art["table_rows"]), sketch_width=16, sketch_depth=1)
        table.free = np.zeros(0, np.int64)
        table.n_free = 0
        _apply_vocab(table, art)
        return cls(int(art["version"]), str(art["chain"]), model, table)

    @torch.no_grad()
    def apply(self, art: Mapping[str, Any]) -> None:
        """Apply the next delta in place; ``ArtifactError`` (nothing changed) unless it is made
        against this version and its chain holds."""
        if art.get("kind") != DELTA:
            raise ArtifactError(f"version {art.get('version')} is not a delta")
        if art["base_version"] != self.version or art["base_chain"] != self.chain:
            raise ArtifactError(f"delta {art['version']} is made against version {art['base_version']}, "
                                f"this replica holds {self.version} (or another chain): the chain is broken")
        verify(art)
        weight = self.model.embedding.table.weight
        weight[art["rows"]] = art["values"].to(weight)
        self.model.load_state_dict(art["dense"], strict=False)
        _apply_vocab(self.table, art)
        self.version, self.chain = int(art["version"]), str(art["chain"])


def _apply_vocab(table: DynamicTable, art: Mapping[str, Any]) -> None:
    """Each listed row's holder replaced: the old value unmapped, the new one mapped (field -1: free).
    A full snapshot fills a fresh table: its dicts are built at once."""
    rows, fields = art["vocab_rows"].numpy(), art["vocab_fields"].numpy()
    values = vocab_values(art)
    holders = table.row_value
    if art["kind"] == FULL:
        table.row_field[rows] = fields
        for row, value in zip(rows.tolist(), values, strict=True):
            holders[row] = value
        for f in range(table.n_fields):
            at = np.flatnonzero(fields == f)
            table.vocab[f] = dict(zip([values[i] for i in at.tolist()], (rows[at] - f).tolist(), strict=True))
        return
    for row, f, value in zip(rows.tolist(), fields.tolist(), values, strict=True):
        old_f, old_value = int(table.row_field[row]), holders[row]
        if old_f >= 0 and old_value is not None and table.vocab[old_f].get(old_value) == row - old_f:
            del table.vocab[old_f][old_value]
        table.row_field[row] = f
        holders[row] = value if f >= 0 else None
        if f >= 0:
            table.vocab[f][value] = row - f
