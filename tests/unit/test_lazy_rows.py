"""Row-wise training of the embedding table: a step moves only the rows its loss reached, in the
trained model, the optimizer state and the served weight average alike."""

from __future__ import annotations

import copy

import numpy as np
import torch

from aitm.embedding_table import DynamicTable
from aitm.lazy_adam import LazyAdam
from aitm.loss import aitm_loss
from aitm.model import AITM, AITMConfig
from aitm.train import make_optimizer
from stream.contract.samples import Sample
from stream.learn.learner import TABLE, OnlineLearner
from stream.learn.stabilisers import Stabilisers
from stream.learn.weight_average import WeightAverage

ALL = (True, True, True, True)


def _samples(start: int, users: list[str], t_ms: int = 0) -> list[Sample]:
    return [Sample(f"i{start + k}", "bank_1", t_ms, {"city": "oslo", "user": u}, (k % 2, 0, 0, 0), ALL, "final",
                   1000, 5) for k, u in enumerate(users)]


def test_one_learner_step_leaves_every_untouched_row_bit_identical() -> None:
    torch.manual_seed(0)
    table = DynamicTable(("city", "user"), rows=1000, min_count=1, ttl_ms=10**12, sketch_width=1024)
    ln = OnlineLearner(table, mode="final-only", lr=0.01, eval_window=100,
                       stabilisers=Stabilisers(min_step_rows=1, ema_half_life_rows=50.0, recentre_rows=0))
    users = [f"u{k}" for k in range(40)]
    for j in range(5):  # every user gets a row, trains, and the optimizer and average have history
        ln.step(_samples(100 * j, users))
    weight = ln.model.embedding.table.weight
    assert ln.average is not None
    avg = ln.average.model.embedding.table.weight  # type: ignore[union-attr]
    state = ln.optimizer.state[weight]
    before = (weight.detach().clone(), avg.clone(), state["exp_avg"].clone(), state["exp_avg_sq"].clone())
    ln.step(_samples(10_000, ["u3", "u7"]))  # one step on two users (and the one city)
    touched = {table.vocab[1]["u3"] + 1, table.vocab[1]["u7"] + 1, table.vocab[0]["oslo"] + 0}
    after = (weight.detach(), avg, state["exp_avg"], state["exp_avg_sq"])
    for b, a in zip(before, after, strict=True):
        changed = set(torch.nonzero((b != a).any(1)).flatten().tolist())
        assert changed == touched  # exactly those rows, bit for bit everywhere else
    assert ln.steps == 6


def test_dense_adam_would_move_every_row() -> None:
    """The control: the old dense Adam with L2 moves untouched rows (why the lazy one exists)."""
    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=(1000,), n_tasks=2))
    opt = make_optimizer(model, lr=0.003)
    ids = torch.arange(10).reshape(10, 1)
    before = model.embedding.table.weight.detach().clone()
    aitm_loss(model(ids), torch.ones(10, 2), None, None, 0.0).backward()
    opt.step()
    moved = (model.embedding.table.weight.detach() != before).any(1)
    assert int(moved[10:].sum()) == 990


