"""The HTTP endpoint's fast forward: each model version served through onnxruntime.

Measured on this machine (AITM, paper sizes, one thread, batch 1): the eager torch forward costs
0.40 ms (0.86 ms at load 5), onnxruntime 0.05 ms, and the encoder's general ``encode_dicts`` 0.11 ms
against 0.01 ms for the plain look-ups of ``RowEncoder``. A scoring request spent most of its
server CPU there (profile in docs/http.md).

- ``OnnxModel.build``: exports ``ServedModel`` (the probabilities in funnel order, exactly what
  ``ScoringModel.predict`` serves) with torch's ONNX exporter into memory, opens an onnxruntime
  session on one thread, and checks it against the eager model on ids of several batch sizes:
  a difference over ``TOLERANCE`` (1e-5) and the version is served eager. About 0.35 s of CPU
  per version.
- ``Accelerator``: what ``Scorer.score_items`` calls. Once a version has scored ``BUILD_AFTER``
  (1,000) impressions over HTTP - the export's break-even - it starts that build in a background
  thread; requests are scored eager until the build is ready, then through onnxruntime. A new
  version (hot reload) gets its own count and build, so answers always come from the version the
  scorer holds, and a scorer with no or little HTTP traffic never pays for a build. ``SCORER_HTTP_ENGINE=torch`` turns it
  off (always eager).
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch

from aitm.embedding_table import DynamicTable
from aitm.features import OOV, FeatureEncoder
from stream.serve.onnx_export import to_onnx
from stream.serve.scoring import ScoringModel, ServedModel

ENGINES: Final = ("onnx", "torch")
TOLERANCE: Final = 1e-5  # largest |onnxruntime - torch| allowed on the check ids
CHECK_SIZES: Final = (1, 2, 7, 64, 300)  # batch sizes of the check
BUILD_AFTER: Final = 1000  # impressions a version scores eager before its copy is built
log = logging.getLogger(__name__)
_EXPORTING = threading.Lock()  # torch's ONNX exporter keeps global state: one export at a time


class RowEncoder:
    """``encoder.encode_dicts`` for an encoder that only looks values up (the dynamic table, a
    threshold-mode ``FeatureEncoder``): the same ids, without the column pass that pays off only
    for large batches. ``None`` from ``of`` for any other encoder (hash mode)."""

    def __init__(self, fields: Sequence[str], vocab: Sequence[Mapping[str, int]]) -> None:
        self.pairs = tuple(zip(fields, vocab, strict=True))

    @classmethod
    def of(cls, encoder: Any) -> RowEncoder | None:
        if isinstance(encoder, DynamicTable) or (isinstance(encoder, FeatureEncoder) and encoder.mode == "threshold"):
            return cls(encoder.fields, encoder.vocab)
        return None

    def encode(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Feature dicts -> ids (N, F) int64; a missing field is ``""``, an unknown value ``OOV``."""
        pairs = self.pairs
        flat = [vocab.get(row.get(name, ""), OOV) for row in rows for name, vocab in pairs]
        return np.array(flat, dtype=np.int64).reshape(len(rows), len(pairs))  # (N, F)


def _check_ids(m: ScoringModel, seed: int = 0) -> list[np.ndarray]:
    """Ids (n, F) for each check size: the first row all OOV, the rest random rows of the
    embedding table (field ``f``'s local id ``j`` is row offset[f] + j, any row is a valid input)."""
    sizes = np.asarray(m.model.config.vocab_sizes, np.int64)  # (F,)
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # (F,)
    highs = int(sizes.sum()) - offsets  # (F,) local ids 0..highs-1 stay inside the table
    rng = np.random.default_rng(seed)
    out = []
    for n in CHECK_SIZES:
        ids = (rng.random((n, len(highs))) * highs).astype(np.int64)  # (n, F)
        ids[0] = OOV
        out.append(ids)
    return out


