"""The HTTP endpoint's fast forward (stream/serve/fastpath.py): onnxruntime within 1e-5 of the torch
model on real samples, the same ids as the encoder, one build per version in the background, the
eager model until it is ready or when it fails."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest
import torch

from aitm.embedding_table import DynamicTable
from aitm.features import FeatureEncoder
from stream.serve import fastpath
from stream.serve.fastpath import Accelerator, OnnxModel, RowEncoder
from stream.serve.scoring import ScoringModel
from tests.modelhelpers import product_shape, trained_checkpoint


def _version(kind: str, version: int, seed: int = 0) -> tuple[ScoringModel, list[dict[str, str]]]:
    """A version trained for a few steps on simulated impressions (the streaming trainer's dynamic
    table, or the offline encoder in threshold mode) and fresh impressions of a later day, one with
    unseen values and one with a field missing."""
    checkpoint, fresh = trained_checkpoint(kind, seed, 3 + seed, 6_000, epochs=1)
    return ScoringModel.from_checkpoint(version, checkpoint, 1), fresh


@pytest.fixture(scope="module", params=["dynamic", "threshold"])
def version(request: pytest.FixtureRequest) -> tuple[ScoringModel, list[dict[str, str]]]:
    return _version(request.param, 3)


def test_row_encoder_gives_the_encoders_ids(version: tuple[ScoringModel, list[dict[str, str]]]) -> None:
    m, rows = version
    enc = RowEncoder.of(m.encoder)
    assert enc is not None
    want = m.encoder.encode_dicts(rows)
    assert (want == 0).any() and (want != 0).any()  # unseen values and known ones
    np.testing.assert_array_equal(enc.encode(rows), want)
    np.testing.assert_array_equal(enc.encode(rows[1:2]), m.encoder.encode_dicts(rows[1:2]))  # the missing field
    assert enc.encode([]).shape == (0, len(m.encoder.fields))


def test_a_hash_mode_encoder_keeps_its_own_encoding() -> None:
    enc = FeatureEncoder(("a", "b"), capacity=8, min_count=1, mode="hash")
    assert RowEncoder.of(enc) is None


def test_onnxruntime_serves_what_the_torch_model_serves(version: tuple[ScoringModel, list[dict[str, str]]]) -> None:
    m, rows = version
    fast = OnnxModel.build(m)
    assert fast is not None and fast.version == m.version and fast.max_diff <= 1e-5
    want = m.predict(rows)  # (N, T) the torch model, funnel order
    got = fast.predict(rows)
    assert got.shape == want.shape == (len(rows), 4)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert float(np.abs(got - want).max()) < 1e-6  # in practice float32 rounding apart
    assert (np.diff(got, axis=1) <= 0).all()  # the funnel order holds
    for i in (0, 1, 17):  # one at a time, as single requests are scored
        np.testing.assert_allclose(fast.predict(rows[i:i + 1]), want[i:i + 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("experts", [0, 8])
def test_the_products_aitm_is_served_through_onnxruntime(experts: int) -> None:
    # the trainer's shape settings as they are by default (the conditional head, whose log-space
    # end-to-end logits use expm1, and the gated transfer), with and without shared experts
    shape = product_shape(experts=experts)
    checkpoint, rows = trained_checkpoint("dynamic", 0, 3, 6_000, epochs=1, **shape)
    m = ScoringModel.from_checkpoint(4, checkpoint, 1)
    assert (m.model.config.head, m.model.config.experts) == (shape["head"], experts)
    fast = OnnxModel.build(m)
    assert fast is not None and fast.max_diff <= 1e-5
    np.testing.assert_allclose(fast.predict(rows), m.predict(rows), rtol=0, atol=1e-5)
    np.testing.assert_allclose(fast.predict(rows[:1]), m.predict(rows[:1]), rtol=0, atol=1e-5)


def _wait_fast(acc: Accelerator, m: ScoringModel) -> OnnxModel | None:
    acc.fast_for(m)
    assert acc.ready.wait(60)
    return acc.fast_for(m)


def test_the_accelerator_scores_eager_until_the_copy_is_ready_then_through_it(
    version: tuple[ScoringModel, list[dict[str, str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    m, rows = version
    acc = Accelerator("onnx", build_after=0)
    used: list[str] = []
    real_build, real_predict = OnnxModel.build, OnnxModel.predict
    gate = threading.Event()

    def slow_build(mm: ScoringModel) -> OnnxModel | None:
        gate.wait(30)  # hold the build: requests meanwhile go to the eager model
        return real_build(mm)

    def counted_predict(self: OnnxModel, r: list[dict[str, str]]) -> np.ndarray:
        used.append("onnx")
        return real_predict(self, r)

    monkeypatch.setattr(OnnxModel, "build", staticmethod(slow_build))
    monkeypatch.setattr(OnnxModel, "predict", counted_predict)
    first = acc.predict(m, rows[:5])
    assert acc.builds == 1 and used == []  # scored eager, the build started
    np.testing.assert_array_equal(first, m.predict(rows[:5]))
    acc.predict(m, rows[:5])
    assert acc.builds == 1 and used == []  # one build per version
    gate.set()
    assert acc.ready.wait(60)
    got = acc.predict(m, rows)
    assert used == ["onnx"] and acc.builds == 1
    np.testing.assert_allclose(got, m.predict(rows), rtol=0, atol=1e-5)


def test_a_new_version_is_served_by_its_own_copy(version: tuple[ScoringModel, list[dict[str, str]]]) -> None:
    m, rows = version
    kind = "dynamic" if isinstance(m.encoder, DynamicTable) else "threshold"
    m2, _ = _version(kind, 4, seed=1)
    acc = Accelerator("onnx", build_after=0)
    first = _wait_fast(acc, m)
    assert first is not None and first.source is m
    assert acc.fast_for(m2) is None  # a hot reload: the old version's copy is never used for it
    np.testing.assert_array_equal(acc.predict(m2, rows), m2.predict(rows))  # eager meanwhile
    second = _wait_fast(acc, m2)
    assert second is not None and second.source is m2 and second.version == 4 and acc.builds == 2
    got = acc.predict(m2, rows)
    np.testing.assert_allclose(got, m2.predict(rows), rtol=0, atol=1e-5)
    assert float(np.abs(got - m.predict(rows)).max()) > 1e-3  # the two versions really differ


def test_a_failed_export_or_check_leaves_the_eager_model(
    version: tuple[ScoringModel, list[dict[str, str]]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m, rows = version

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("exporter broke")

    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="stream.serve.fastpath"):
        mp.setattr(torch.onnx, "export", broken)
        acc = Accelerator("onnx", build_after=0)
        assert _wait_fast(acc, m) is None
        np.testing.assert_array_equal(acc.predict(m, rows), m.predict(rows))
        assert acc.builds == 1  # not retried on every request
    assert "served eager (ONNX export failed: exporter broke)" in caplog.text
    with monkeypatch.context() as mp, caplog.at_level(logging.WARNING, logger="stream.serve.fastpath"):
        mp.setattr(fastpath, "TOLERANCE", -1.0)  # no copy can pass the check
        assert OnnxModel.build(m) is None
    assert "onnxruntime differs by" in caplog.text


def test_a_version_is_exported_once_it_has_scored_build_after_impressions(
    version: tuple[ScoringModel, list[dict[str, str]]]
) -> None:
    m, rows = version
    acc = Accelerator("onnx", build_after=10)
    acc.predict(m, rows[:4])
    acc.predict(m, rows[:5])
    assert acc.builds == 0  # 9 impressions: not worth an export yet
    acc.predict(m, rows[:1])
    assert acc.builds == 1 and acc.ready.wait(60)
    assert acc.fast_for(m) is not None
    m2, _ = _version("threshold", 8, seed=2)
    acc.predict(m2, rows[:9])  # a new version counts from zero
    assert acc.builds == 1 and acc.fast_for(m2) is None
    from stream.serve.fastpath import BUILD_AFTER
    assert Accelerator().build_after == BUILD_AFTER == 1000


def test_engine_torch_never_builds(version: tuple[ScoringModel, list[dict[str, str]]]) -> None:
    m, rows = version
    acc = Accelerator("torch")
    np.testing.assert_array_equal(acc.predict(m, rows), m.predict(rows))
    assert acc.fast_for(m) is None and acc.builds == 0
    with pytest.raises(ValueError, match="engine 'tf'"):
        Accelerator("tf")


def test_check_ids_stay_inside_the_embedding_table(version: tuple[ScoringModel, list[dict[str, str]]]) -> None:
    m, _ = version
    rows = int(sum(m.model.config.vocab_sizes))
    offsets = np.concatenate([[0], np.cumsum(m.model.config.vocab_sizes)[:-1]])
    for ids in fastpath._check_ids(m):
        assert (ids[0] == 0).all() and ids.min() >= 0
        assert ((ids + offsets) < rows).all()
    assert [len(ids) for ids in fastpath._check_ids(m)] == list(fastpath.CHECK_SIZES)

