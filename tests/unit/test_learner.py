"""The online learner: test-then-train ordering, delayed-feedback rows, prequential evaluation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from aitm.evaluate import auc, calibration_ratio, log_loss
from aitm.features import FeatureEncoder
from stream.contract.samples import Sample
from stream.learn.delayed_feedback import train_rows
from stream.learn.learner import OnlineLearner, Stabilisers, held_back
from stream.learn.prequential import PrequentialEvaluator, TaskWindow, binned_auc

FIELDS = ("a", "b", "c")
ALL = (True, True, True, True)


def sample(i: int, kind: str = "final", labels: tuple[int, int, int, int] = (0, 0, 0, 0),
           mature: tuple[bool, bool, bool, bool] = ALL, seq: int | None = None) -> Sample:
    rng = np.random.default_rng(i)
    feats = {f: str(int(rng.integers(0, 5))) for f in FIELDS}
    seq = {"first": 0, "final": 5}.get(kind, 1) if seq is None else seq
    return Sample(f"i{i}", "bank_1", 0, feats, labels, mature, kind, 1000, seq)  # type: ignore[arg-type]


def learner(mode: str = "final-only", lr: float = 0.05, one_pass: bool = True) -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode=mode, lr=lr, eval_window=100,
                         one_pass=one_pass)


@pytest.mark.parametrize("one_pass", [True, False])
def test_a_batch_is_scored_before_it_is_trained_on(one_pass: bool) -> None:
    ln = learner(one_pass=one_pass)
    batch = [sample(i, labels=(1, 1, 1, 1) if i % 2 else (0, 0, 0, 0)) for i in range(64)]
    before = copy.deepcopy(ln.model)
    res = ln.step(batch)
    ids = torch.as_tensor(ln.encoder.encode_dicts([s.features for s in batch]))  # ids the step used
    before.eval()
    with torch.no_grad():
        expected = torch.sigmoid(before(ids)).numpy()  # the model as it was before the step
    # every evaluated prediction is the untrained model's, in the evaluator too
    np.testing.assert_allclose(res.eval_probs, expected, rtol=1e-5, atol=1e-7)
    _, p = ln.evaluator.tasks[0].window_pairs()
    np.testing.assert_allclose(np.sort(p), np.sort(expected[:, 0]), rtol=1e-5, atol=1e-7)
    # ... and the step did train: the model now predicts differently (so the order matters)
    assert res.trained_rows == 64
    assert np.abs(ln.predict(ids.numpy()) - expected).max() > 1e-3


def test_fnw_evaluates_the_prediction_made_at_the_first_sample() -> None:
    ln = learner("fnw", lr=0.1)
    firsts = [sample(i, "first", labels=(0, 0, 0, 0), mature=(False,) * 4) for i in range(32)]
    at_first = ln.step(firsts).scored_probs  # trained on them as fake negatives afterwards
    corrections = [sample(i, "correction", labels=(1, 0, 0, 0), seq=1) for i in range(0, 32, 2)]
    assert ln.step(corrections).trained_rows == 16
    finals = [sample(i, "final", labels=(1, 0, 0, 0) if i % 2 == 0 else (0, 0, 0, 0)) for i in range(32)]
    res = ln.step(finals)
    assert res.trained_rows == 0  # fnw never trains on finals
    np.testing.assert_allclose(res.eval_probs, at_first, rtol=1e-6)  # not the trained model's
    assert np.isnan(res.scored_probs).all()  # held first-sample predictions: no second scoring
    assert not ln.pending


def test_duplicates_are_neither_trained_nor_evaluated_twice() -> None:
    ln = learner()
    batch = [sample(i, labels=(1, 0, 0, 0)) for i in range(10)]
    assert ln.step(batch).trained_rows == 10
    res = ln.step(batch)
    assert (res.samples, res.duplicates, res.trained_rows) == (0, 10, 0)
    assert ln.evaluator.tasks[0].count == 10


def test_final_only_rows_use_the_mature_mask() -> None:
    samples = [
        sample(0, "first", labels=(1, 0, 0, 0), mature=(True, False, False, False)),
        sample(1, "final", labels=(1, 1, 0, 0), mature=(True, True, True, False)),
        sample(2, "correction", labels=(1, 1, 0, 0), seq=2),
    ]
    rows = train_rows("final-only", samples, np.full((3, 4), 0.2))
    assert rows.index.tolist() == [1]
    assert rows.mask.tolist() == [[1, 1, 1, 0]]  # an immature task stays out of the loss
    assert rows.weight.tolist() == [[1, 1, 1, 1]]


def test_fnw_rows_and_importance_weights() -> None:
    p = np.array([[0.5, 0.2, 0.1, 0.05], [0.4, 0.3, 0.2, 0.1], [0.9, 0.5, 0.3, 0.2]])
    samples = [
        sample(0, "first", labels=(1, 0, 0, 0), mature=(True, False, False, False)),
        sample(1, "correction", labels=(1, 1, 1, 0), seq=3),
        sample(2, "final", labels=(1, 1, 1, 1)),
    ]
    rows = train_rows("fnw", samples, p)
    assert rows.index.tolist() == [0, 0, 1]
    np.testing.assert_allclose(rows.labels, [[0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(rows.mask, [[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_allclose(rows.weight[0], (1 - p[0]) * (1 + p[0]), rtol=1e-6)  # fake negative
    np.testing.assert_allclose(rows.weight[1], 1 + p[0], rtol=1e-6)  # positive copy
    assert rows.weight[2][2] == pytest.approx(1 + p[1][2])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sliding_window_equals_a_batch_computation_on_the_same_window(seed: int) -> None:
    rng = np.random.default_rng(seed)
    window = 500
    ev = PrequentialEvaluator(2, window)
    all_y, all_p = [], []
    for _ in range(40):
        n = int(rng.integers(1, 120)) if rng.random() < 0.9 else 700  # some batches overflow the window
        p = rng.random((n, 2))
        y = (rng.random((n, 2)) < p * 0.5).astype(int)
        ev.update(y, p)
        all_y.append(y)
        all_p.append(p)
        ys, ps = np.concatenate(all_y), np.concatenate(all_p)
        vals = ev.values()
        for t in range(2):
            yw, pw = ys[-window:, t], ps[-window:, t]
            got = vals["sliding"][t]
            assert got["auc"] == pytest.approx(auc(yw, pw), abs=1e-12)
            assert got["log_loss"] == pytest.approx(log_loss(yw, pw), rel=1e-9)
            assert got["calibration"] == pytest.approx(calibration_ratio(yw, pw), rel=1e-9)
            assert got["positive_rate"] == pytest.approx(yw.mean())
            life = vals["lifetime"][t]
            assert life["count"] == len(ys)
            assert life["auc"] == pytest.approx(auc(ys[:, t], ps[:, t]), abs=2e-3)
            assert life["log_loss"] == pytest.approx(log_loss(ys[:, t], ps[:, t]), rel=1e-6)


def test_window_state_round_trips() -> None:
    rng = np.random.default_rng(3)
    w = TaskWindow(50)
    w.update((rng.random(80) < 0.3).astype(int), rng.random(80))
    w2 = TaskWindow(50)
    w2.load_state_dict(w.state_dict())
    assert w2.window_values() == w.window_values()
    assert w2.lifetime_values() == w.lifetime_values()


def test_binned_auc_counts_ties_as_half() -> None:
    assert binned_auc(np.array([0, 1]), np.array([0, 1])) == pytest.approx(0.5)
    assert binned_auc(np.array([0, 1]), np.array([1, 0])) == pytest.approx(1.0)


def test_fnw_trains_a_final_whose_first_sample_never_came() -> None:
    ln = learner("fnw")
    res = ln.step([sample(i, "final", labels=(1, 0, 0, 0)) for i in range(8)])
    assert res.trained_rows == 8 and ln.evaluator.tasks[0].count == 8


def timed(i: int, day: float, kind: str = "final", labels: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Sample:
    s = sample(i, kind, labels)
    return Sample(s.impression_id, s.bank_id, int(day * 86_400_000), s.features, s.labels, s.mature, s.kind,
                  s.elapsed_ms, s.seq)


def test_the_frozen_copy_never_changes_and_scores_only_later_impressions() -> None:
    torch.manual_seed(0)
    ln = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="final-only", lr=0.05,
                       eval_window=100, freeze_after_ms=2 * 86_400_000)
    early = [timed(i, 0.5, labels=(1, 1, 0, 0) if i % 2 else (0, 0, 0, 0)) for i in range(64)]
    ln.step(early)
    assert ln.frozen is None and ln.frozen_metric_values() is None
    later = [timed(100 + i, 2.5, labels=(1, 0, 0, 0) if i % 3 else (0, 0, 0, 0)) for i in range(64)]
    before = copy.deepcopy(ln.model.state_dict())
    ln.step(later)  # event time passed day 2: frozen before this batch trains
    assert ln.frozen is not None
    frozen_state = copy.deepcopy(ln.frozen.model.state_dict())
    for k, v in before.items():
        assert torch.equal(frozen_state[k], v), k  # the model as it was before the batch
    for day in (3, 4, 5):
        ln.step([timed(1000 * day + i, day, labels=(i % 2, 0, 0, 0)) for i in range(64)])
    for k, v in ln.frozen.model.state_dict().items():
        assert torch.equal(v, frozen_state[k]), k  # never trained
    assert any(not torch.equal(v, frozen_state[k]) for k, v in ln.model.state_dict().items())
    assert all(not p.requires_grad for p in ln.frozen.model.parameters())
    # evaluated on impressions from the cutoff on only: 4 batches of 64, not the first one
    assert ln.frozen.evaluator.tasks[0].count == 4 * 64
    # the live model is evaluated on exactly the frozen copy's impressions too (like for like)
    assert ln.frozen.paired.tasks[0].count == 4 * 64
    assert ln.evaluator.tasks[0].count > ln.frozen.paired.tasks[0].count
    values = ln.frozen_metric_values()
    assert values is not None and 0.0 <= values["lifetime"][0]["auc"] <= 1.0
    # a restart restores the copy and its evaluator
    ln2 = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="final-only", lr=0.05,
                        eval_window=100, freeze_after_ms=2 * 86_400_000, model=copy.deepcopy(ln.model))
    ln2.load_state_dict(ln.state_dict())
    assert ln2.frozen is not None and ln2.frozen.evaluator.tasks[0].count == 4 * 64
    for k, v in ln2.frozen.model.state_dict().items():
        assert torch.equal(v, frozen_state[k]), k


def test_no_freeze_when_off() -> None:
    ln = learner()
    ln.step([timed(i, 10.0) for i in range(8)])
    assert ln.frozen is None and ln.state_dict()["frozen"] is None


def test_frozen_copy_sees_values_admitted_after_the_freeze_as_out_of_vocabulary() -> None:
    ln = OnlineLearner(FeatureEncoder(("a",), capacity=8, min_count=1), mode="final-only",
                       freeze_after_ms=1)
    ln.step([Sample("x", "b", 0, {"a": "v1"}, (0, 0, 0, 0), ALL, "final", 0, 5)])
    ln.step([Sample("y", "b", 5, {"a": "v1"}, (1, 0, 0, 0), ALL, "final", 0, 5)])  # freezes: v1 known
    assert ln.frozen is not None and ln.frozen.marker == [1]
    ln.step([Sample("z", "b", 9, {"a": "v2"}, (1, 0, 0, 0), ALL, "final", 0, 5)])  # v2 admitted later
    assert ln.encoder.vocab[0] == {"v1": 1, "v2": 2}
    # the rule: the frozen copy's vocabulary stopped at the freeze, so it scores "v2" as it
    # scores any unknown value - with the out-of-vocabulary id 0, not with the id 2 the live
    # encoder gave it later. Its evaluator's newest prediction is the frozen model on id 0.
    assert ln.frozen is not None and ln.frozen.evaluator.tasks[0].count == 2  # y, then z
    got = np.array([ln.frozen.evaluator.tasks[k].window_pairs()[1][-1] for k in range(4)])
    with torch.no_grad():
        as_oov, as_id2 = torch.sigmoid(ln.frozen.model(torch.tensor([[0], [2]]))).numpy()
    assert np.abs(as_oov - as_id2).max() > 1e-5  # the premise: the two ids score differently
    np.testing.assert_allclose(got, as_oov, rtol=0, atol=1e-7)


def test_finals_with_a_held_first_prediction_are_not_scored_again() -> None:
    ln = learner("fnw", lr=0.1)
    ln.step([sample(i, "first", mature=(False,) * 4) for i in range(8)])
    res = ln.step([sample(i, "final") for i in range(8)] + [sample(50, "final")])
    assert np.isnan(res.scored_probs[:8]).all()  # evaluated with the first-sample prediction
    assert np.isfinite(res.scored_probs[8]).all()  # no first seen: scored now
    assert np.isfinite(res.eval_probs).all()


@pytest.mark.parametrize("one_pass", [True, False])
def test_fnw_scores_firsts_with_the_model_before_the_step(one_pass: bool) -> None:
    ln = learner("fnw", lr=0.1, one_pass=one_pass)
    warm = [sample(100 + i, "first", labels=(i % 2, 0, 0, 0), mature=(False,) * 4) for i in range(32)]
    ln.step(warm)  # the model is no longer the initial one
    firsts = [sample(i, "first", labels=(i % 2, 0, 0, 0), mature=(False,) * 4) for i in range(32)]
    before = copy.deepcopy(ln.model).eval()
    res = ln.step(firsts)
    ids = torch.as_tensor(ln.encoder.encode_dicts([s.features for s in firsts]))
    with torch.no_grad():
        expected = torch.sigmoid(before(ids)).numpy()
    np.testing.assert_allclose(res.scored_probs, expected, rtol=1e-5, atol=1e-7)
    assert res.trained_rows == 32 + 16  # every fake negative, and the positives' copies
    assert np.abs(ln.predict(ids.numpy()) - expected).max() > 1e-3


def test_one_pass_and_two_passes_make_the_same_first_update_without_dropout() -> None:
    """With no dropout the scoring pass is the training pass: one pass trains exactly as two."""
    batch = [sample(i, "first", labels=(i % 2, 0, 0, 0), mature=(False,) * 4) for i in range(40)]
    batch += [sample(i, "correction", labels=(1, 0, 0, 0), seq=1) for i in range(0, 40, 4)]
    models = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        enc = FeatureEncoder(FIELDS, capacity=8, min_count=1)
        from aitm.model import AITM, AITMConfig

        model = AITM(AITMConfig(vocab_sizes=enc.vocab_sizes, n_tasks=4, dropouts=(0.0, 0.0, 0.0)))
        ln = OnlineLearner(enc, mode="fnw", lr=0.05, eval_window=100, model=model, one_pass=one_pass)
        ln.step(batch)
        models.append(ln.model.state_dict())
    for name, value in models[0].items():
        torch.testing.assert_close(value, models[1][name], rtol=1e-3, atol=1e-4)  # float order only


# --- stabilisers: held-back slice, pacing of late positives, the served average, the prior ------


def stabilised(**kw: object) -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.05, eval_window=100,
                         stabilisers=Stabilisers(**kw))  # type: ignore[arg-type]


def test_held_back_impressions_are_never_trained_and_their_finals_come_back() -> None:
    ln = stabilised(holdout_share=0.5)
    firsts = [sample(i, "first", labels=(1, 0, 0, 0), mature=(True, False, False, False)) for i in range(200)]
    held = held_back([s.impression_id for s in firsts], 0.5)
    assert 60 < held.sum() < 140  # a stable hash of the id picks about half
    res = ln.step(firsts)
    mine = int((~held).sum())
    assert res.trained_rows == 2 * mine  # each trained first: a fake negative and its click's positive copy
    finals = [sample(i, "final", labels=(1, i % 3 == 0, 0, 0)) for i in range(200)]
    res = ln.step(finals)
    assert res.trained_rows == 0
    assert len(res.holdout_ids) == held.sum() and res.holdout_ids.shape[1] == len(FIELDS)
    np.testing.assert_array_equal(res.holdout_rows, np.flatnonzero(held))  # rows of the batch
    np.testing.assert_array_equal(ln.last_batch.labels[res.holdout_rows, 1], [i % 3 == 0 for i in range(200) if held[i]])
    assert ln.evaluator.tasks[0].count == 200  # every final is still evaluated (prequentially)


def test_late_positives_after_the_last_impression_do_not_move_the_model() -> None:
    ln = stabilised(positive_slack=2.0)
    for b in range(4):
        ln.step([sample(100 * b + i, "first", mature=(False,) * 4) for i in range(100)])
        ln.step([sample(100 * b + i, "correction", labels=(1, 1, 1, 1), seq=4) for i in range(0, 100, 25)])
    before = copy.deepcopy(ln.served_model().state_dict())
    waiting = sum(len(b) for b in ln.mixer.held[3])
    for b in range(4):  # the tail: activations only, no impression around them
        res = ln.step([sample(1000 + 10 * b + i, "correction", labels=(1, 1, 1, 1), seq=4) for i in range(10)])
        assert res.trained_rows == 0
    for k, v in ln.served_model().state_dict().items():
        assert torch.equal(v, before[k]), k
    assert sum(len(b) for b in ln.mixer.held[3]) == waiting + 40  # they wait, and are kept
    ln.step([sample(5000 + i, "first", mature=(False,) * 4) for i in range(100)])  # impressions again
    assert sum(len(b) for b in ln.mixer.held[3]) < waiting + 40


def test_the_served_model_is_the_weight_average_and_a_resume_restores_both() -> None:
    ln = stabilised(ema_half_life_rows=50.0, min_step_rows=1)
    for b in range(5):
        ln.step([sample(100 * b + i, "final", labels=(i % 2, 0, 0, 0)) for i in range(40)])
    served, trained = ln.served_model(), ln.model
    assert served is not trained
    assert any(not torch.equal(a, b) for a, b in zip(served.state_dict().values(), trained.state_dict().values(),
                                                     strict=True))
    again = OnlineLearner(FeatureEncoder(FIELDS, capacity=8, min_count=1), mode="fnw", lr=0.05, eval_window=100,
                          model=copy.deepcopy(served), stabilisers=Stabilisers(ema_half_life_rows=50.0))
    again.encoder = copy.deepcopy(ln.encoder)
    again.load_state_dict(ln.state_dict())
    for k, v in trained.state_dict().items():
        assert torch.equal(again.model.state_dict()[k], v), k  # the trained weights, not the served ones
    for k, v in served.state_dict().items():
        assert torch.equal(again.served_model().state_dict()[k], v), k


def test_a_cold_model_starts_at_the_prior_rates() -> None:
    ln = stabilised(prior_rates=(0.2, 0.02, 0.03, 0.01))  # a prior out of funnel order is ordered first
    ids = ln.encoder.encode_dicts([{"a": "1", "b": "2", "c": "3"}] * 4, update=True)
    with torch.no_grad():
        bias = ln.model.head_b.numpy()
    np.testing.assert_allclose(1 / (1 + np.exp(-bias)), [0.2, 0.02, 0.02, 0.01], rtol=1e-5)
    assert ln.predict(ids).shape == (4, 4)


def test_rows_that_waited_share_the_scoring_pass_and_train_exactly_as_on_their_own() -> None:
    def run(foresee: bool) -> OnlineLearner:
        ln = stabilised(positive_slack=2.0, min_step_rows=150, ema_half_life_rows=100.0)
        if not foresee:
            ln.mixer.upcoming = lambda *a, **k: None  # type: ignore[method-assign]
        for b in range(6):
            ln.step([sample(100 * b + i, "first", mature=(False,) * 4) for i in range(100)])
            ln.step([sample(100 * b + i, "correction", labels=(1, 1, 1, 1), seq=4) for i in range(0, 100, 9)])
        return ln

    fast, slow = run(True), run(False)
    assert fast.steps == slow.steps >= 3 and fast.trained_samples == slow.trained_samples
    for (k, a), b in zip(fast.model.state_dict().items(), slow.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5, msg=k)  # same rows, summed in another order
