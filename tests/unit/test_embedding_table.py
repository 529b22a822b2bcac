"""The dynamic embedding table: admission by frequency, one shared budget without collisions,
event-time expiry with row and optimizer-state reset, and an exact checkpoint round trip."""

from __future__ import annotations

import io

import numpy as np
import torch

from aitm.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from aitm.embedding_table import DynamicTable, encoder_from_state
from aitm.features import FeatureEncoder
from aitm.sketch import CountMinSketch
from stream.contract.samples import Sample
from stream.learn.learner import OnlineLearner, Stabilisers

DAY = 86_400_000
ALL = (True, True, True, True)


def enc(table: DynamicTable, field_values: dict[str, list[str]], t_ms: int) -> np.ndarray:
    n = len(next(iter(field_values.values())))
    return table.encode_columns(field_values, n, update=True, event_time_ms=[t_ms] * n)


def test_a_value_gets_a_row_at_min_count_sightings_and_not_before() -> None:
    t = DynamicTable(("user",), rows=10, min_count=3, ttl_ms=DAY, sketch_width=1024)
    assert enc(t, {"user": ["u1", "u1"]}, 0).tolist() == [[0], [0]]  # seen twice: OOV
    assert t.rows_used == 0 and t.take_assigned().size == 0
    assert enc(t, {"user": ["u1"]}, 1).tolist() == [[1]]  # the third sighting admits it
    assert t.rows_used == 1 and t.admissions == 1
    # a look-up (scoring) neither counts nor admits
    for _ in range(5):
        t.encode_columns({"user": ["u2"]}, 1)
    assert t.vocab[0] == {"u1": 1}


def test_every_value_has_its_own_row_while_below_the_budget() -> None:
    fields = ("user", "creative", "city")
    t = DynamicTable(fields, rows=3 * 200, min_count=1, ttl_ms=DAY, sketch_width=1 << 12)
    cols = {f: [f"{f}-{k}" for k in range(200)] for f in fields}
    ids = enc(t, cols, 0)  # (200, 3)
    rows = ids + np.arange(3)  # global rows
    assert len(np.unique(rows)) == 600 and rows.min() >= 3  # no collision, none in an OOV row
    assert t.rows_used == 600
    assert sorted(t.take_assigned().tolist()) == sorted(rows.ravel().tolist())
    # one budget shared by the fields: it is full now, so a new value of any field stays OOV
    assert enc(t, {"user": ["new"], "creative": ["c0"], "city": ["x"]}, 1).tolist() == [[0, 0, 0]]
    assert t.refused == 3


def test_rows_of_values_unseen_for_the_ttl_are_recycled_when_space_is_needed() -> None:
    t = DynamicTable(("user",), rows=2, min_count=1, ttl_ms=7 * DAY, sketch_width=1024)
    enc(t, {"user": ["old", "kept"]}, 0)
    t.take_assigned()
    enc(t, {"user": ["kept"]}, 5 * DAY)  # seen again: not expired at day 8
    assert enc(t, {"user": ["early"]}, 6 * DAY).tolist() == [[0]]  # full, nothing expired yet
    assert t.refused == 1 and t.evictions == 0
    old_row = t.vocab[0]["old"]
    ids = enc(t, {"user": ["new"]}, 8 * DAY)  # "old" was last seen 8 days ago (> 7)
    assert ids.tolist() == [[old_row]]
    assert "old" not in t.vocab[0] and t.vocab[0]["kept"] != old_row
    assert t.evictions == 1 and t.take_assigned().tolist() == [old_row]
    # the recycled value is a stranger again: OOV until it is admitted anew
    assert t.encode_columns({"user": ["old"]}, 1).tolist() == [[0]]


def test_expiry_follows_event_time_not_arrival() -> None:
    t = DynamicTable(("user",), rows=1, min_count=1, ttl_ms=DAY, sketch_width=1024)
    enc(t, {"user": ["a"]}, 10 * DAY)
    # a late sample stamped days earlier neither expires "a" nor moves the table's clock back
    assert enc(t, {"user": ["b"]}, 2 * DAY).tolist() == [[0]]
    assert t.vocab[0] == {"a": 1}
    assert enc(t, {"user": ["b"]}, int(11.5 * DAY)).tolist() == [[1]]


