"""The mixing buffer: late positives are paced against the impression flow, nothing is lost or
trained twice, small batches are gathered, and the state survives a checkpoint."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch

import stream.learn.mixing_buffer
import stream.learn.weight_average
from stream.learn.mixing_buffer import MixingBuffer, RowBlock
from stream.learn.weight_average import WeightAverage

T = 4


def negatives(n: int, start: int = 0) -> RowBlock:
    """``n`` fake-negative rows (ids carry a serial number so rows can be told apart)."""
    return RowBlock.of(np.arange(start, start + n, dtype=np.int64).reshape(-1, 1), np.zeros((n, T)),
                       origin=np.arange(n))


def late(n: int, task: int, start: int) -> RowBlock:
    y = np.zeros((n, T))
    y[:, task] = 1
    return RowBlock.of(np.arange(start, start + n, dtype=np.int64).reshape(-1, 1), y, mask=y.copy(),
                       origin=np.arange(n))


def test_doctests() -> None:
    assert doctest.testmod(stream.learn.mixing_buffer).failed == 0
    assert doctest.testmod(stream.learn.weight_average).failed == 0


def test_after_the_last_impression_late_positives_wait_instead_of_training_alone() -> None:
    buf = MixingBuffer(T, min_rows=1, slack=2.0, half_life=1000)
    serial = 0
    for _ in range(50):  # a steady stream: 100 impressions and ~1 late activation per batch
        out = buf.add(RowBlock.concat([negatives(100, serial), late(1, 3, serial + 100)]),
                      np.array([-1] * 100 + [3]), n_first=100)
        serial += 101
        assert out is not None
    # the tail: only late positives, batch after batch - none of them is trained on its own
    for _ in range(20):
        assert buf.add(late(5, 3, serial), np.full(5, 3), n_first=0) is None
        serial += 5
    assert buf.held_rows == 100
    # impressions come back: the queue drains at ~slack x its usual rate per first sample
    out = buf.add(negatives(100, serial), np.full(100, -1), n_first=100)
    assert out is not None
    released = int(out.labels[:, 3].sum())
    # the measured rate (~1 per 100 firsts, raised by the tail's own arrivals) x slack 2: a few
    # rows beside these 100 impressions, not the 100 that waited
    assert 1 <= released <= 20 and buf.held_rows == 100 - released


def test_a_burst_is_spread_and_no_row_is_lost_or_repeated() -> None:
    buf = MixingBuffer(T, min_rows=1, slack=2.0, half_life=5000)
    seen: list[int] = []
    serial = 0
    added = 0
    for step in range(400):
        parts, late_task = [negatives(50, serial)], [-1] * 50
        serial += 50
        if step % 100 == 50:  # a daily file: 40 activations at once
            parts.append(late(40, 3, serial))
            late_task += [3] * 40
            serial += 40
        elif step % 5 == 0:
            parts.append(late(1, 2, serial))
            late_task.append(2)
            serial += 1
        block = RowBlock.concat(parts)
        added += len(block)
        out = buf.add(block, np.array(late_task), n_first=50)
        if out is not None:
            seen += out.ids[:, 0].tolist()
            if step % 100 == 50:  # the burst's own batch carries only a few of its 40 positives
                assert out.labels[:, 3].sum() <= 5
    assert len(seen) == len(set(seen))  # nothing trained twice
    assert len(seen) + buf.held_rows + buf.ready_rows == added  # nothing lost


def test_small_batches_are_gathered_into_one_step() -> None:
    buf = MixingBuffer(T, min_rows=256)
    outs = [buf.add(negatives(100, 100 * i), np.full(100, -1), n_first=100) for i in range(3)]
    assert outs[0] is None and outs[1] is None and outs[2] is not None
    step = outs[2]
    assert len(step) == 300
    # only the newest batch's rows keep their position in that batch (for its scoring pass)
    assert (step.origin[:200] == -1).all() and (step.origin[200:] == np.arange(100)).all()


def test_state_round_trips_through_a_checkpoint() -> None:
    buf = MixingBuffer(T, min_rows=500, slack=2.0)
    buf.add(negatives(100), np.full(100, -1), n_first=100)
    buf.add(late(7, 3, 1000), np.full(7, 3), n_first=0)
    state = buf.state_dict()
    again = MixingBuffer(T, min_rows=500, slack=2.0)
    again.load_state_dict(state)
    assert (again.ready_rows, again.held_rows) == (buf.ready_rows, buf.held_rows)
    np.testing.assert_allclose(again.rates(), buf.rates())
    a = buf.add(negatives(500, 5000), np.full(500, -1), n_first=500)
    b = again.add(negatives(500, 5000), np.full(500, -1), n_first=500)
    assert a is not None and b is not None
    np.testing.assert_array_equal(a.ids, b.ids)


def test_rows_must_name_their_late_task() -> None:
    with pytest.raises(ValueError):
        MixingBuffer(T).add(negatives(3), np.array([-1]), n_first=3)


def test_weight_average_follows_with_its_half_life() -> None:
    m = torch.nn.Linear(1, 1, bias=False)
    avg = WeightAverage(m, half_life=100)
    with torch.no_grad():
        m.weight.fill_(1.0)
    avg.update(m, rows=1000)  # the first update takes the model as it is
    assert avg.model.weight.item() == pytest.approx(1.0)
    with torch.no_grad():
        m.weight.fill_(0.0)
    avg.update(m, rows=100)  # one half-life of rows: the old iterate keeps half its weight
    assert avg.model.weight.item() == pytest.approx(0.5)
    assert not avg.model.weight.requires_grad
    state = avg.state_dict()
    again = WeightAverage(m, half_life=100)
    again.load_state_dict(state)
    assert again.model.weight.item() == pytest.approx(0.5) and again.rows == 1100


def cold_start(buf: MixingBuffer, tell_completeness: bool, batches: int = 200) -> list[int]:
    """A stream's first ``batches`` batches of 100 impressions: task 3's late positives arrive at
    G(age) of their steady rate 0.2 per impression, G growing from 0 to 1 over 150 batches (a
    delay's warm-up). The rows held after each batch."""
    held, owed, serial = [], 0.0, 0
    for k in range(batches):
        g = min(1.0, (k + 1) / 150)
        owed += 0.2 * 100 * g
        n = int(owed)
        owed -= n
        block = RowBlock.concat([negatives(100, serial), late(n, 3, serial + 100)])
        serial += 100 + n
        buf.add(block, np.array([-1] * 100 + [3] * n), n_first=100,
                completeness=np.full(T, g) if tell_completeness else None)
        held.append(buf.held_rows)
    return held


def test_a_cold_start_is_paced_by_the_steady_rate_not_the_rate_seen_so_far() -> None:
    # the rule (docs/serving.md, sixth round): late positives are released at up to slack x their
    # *usual* rate per first sample; while the stream is younger than the delay, the rate seen so
    # far is G of it, so each first sample counts at the completeness G of the moment it came
    told = cold_start(MixingBuffer(T, min_rows=1, slack=2.0, half_life=1e6), tell_completeness=True)
    # slack 2 x the steady 0.2 per impression: every batch's arrivals (<= 20) go out with it
    assert max(told[10:]) <= 20
    # the rate seen since the start trails the growing rate: the queue holds more than two batches'
    # arrivals through the warm-up (it drains only once G is 1 and the average catches up)
    seen = cold_start(MixingBuffer(T, min_rows=1, slack=2.0, half_life=1e6), tell_completeness=False)
    assert max(seen[:150]) > 40


def test_the_tail_still_waits_when_the_pace_knows_the_completeness() -> None:
    buf = MixingBuffer(T, min_rows=1, slack=2.0, half_life=1e6)
    cold_start(buf, tell_completeness=True, batches=60)
    before = buf.held_rows
    for i in range(20):  # no impressions: nothing is released, whatever the completeness
        assert buf.add(late(5, 3, 10**6 + 5 * i), np.full(5, 3), n_first=0, completeness=np.full(T, 0.5)) is None
    assert buf.held_rows == before + 100


def test_the_completeness_survives_a_checkpoint() -> None:
    buf = MixingBuffer(T, min_rows=1, slack=2.0, half_life=1e6)
    cold_start(buf, tell_completeness=True, batches=40)
    again = MixingBuffer(T, min_rows=1, slack=2.0, half_life=1e6)
    again.load_state_dict(buf.state_dict())
    np.testing.assert_allclose(again.rates(), buf.rates())
    assert again.rates()[3] == pytest.approx(0.2, rel=0.1)  # the steady rate, not the ~0.05 seen


def test_the_pace_setting_reaches_the_stabilisers() -> None:
    from pydantic import ValidationError

    from stream.learn.stabilisers import stabilisers_from
    from stream.ops.settings import Settings

    assert stabilisers_from(Settings()).positive_pace_steady is False  # the rate seen (docs/serving.md, sixth round)
    assert stabilisers_from(Settings(trainer_positive_pace="steady")).positive_pace_steady is True
    with pytest.raises(ValidationError):
        Settings(trainer_positive_pace="fast")  # type: ignore[arg-type]
