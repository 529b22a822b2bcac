"""Every published row respects the funnel order: the projection, and both scorer paths
(``scores`` topic records and ``POST /score``) on a model whose raw output breaks the order."""

from __future__ import annotations

import doctest
import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import aitm.projection
from aitm.checkpoint import make_checkpoint
from aitm.features import FeatureEncoder
from aitm.model import AITM, AITMConfig
from aitm.projection import funnel_order
from stream.contract.events import TASKS, Event, encode_event
from stream.ops.settings import Settings
from stream.serve.scorer import Scorer
from stream.serve.scoring import ScoringModel

rows = st.lists(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=4), min_size=1, max_size=30)


@given(rows)
def test_projection_is_ordered_never_raises_and_keeps_ordered_rows(data: list[list[float]]) -> None:
    p = np.array(data)
    out = funnel_order(p)
    assert (np.diff(out, axis=1) <= 0).all()  # the funnel order holds on every row
    assert (out <= p).all() and (out[:, 0] == p[:, 0]).all()  # only lowers; click untouched
    ordered = (np.diff(p, axis=1) <= 0).all(axis=1)
    np.testing.assert_array_equal(out[ordered], p[ordered])  # a row already in order is unchanged
    # the largest ordered vector below p: raising any step of a changed row breaks order or bound
    changed = out != p
    assert np.allclose(out[changed], np.minimum.accumulate(p, axis=1)[changed])


def test_projection_doctest() -> None:
    assert doctest.testmod(aitm.projection).failed == 0


def disordered_model() -> ScoringModel:
    """A version whose raw output puts approval above application and activation above approval."""
    torch.manual_seed(0)
    enc = FeatureEncoder(("a", "b"), capacity=8, min_count=1)
    enc.encode_dicts([{"a": "x", "b": "y"}, {"a": "z", "b": "w"}], update=True)
    cfg = AITMConfig(vocab_sizes=enc.vocab_sizes)
    model = AITM(cfg)
    with torch.no_grad():
        p = torch.tensor([0.2, 0.01, 0.05, 0.2])
        model.head_b.copy_(torch.log(p / (1 - p)))
        model.head_w.mul_(0.01)
    return ScoringModel.from_checkpoint(3, make_checkpoint(model, cfg, enc.state_dict(), 0), 1)


def test_the_raw_model_breaks_the_order_but_served_rows_do_not() -> None:
    m = disordered_model()
    feats = [{"a": "x", "b": "y"}, {"a": "z", "b": "w"}, {"a": "new", "b": "y"}]
    with torch.inference_mode():
        raw = torch.sigmoid(m.model(torch.from_numpy(m.encoder.encode_dicts(feats)))).numpy()
    assert (np.diff(raw, axis=1) > 0).any(axis=1).all()  # the premise: every raw row is out of order
    served = m.predict(feats)
    assert (np.diff(served, axis=1) <= 0).all()
    np.testing.assert_allclose(served[:, :2], raw[:, :2], rtol=1e-6)  # click, application kept


def test_both_scorer_paths_publish_ordered_rows(tmp_path: Path) -> None:
    scorer = Scorer(Settings(data_dir=tmp_path, scorer_bank_objectives={"bank_2": "activation"}), CollectorRegistry())
    scorer.model = m = disordered_model()
    code, body = scorer.http_score(json.dumps({"bank_id": "bank_2", "features": {"a": "x", "b": "y"}}).encode())
    assert code == 200, body
    http_p = [body["probabilities"][t] for t in TASKS]
    events = [Event(0, f"i{i}/impression", f"i{i}", 1_767_225_600_000 + i, "bank_2",
                    {"a": "x", "b": "y"} if i % 2 else {"a": "z", "b": "w"}) for i in range(6)]
    records = [SimpleNamespace(value=encode_event(e), key=e.impression_id.encode(), topic="impressions",
                               partition=0, offset=i) for i, e in enumerate(events)]
    out, bad = scorer.score_batch(m, records)
    assert not bad and len(out) == len(events)
    for probs in [http_p] + [[json.loads(v)["probabilities"][t] for t in TASKS] for _, v in out]:
        assert all(a >= b for a, b in itertools.pairwise(probs)), probs
    # the ranking score uses the served (ordered) activation, never the raw one
    assert math.isclose(body["score"], body["probabilities"]["activation"], rel_tol=1e-4)  # (7 digits)