def test_the_frozen_copy_sees_rows_given_after_its_marker_as_oov() -> None:
    t = DynamicTable(("u", "v"), rows=4, min_count=1, ttl_ms=DAY, sketch_width=1024)
    a = enc(t, {"u": ["x"], "v": ["y"]}, 0)
    mark = t.marker()
    b = enc(t, {"u": ["z"], "v": ["y"]}, 1)
    assert t.known_as_of(a, mark).tolist() == a.tolist()
    assert t.known_as_of(b, mark).tolist() == [[0, int(b[0, 1])]]


def _sample(i: int, t_ms: int, user: str, labels: tuple[int, int, int, int] = (1, 0, 0, 0)) -> Sample:
    return Sample(f"i{i}", "bank_1", t_ms, {"user": user, "city": "oslo"}, labels, ALL, "final", 1000, 5)


def test_a_recycled_row_is_drawn_afresh_with_fresh_optimizer_state() -> None:
    torch.manual_seed(0)
    table = DynamicTable(("city", "user"), rows=2, min_count=1, ttl_ms=DAY, sketch_width=1024)
    ln = OnlineLearner(table, mode="final-only", lr=0.05, eval_window=100,
                       stabilisers=Stabilisers(min_step_rows=1, ema_half_life_rows=50.0))
    for k in range(20):  # "old" trains for 20 steps: its row and its Adam moments move
        ln.step([_sample(100 * k + j, 0, "old", (j % 2, 0, 0, 0)) for j in range(8)])
    row = table.vocab[1]["old"] + 1  # global row
    weight = ln.model.embedding.table.weight
    state = ln.optimizer.state[weight]
    assert float(state["exp_avg_sq"][row].abs().sum()) > 0
    assert not torch.equal(weight[row], weight[1])
    # two days later "new" needs a row: "old"'s is recycled. The learner resets it before using it:
    # drawn afresh, the same in the live model and the served average, its moments cleared
    ids = table.encode_columns({"city": ["oslo"], "user": ["new"]}, 1, update=True, event_time_ms=[2 * DAY])
    assert int(ids[0, 1]) + 1 == row
    trained = weight[row].clone()
    assert ln.average is not None
    avg = ln.average.model.embedding.table.weight  # type: ignore[union-attr]
    assert not torch.equal(avg[row], weight[row])  # the average lags the trained row
    ln._reset_rows(table.take_assigned())
    assert not torch.equal(weight[row], trained)
    assert torch.equal(avg[row], weight[row])
    assert float(weight[row].detach().abs().max()) < 0.5  # a draw from the initial N(0, 0.1^2)
    assert float(state["exp_avg"][row].abs().sum()) == 0 and float(state["exp_avg_sq"][row].abs().sum()) == 0


def test_a_training_step_resets_the_row_it_recycles() -> None:
    torch.manual_seed(0)
    table = DynamicTable(("city", "user"), rows=2, min_count=1, ttl_ms=DAY, sketch_width=1024)
    ln = OnlineLearner(table, mode="final-only", lr=0.05, eval_window=100, stabilisers=Stabilisers(min_step_rows=1))
    for k in range(20):
        ln.step([_sample(100 * k + j, 0, "old", (j % 2, 0, 0, 0)) for j in range(8)])
    row = table.vocab[1]["old"] + 1
    ln.step([_sample(10_000 + j, 2 * DAY, "new", (j % 2, 0, 0, 0)) for j in range(8)])
    assert table.vocab[1]["new"] + 1 == row and table.evictions == 1  # "oslo" was seen in the same batch
    # after one Adam step from cleared moments, m = (1 - b1) g and v = (1 - b2) g^2, so m^2 / v is
    # (1 - b1)^2 / (1 - b2) = 10 wherever g != 0; moments carried over from "old" would not give it
    state = ln.optimizer.state[ln.model.embedding.table.weight]
    m, v = state["exp_avg"][row], state["exp_avg_sq"][row]
    nz = v > 0
    assert bool(nz.any())
    np.testing.assert_allclose((m[nz] ** 2 / v[nz]).numpy(), 10.0, rtol=1e-3)