@dataclass(frozen=True)
class OnnxModel:
    """A version served through onnxruntime: ``predict`` is ``ScoringModel.predict`` within
    ``TOLERANCE``."""

    version: int
    session: Any  # onnxruntime.InferenceSession
    encoder: RowEncoder | None
    source: ScoringModel
    max_diff: float

    @classmethod
    def build(cls, m: ScoringModel) -> OnnxModel | None:
        """The version exported and checked, or None (logged) if export or the check fails."""
        try:
            import onnxruntime as ort

            served = ServedModel(m.model).eval()
            n_fields = len(m.encoder.fields)
            buf = io.BytesIO()
            # a replica's versions share their weights and the scorer applies a delta in place under
            # the version's lock (stream.serve.replica): export and check one version's weights
            with m.lock if m.lock is not None else contextlib.nullcontext():
                with _EXPORTING:
                    to_onnx(served, n_fields, buf)
                opts = ort.SessionOptions()
                opts.intra_op_num_threads = 1  # batch-1 latency: one thread (as SCORER_THREADS)
                opts.inter_op_num_threads = 1
                opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                opts.log_severity_level = 3
                session = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
                diff = 0.0
                with torch.inference_mode():
                    for ids in _check_ids(m):
                        want = served(torch.from_numpy(ids)).numpy()
                        got = session.run(None, {"ids": ids})[0]
                        diff = max(diff, float(np.abs(got - want).max()))
        except Exception as exc:  # an optimisation: the eager model stays in use
            log.warning("model version %d served eager (ONNX export failed: %s)", m.version, exc)
            return None
        if not diff <= TOLERANCE:
            log.warning("model version %d served eager (onnxruntime differs by %.2g > %g)", m.version, diff, TOLERANCE)
            return None
        return cls(m.version, session, RowEncoder.of(m.encoder), m, diff)

    def ids(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        if self.encoder is not None:
            return self.encoder.encode(rows)
        return self.source.encoder.encode_dicts(rows)

    def predict(self, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """Probabilities (N, T) in funnel order, as ``ScoringModel.predict``."""
        out: np.ndarray = self.session.run(None, {"ids": self.ids(rows)})[0]
        return out


class Accelerator:
    """Scores with the onnxruntime copy of a version once it is built, with the version itself
    until then; ``engine="torch"``: never.

    A version's copy is built (in the background) once the version has scored ``build_after``
    impressions over HTTP: the export's ~0.35 s of CPU pays for itself after about 1,000 batch-1
    forwards (0.35 ms saved each), so a version replaced within seconds under light traffic (a
    prober, a version every 3 s) is never exported, and a busy endpoint gets its copy within a
    second."""

    def __init__(self, engine: str = "onnx", build_after: int = BUILD_AFTER) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r}: use one of {', '.join(ENGINES)}")
        self.engine = engine
        self.build_after = build_after
        self._for: ScoringModel | None = None  # the version the counts and the build below are for
        self._fast: OnnxModel | None = None
        self._seen = 0  # impressions ``_for`` scored eager
        self._started = False
        self._lock = threading.Lock()
        self.builds = 0  # builds started (for tests and metrics)
        self.ready = threading.Event()  # set when the build for ``_for`` has finished (either way)

    def fast_for(self, m: ScoringModel, n: int = 0) -> OnnxModel | None:
        """The fast copy of ``m`` if ready, else None; counts ``n`` impressions about to be scored
        eager and starts the build once ``build_after`` is reached (``build_after=0``: at once)."""
        if self.engine == "torch":
            return None
        if self._for is not m:
            with self._lock:
                if self._for is not m:  # a new version: its own counts and copy
                    self._for, self._fast, self._seen, self._started = m, None, 0, False
                    self.ready = threading.Event()
        fast = self._fast
        if fast is not None and fast.source is m:
            return fast
        self._seen += n
        if not self._started and self._seen >= self.build_after:
            with self._lock:
                if self._for is m and not self._started:
                    self._started = True
                    self.builds += 1
                    threading.Thread(target=self._build, args=(m, self.ready), name="onnx-build", daemon=True).start()
        return None

    def _build(self, m: ScoringModel, done: threading.Event) -> None:
        if self._for is not m:  # a newer version came while this one waited: skip it
            done.set()
            return
        fast = OnnxModel.build(m)
        with self._lock:
            if self._for is m:
                self._fast = fast
        if fast is not None:
            log.info("model version %d served through onnxruntime (max diff %.2g)", m.version, fast.max_diff)
        done.set()

    def predict(self, m: ScoringModel, rows: Sequence[Mapping[str, str]]) -> np.ndarray:
        """``m.predict(rows)``, through onnxruntime when its copy is ready."""
        fast = self.fast_for(m, len(rows))
        return fast.predict(rows) if fast is not None else m.predict(rows)