def test_lazy_adam_applies_l2_only_to_touched_rows_and_matches_adam_there() -> None:
    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=(50,), n_tasks=2))
    model.eval()  # no dropout: both see the same forward pass
    dense = copy.deepcopy(model)
    lazy = LazyAdam(model, model.embedding.table, lr=0.01, l2=1e-2)
    ref = make_optimizer(dense, lr=0.01, l2=1e-2)
    ids = torch.tensor([[1], [2], [2], [5]])
    for m, o in ((model, lazy), (dense, ref)):
        o.zero_grad()
        aitm_loss(m(ids), torch.tensor([[1.0, 0], [0, 0], [1, 1], [0, 0]]), None, None, 0.0).backward()
        o.step()
    # on the touched rows one lazy step is one dense Adam step with L2 (a step is ~lr = 0.01 here;
    # SparseAdam adds eps before its bias correction, Adam after: tiny gradients differ by < 0.003)
    w, w_ref = model.embedding.table.weight.detach(), dense.embedding.table.weight.detach()
    start = copy.deepcopy(model).embedding.table.weight.detach()  # (not moved below)
    torch.testing.assert_close(w[[1, 2, 5]], w_ref[[1, 2, 5]], atol=3e-3, rtol=0)
    assert float((w[[1, 2, 5]] - w_ref[[1, 2, 5]]).abs().mean()) < 5e-4
    others = [r for r in range(50) if r not in (1, 2, 5)]
    assert bool((w_ref[others] != w[others]).all(1).all())  # dense L2 moved them; lazy did not
    assert torch.equal(w[others], start[others])
    for a, b in zip(model.towers.parameters(), dense.towers.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_lazy_average_equals_the_dense_one_at_every_touch() -> None:
    """Catch-up makes a row's average, whenever it is touched, what the dense average would be."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(6, 2)
    lazy = WeightAverage(emb, half_life=3.0, lazy="weight")
    dense = WeightAverage(emb, half_life=3.0)
    rng = np.random.default_rng(0)
    for _ in range(30):
        rows = torch.as_tensor(np.unique(rng.integers(0, 6, size=2)))
        lazy.catch_up(emb, rows)
        with torch.no_grad():
            emb.weight[rows] += torch.randn(len(rows), 2)  # a row-wise step
        lazy.update(emb, 2, rows)
        dense.update(emb, 2)
        torch.testing.assert_close(lazy.model.weight[rows], dense.model.weight[rows])
    lazy.catch_up(emb, torch.arange(6))  # every row brought up to date: the dense average exactly
    torch.testing.assert_close(lazy.model.weight, dense.model.weight)


def test_lazy_state_round_trips_and_old_dense_optimizer_state_loads() -> None:
    torch.manual_seed(0)
    table = DynamicTable(("city", "user"), rows=100, min_count=1, ttl_ms=10**12, sketch_width=1024)
    st = Stabilisers(min_step_rows=1, ema_half_life_rows=50.0, recentre_rows=0)
    ln = OnlineLearner(table, mode="final-only", lr=0.01, eval_window=100, stabilisers=st)
    for j in range(3):
        ln.step(_samples(100 * j, ["a", "b", "c"]))
    state = copy.deepcopy(ln.state_dict())
    again = OnlineLearner(copy.deepcopy(table), mode="final-only", lr=0.01, eval_window=100, stabilisers=st,
                          model=copy.deepcopy(ln.model))
    again.load_state_dict(state)
    ln.step(_samples(1000, ["a", "d"]))
    again.step(_samples(1000, ["a", "d"]))
    assert torch.equal(ln.model.embedding.table.weight, again.model.embedding.table.weight)
    assert ln.average is not None and again.average is not None
    assert torch.equal(ln.average.row_log_keep, again.average.row_log_keep)
    # a checkpoint from before: one dense Adam over [table, attention maps], [rest]
    old_model = AITM(ln.model.config)
    old = make_optimizer(old_model, lr=0.01)
    aitm_loss(old_model(torch.zeros((2, 2), dtype=torch.int64)), torch.ones(2, 4), None, None, 0.0).backward()
    old.step()
    target = AITM(ln.model.config)
    fresh = LazyAdam(target, target.embedding.table)
    fresh.load_state_dict(old.state_dict())
    moved = fresh.state[target.embedding.table.weight]
    torch.testing.assert_close(moved["exp_avg"], old.state[old_model.embedding.table.weight]["exp_avg"])
    assert moved["step"] == 1
    head = fresh.state[target.head_w]
    torch.testing.assert_close(head["exp_avg_sq"], old.state[old_model.head_w]["exp_avg_sq"])
    assert TABLE == "embedding.table.weight"