def test_the_table_round_trips_exactly_through_a_checkpoint(tmp_path: object) -> None:
    rng = np.random.default_rng(0)
    fields = ("user", "creative")
    t = DynamicTable(fields, rows=50, min_count=2, ttl_ms=3 * DAY, sketch_width=256)
    for day in range(10):  # churn: admissions, evictions, refusals and counts in the sketch
        cols = {f: [f"{f}{int(x) + 8 * day}" for x in rng.zipf(1.3, 300) % 40] for f in fields}
        enc(t, cols, day * DAY)
    assert t.evictions > 0 and t.refused > 0
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)  # plain data and tensors only
    buf.seek(0)
    back = encoder_from_state(torch.load(buf, weights_only=True))
    assert isinstance(back, DynamicTable)
    assert back.state_dict().keys() == t.state_dict().keys()
    for k, v in t.state_dict().items():
        w = back.state_dict()[k]
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, w), k
        elif k != "sketch":
            assert v == w, k
    np.testing.assert_array_equal(back.sketch.table, t.sketch.table)
    for name in ("last_seen", "row_seq", "row_field"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name), err_msg=name)
    assert back.row_value == t.row_value and back.free[: back.n_free].tolist() == t.free[: t.n_free].tolist()
    # and it goes on exactly as the original would: same ids, admissions and evictions
    for day in range(10, 14):
        cols = {f: [f"{f}{int(x) + 8 * day}" for x in rng.zipf(1.3, 300) % 40] for f in fields}
        a, b = enc(t, cols, day * DAY), enc(back, cols, day * DAY)
        np.testing.assert_array_equal(a, b)
        assert t.take_assigned().tolist() == back.take_assigned().tolist()
    assert t.stats() == back.stats()


def test_a_learner_checkpoint_restores_the_table(tmp_path: object) -> None:
    from pathlib import Path

    table = DynamicTable(("city", "user"), rows=8, min_count=1, ttl_ms=DAY, sketch_width=1024)
    ln = OnlineLearner(table, mode="final-only", eval_window=100, stabilisers=Stabilisers(min_step_rows=1))
    ln.step([_sample(j, 0, f"u{j}") for j in range(6)])
    path = Path(str(tmp_path)) / "c.ckpt"
    save_checkpoint(path, make_checkpoint(ln.model, ln.model.config, table.state_dict(), 1))
    got = encoder_from_state(load_checkpoint(path)["feature_maps"])
    cols = {"city": ["oslo", "bergen"], "user": ["u3", "u9"]}
    np.testing.assert_array_equal(got.encode_columns(cols, 2), table.encode_columns(cols, 2))


def test_a_fixed_encoder_state_still_loads() -> None:
    e = FeatureEncoder(("a",), capacity=4, min_count=1)
    e.encode_dicts([{"a": "x"}], update=True)
    assert isinstance(encoder_from_state(e.state_dict()), FeatureEncoder)


def test_the_sketch_never_undercounts_and_ages() -> None:
    s = CountMinSketch(width=256, depth=3)
    keys = [f"k{i}" for i in range(40)]
    est = s.add(keys, [3] * 40)
    assert (est >= 3).all() and s.added_since_halving == 120
    s.add(["k0"] * 150)  # 270 sightings added: past the width, every counter was halved
    assert s.added_since_halving == 0
    assert int(s.estimate(["k0"])[0]) >= (3 + 150) // 2
    back = CountMinSketch.from_state_dict(s.state_dict())
    np.testing.assert_array_equal(back.table, s.table)


def test_a_version_with_a_dynamic_table_loads_for_serving_and_scores_as_trained(tmp_path: object) -> None:
    from pathlib import Path

    from stream.ops.model_store import ModelStore
    from stream.serve.versions import load_servable

    table = DynamicTable(("city", "user"), rows=8, min_count=1, ttl_ms=DAY, sketch_width=1024)
    ln = OnlineLearner(table, mode="final-only", eval_window=100, stabilisers=Stabilisers(min_step_rows=1))
    ln.step([_sample(j, 0, f"u{j % 3}", (j % 2, 0, 0, 0)) for j in range(12)])
    store = ModelStore(Path(str(tmp_path)) / "models")
    store.publish(4, make_checkpoint(ln.model, ln.model.config, table.state_dict(), 4))
    served = load_servable(store, 4)
    rows = [{"city": "oslo", "user": "u1"}, {"city": "oslo", "user": "never-seen"}]
    ids = table.encode_dicts(rows)
    assert ids[0, 1] != 0 and ids[1, 1] == 0
    np.testing.assert_allclose(served.predict(rows)[:, 0], ln.predict(ids)[:, 0], rtol=1e-6)
