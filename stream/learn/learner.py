"""The Kafka-free online learner: encode a batch of samples, score it, evaluate, then train on it.

``OnlineLearner.step`` is test-then-train: the whole batch is scored with the current model in
eval mode *before* any update, so no evaluated prediction comes from a model that saw the label.
Evaluation uses final labels only, against the prediction made when the impression was first seen
(its first sample; kept in ``pending``), so a mode that trains on a first sample (``fnw``) is not
evaluated on a model that already trained on that impression. A final with no first sample seen
is evaluated with the batch's pre-training prediction (no mode has trained on it yet).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypedDict, cast

import numpy as np
import torch

from aitm.embedding_table import Encoder
from aitm.layers import EMBEDDING_INIT_STD, DenseInit
from aitm.lazy_adam import LazyAdam
from aitm.loss import ALPHA, aitm_loss, bce_per_task, calibrator
from aitm.model import AITM, AITMConfig, AITMHead, AITMTransfer
from stream.contract.samples import Sample
from stream.learn.delay_model import DelayModel
from stream.learn.delayed_feedback import MODES, TrainRows, train_rows
from stream.learn.device import DevicePath
from stream.learn.frozen import FrozenBaseline
from stream.learn.lr_schedule import VolumeRate
from stream.learn.mixing_buffer import MixingBuffer, RowBlock
from stream.learn.prequential import PrequentialEvaluator
from stream.learn.sample_batch import CORRECTION, FINAL, FIRST, N_TASKS, SampleBatch, as_batch
from stream.learn.served_level import ArrivedCounts
from stream.learn.served_ratio import StepCounts
from stream.learn.stabilisers import Stabilisers, held_back, init_output_bias
from stream.learn.weight_average import RecentPredictions, WeightAverage, output_bias_shift

if TYPE_CHECKING:
    from stream.learn.ranks import RankSync
    from stream.ops.settings import Settings

PENDING_CAP: Final = 500_000  # first-sample predictions awaiting their final label
SEEN_CAP: Final = 500_000  # (impression id, seq) keys remembered for deduplication
RECENTRE_MIN_ROWS: Final = 500  # recent impressions the served average's biases need to be re-centred
# rows a re-centring scores (an even subsample of the ring): ~0.1 s of CPU per publication; the
# target and the served mean are taken on the same rows, so their ratio is far steadier than either
RECENTRE_EVAL_ROWS: Final = 4096
# the live predictions' mean is taken with this many times the average's half-life (in practice
# over the whole ring): with the same half-life it followed the live model's daily ripple and the
# sparse steps' swing rose to 1.25-1.29; with 4x, 1.10-1.26 (replays, docs/serving.md)
RECENTRE_HALF_LIVES: Final = 4.0
TABLE: Final = "embedding.table.weight"  # the embedding table: trained and averaged row-wise


class ModelOptions(TypedDict):
    """The network's shape, as ``OnlineLearner`` takes it (keyword arguments)."""

    dense_init: DenseInit
    head: AITMHead
    transfer: AITMTransfer
    experts: int
    transfer_detach: bool


def model_options(s: Settings) -> ModelOptions:
    """The network's shape from the settings (``TRAINER_DENSE_INIT``, ``TRAINER_AITM_HEAD``,
    ``TRAINER_AITM_TRANSFER``, ``TRAINER_AITM_EXPERTS``, ``TRAINER_AITM_TRANSFER_DETACH``): the trainer
    and every bench that stands in for it take it from here, ``OnlineLearner(..., **model_options(s))``,
    so a new option reaches them all."""
    return ModelOptions(dense_init=s.trainer_dense_init, head=s.trainer_aitm_head,
                        transfer=s.trainer_aitm_transfer, experts=s.trainer_aitm_experts,
                        transfer_detach=s.trainer_aitm_transfer_detach)


@dataclass
class StepResult:
    """What one ``step`` did; ``eval_*`` are the final-labelled pairs it added to the evaluator."""

    samples: int
    duplicates: int
    trained_rows: int
    eval_ids: list[str]
    eval_labels: np.ndarray  # (E, T) final labels
    eval_probs: np.ndarray  # (E, T) predictions made before any training on those impressions
    scored_probs: np.ndarray  # (N, T) the batch's pre-training predictions; NaN for finals whose
    # first-sample prediction was held (they are evaluated with that one and need no new score)
    seconds: float
    # samples of held-back impressions (never trained on): their rows in the batch ``holdout_rows``
    # (H,), encoded features (H, F); labels and times are the batch's
    holdout_rows: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    holdout_ids: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 0), np.int64))


class OnlineLearner:
    """AITM + feature encoder + optimizer + prequential evaluator, stepped one batch at a time."""

    def __init__(
        self,
        encoder: Encoder,
        mode: str = "fnw",
        lr: float = 1e-3,
        device: str | torch.device = "cpu",
        eval_window: int = 20_000,
        alpha: float = ALPHA,
        model: AITM | None = None,
        seed: int = 0,
        freeze_after_ms: int | None = None,
        one_pass: bool = True,
        stabilisers: Stabilisers | None = None,
        dense_init: DenseInit = "torch",
        head: AITMHead = "joint",
        transfer: AITMTransfer = "ait",
        experts: int = 0,
        transfer_detach: bool = False,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown delayed-feedback mode {mode!r}; one of {MODES}")
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.encoder = encoder
        self.mode = mode
        self.alpha = alpha
        st = self.stabilisers = stabilisers or Stabilisers()
        if model is None:
            model = AITM(AITMConfig(vocab_sizes=encoder.vocab_sizes, n_tasks=N_TASKS, dense_init=dense_init, head=head,
                                    transfer=transfer, experts=experts, transfer_detach=transfer_detach))
            if st.prior_rates is not None:
                init_output_bias(model, st.prior_rates)
        self.model = model.to(self.device)
        # lazy row-wise Adam on the embedding table: a step moves only the rows it trained (aitm/lazy_adam.py)
        self.optimizer = LazyAdam(self.model, self.model.embedding.table, lr=lr)
        # TRAINER_LR_SCALE=volume: the rate follows the impressions a day (None: ``lr`` throughout)
        self.base_lr = lr
        self.lr_rate = VolumeRate(lr, st.lr_volume) if st.lr_volume is not None else None
        self.mixer = MixingBuffer(N_TASKS, st.min_step_rows, st.positive_slack or 1.0, st.positive_half_life)
        self.average = (WeightAverage(self.model, st.ema_half_life_rows, lazy=TABLE)
                        if st.ema_half_life_rows > 0 else None)
        self.recent = (RecentPredictions(st.recentre_rows, len(encoder.fields), N_TASKS)
                       if self.average is not None and st.recentre_rows > 0 else None)
        self.bias_shift = np.zeros(N_TASKS)  # the last re-centring's shift of the served biases (logits)
        self.completeness = np.ones(N_TASKS)  # the last served delay correction (x the live mean)
        # the served level from a delay-corrected count of arrived positives (seventh round)
        self.arrived = (ArrivedCounts(st.served_level_rows, N_TASKS, len(encoder.fields))
                        if self.recent is not None and st.served_level_tasks else None)
        self.served_level = np.full((N_TASKS, 3), np.nan)  # the last (rate, positives, sum of G) per task
        # steps served at their predecessor's level x a counted step rate (eighth round)
        self.step_counts = ({t: StepCounts(st.served_ratio_rows, st.step_windows_ms[t])
                             for t in st.served_ratio_tasks if t > 0}
                            if self.recent is not None else {})
        self.served_ratio = np.full((N_TASKS, 3), np.nan)  # the last (ratio, step positives, sum of G) per task
        self._average_moved = False  # trained since the served biases were last re-centred
        self.delay = (DelayModel(st.delay_windows_ms, st.delay_max_factor, st.delay_prior_windows_ms,
                                 st.delay_window_quantile, st.delay_served_ramp, st.delay_window_prior_sd)
                      if st.delay_windows_ms is not None and mode == "fnw" else None)
        self.steps = 0  # optimizer steps, lifetime
        # table rows the served model changed since the last ``take_changed_rows`` (a delta version)
        self.changed_rows = np.zeros(self.model.embedding.table.weight.shape[0], bool)
        self.last_batch = SampleBatch.empty()
        # one forward pass per batch, dropout off, both scores the batch and carries the gradient
        # (the scores come from the weights before this batch's update: test-then-train holds).
        # False: a scoring pass in eval mode, then a training pass with the model's dropout.
        self.one_pass = one_pass
        self._modules = list(self.model.modules())
        self.evaluator = PrequentialEvaluator(N_TASKS, eval_window)
        self.pending: dict[str, np.ndarray] = {}  # impression id -> first-sample prediction (T,)
        self._seen: dict[tuple[str, int], None] = {}
        self.trained_samples = 0  # rows the optimizer stepped on, lifetime
        self.samples_seen = 0
        # a copy of the model frozen once event time passes the stream's start + freeze_after_ms:
        # it only scores (finals of later impressions), never trains - the baseline that shows
        # what continuous training buys under drift
        self.freeze_after_ms = freeze_after_ms if freeze_after_ms else None
        self.stream_start_ms: int | None = None
        self.frozen: FrozenBaseline | None = None
        self.eval_window = eval_window
        self.sync: RankSync | None = None  # several trainer ranks: their collectives (stream.learn.ranks)
        self.io = DevicePath(self.device)  # pinned, non-blocking copies; TRAINER_AMP (stream.learn.device)

    # --- the step -------------------------------------------------------------------------------

    @torch.inference_mode()
    def predict(self, ids: np.ndarray) -> np.ndarray:
        """End-to-end probabilities (N, T) in eval mode."""
        self._set_training(False)
        x = torch.as_tensor(ids, device=self.device)  # (N, F)
        out: np.ndarray = torch.sigmoid(self.model(x)).float().cpu().numpy()
        return out

    def _set_training(self, flag: bool) -> None:
        """``model.train(flag)`` without its recursion through ``nn.Module.__setattr__`` (it is
        switched twice per step: about a microsecond per sample)."""
        if self.model.training is not flag:
            for m in self._modules:
                object.__setattr__(m, "training", flag)

    def _dedupe(self, batch: SampleBatch) -> tuple[SampleBatch, list[int] | None]:
        """The batch without samples seen before, and the rows kept (None: all of them)."""
        seen = self._seen
        keep: list[int] = []
        for i, key in enumerate(zip(batch.impression_ids, batch.seq.tolist(), strict=True)):
            if key in seen:
                continue
            seen[key] = None
            keep.append(i)
        while len(seen) > SEEN_CAP:
            del seen[next(iter(seen))]
        return (batch, None) if len(keep) == len(batch) else (batch.take(keep), keep)

    def step(self, samples: SampleBatch | Sequence[Sample], train: bool = True,
             order: np.ndarray | None = None) -> StepResult:
        """Score the batch, evaluate its finals, then (``train``) update on it. Test-then-train.
        ``self.last_batch`` is the deduplicated batch the result's rows refer to. ``order`` (N, 3),
        with several ranks: the samples' keys in the merged order of all partitions, the order in
        which the table meets every rank's rows (``RankSync.encode``)."""
        t0 = time.perf_counter()
        given = as_batch(samples)
        batch, kept = self._dedupe(given)
        self.last_batch = batch
        if order is not None and kept is not None:
            order = order[kept]
        n = len(batch)
        if self.lr_rate is not None and train:
            self._follow_volume(batch)  # with several ranks a collective: before an idle round's
        if n == 0:
            if self.sync is not None and train:
                self.sync.idle(self)  # the others' step needs this rank's part of each collective
            empty = np.zeros((0, N_TASKS))
            return StepResult(0, len(given), 0, [], empty, empty, empty, time.perf_counter() - t0)
        if self.stream_start_ms is None:
            self.stream_start_ms = int(batch.event_time_ms.min())
        if self.freeze_after_ms is not None and self.frozen is None:
            self._maybe_freeze(batch)  # before this batch is trained on
        ids = self._encode(batch.features, n, train, batch.event_time_ms, order)  # (N, F)
        self._reset_rows(self.encoder.take_assigned())  # rows given to new values start afresh
        pending = self.pending
        iids = batch.impression_ids
        kind = batch.kind
        # test first, with the model as it is now - but only the rows whose prediction is used:
        # a final whose first-sample prediction is held is evaluated with that one, and no mode
        # needs its current prediction (fnw weights come from firsts and corrections)
        # (or the prediction of its first sample earlier in this batch)
        need = kind != FINAL
        firsts_here: set[str] = set()
        for i in np.flatnonzero(kind != CORRECTION).tolist():
            if kind[i] == FIRST:
                firsts_here.add(iids[i])
            else:
                need[i] = iids[i] not in pending and iids[i] not in firsts_here
        logits: torch.Tensor | None = None  # (M, T) with grad, rows ``fwd_rows`` (one pass)
        fwd_rows = np.zeros(0, np.int64)
        holdout = held_back(iids, self.stabilisers.holdout_share)
        late, n_first = self._late_rows(batch, holdout)
        pace = self._pace_completeness()
        waited: tuple[RowBlock, torch.Tensor] | None = None  # rows from the buffer and their logits
        if train and self.one_pass:
            fwd = need | (kind == FINAL) if self.mode == "final-only" else need  # + the rows it trains
            fwd_rows = np.flatnonzero(fwd)
            self._set_training(False)  # no dropout: this pass scores as well
            before = self.mixer.upcoming(late, n_first, pace)  # rows that waited and go into this step
            x = ids[fwd_rows] if before is None else np.concatenate([ids[fwd_rows], before.ids])
            with self.io.autocast():
                out = self.model(self.io.to_device(x))  # (M + W, T)
            logits = out[: fwd_rows.size]  # (M, T)
            if before is not None:
                waited = (before, out[fwd_rows.size :])
            probs = np.full((n, N_TASKS), np.nan, np.float32)  # (N, T), NaN where not scored
            probs[fwd_rows] = torch.sigmoid(logits.detach()).float().cpu().numpy()
        elif need.all():
            probs = self.predict(ids)  # (N, T)
        else:
            probs = np.full((n, N_TASKS), np.nan, np.float32)  # (N, T), NaN where not scored
            if need.any():
                probs[need] = self.predict(ids[need])
        eval_probs: list[np.ndarray] = []
        first_seen = np.ones(n, bool)
        final_rows: list[int] = []
        for i in np.flatnonzero(kind != CORRECTION).tolist():  # in batch order: a first, then its final
            iid = iids[i]
            if kind[i] == FIRST:
                pending[iid] = probs[i]
            else:
                final_rows.append(i)
                at_first = pending.pop(iid, None)
                if at_first is None:
                    first_seen[i] = False
                    eval_probs.append(probs[i])
                else:
                    eval_probs.append(at_first)
        while len(self.pending) > PENDING_CAP:
            del self.pending[next(iter(self.pending))]
        y_eval = batch.labels[final_rows].astype(np.float64).reshape(-1, N_TASKS)
        p_eval = np.asarray(eval_probs, np.float64).reshape(-1, N_TASKS)
        self.evaluator.update(y_eval, p_eval)
        if self.frozen is not None and final_rows:
            self.frozen.evaluate(batch.event_time_ms, ids, final_rows, y_eval, p_eval)
        rows = 0
        if train:  # ... and only then train
            tr = train_rows(self.mode, batch, probs, first_seen)
            if self.delay is not None:
                self._delay_weights(batch, tr)
            if self.recent is not None:
                fr = np.flatnonzero((kind == FIRST) & ~holdout)  # the impressions, as trained on
                self.recent.add(ids[fr], probs[fr].astype(np.float64), float(self.trained_samples),
                                _arrival_ms(batch)[fr])
            if self.arrived is not None:
                self._count_arrived(batch, holdout, ids, probs)
            if self.step_counts:
                self._count_steps(batch, holdout)
            mine = ~holdout[tr.index]  # the held-back slice is never trained on
            index = tr.index[mine]
            block = RowBlock.of(ids[index], tr.labels[mine], tr.mask[mine], tr.weight[mine], origin=index)
            ready = self.mixer.add(block, late[index], n_first, pace)
            if ready is not None:
                rows = len(ready)
                self._optimize(ready, logits, fwd_rows, waited)
            elif self.sync is not None:
                self.sync.no_rows(self)
            self.trained_samples += rows
        self.samples_seen += n
        eval_ids = [iids[i] for i in final_rows]
        held = np.flatnonzero(holdout)
        return StepResult(n, len(given) - n, rows, eval_ids, y_eval, p_eval, probs, time.perf_counter() - t0,
                          held, ids[held])

    def _follow_volume(self, batch: SampleBatch) -> None:
        """Feed the round's new impressions and event times (over every rank) to the rate that
        follows the volume, and set the optimizer's rate for this round's step."""
        assert self.lr_rate is not None
        fresh = self._new_impressions(batch)
        times = (int(batch.event_time_ms.min()), int(batch.event_time_ms.max())) if len(batch) else None
        if self.sync is not None:
            fresh, times = self.sync.volume(fresh, times)
        if times is not None:
            self.optimizer.set_lr(self.lr_rate.observe(fresh, times[1], times[0]))

    def _new_impressions(self, batch: SampleBatch) -> int:
        """The impressions this (deduplicated) batch shows for the first time: its first samples,
        and its finals of impressions with no first sample (none pending, none earlier in the
        batch). Every impression the joiner accepts gets exactly one final and at most one first,
        the first before the final, so each is counted once, by its earliest sample, whatever the
        emission policy: the joiner sends a first only when the funnel is not yet final at
        impression + ``JOINER_OBSERVE_MS`` (none at all under the ``matured`` policy), so counting
        first samples alone read 26% of the impressions in a kept ``bench serving`` run. A rank
        sees every sample of its impressions (the samples are keyed by impression id) and
        ``pending`` is in its checkpoint, so the ranks' sums are the stream's impressions; a final
        whose first was evicted past ``PENDING_CAP`` counts twice (as for its evaluation)."""
        kind = batch.kind
        fresh = int((kind == FIRST).sum())
        finals = np.flatnonzero(kind == FINAL)
        if finals.size:
            iids = batch.impression_ids
            pending = self.pending
            firsts_here = {iids[i] for i in np.flatnonzero(kind == FIRST).tolist()}
            fresh += sum(1 for i in finals.tolist() if iids[i] not in pending and iids[i] not in firsts_here)
        return fresh

    @torch.no_grad()
    def _reset_rows(self, rows: np.ndarray) -> None:
        """Rows just given to a value (new, or recycled from an expired one) start afresh: drawn
        again from the model's initial distribution - from a generator seeded by the table's
        assignment count, so a run resumed from a checkpoint draws the same - in the trained model
        and in the served average alike, with their optimizer state (Adam's moments) cleared.
        (Starting them as copies of their field's OOV row measured 0.03-0.05 AUC worse on the
        sparse steps: every value of a field then starts identical - docs/embedding_table.md.)"""
        if rows.size == 0:
            return
        self.changed_rows[rows] = True
        table = self.model.embedding.table.weight
        gen = torch.Generator().manual_seed(int(np.asarray(self.encoder.marker(), np.int64).sum()) + 1)
        fresh = torch.randn((rows.size, table.shape[1]), generator=gen) * EMBEDDING_INIT_STD  # (R, d)
        dst = torch.as_tensor(rows, device=self.device)
        table[dst] = fresh.to(table)
        for name in ("exp_avg", "exp_avg_sq"):
            moment = self.optimizer.state.get(table, {}).get(name)
            if moment is not None:
                moment[dst] = 0
        if self.average is not None:
            self.average.set_rows(dst, fresh)

    def _delay_weights(self, batch: SampleBatch, tr: TrainRows) -> None:
        """Cold-start delay compensation (``stream.learn.delay_model``): add each positive copy of task
        ``t`` (a first sample's or a correction's, not a labelled final) to the delay fit; in training
        mode, first weight it by the factor of its arrival age, from the fit so far."""
        assert self.delay is not None and self.stream_start_ms is not None
        delay = self.delay
        delay.start(self.stream_start_ms)
        arrival = _arrival_ms(batch)  # (N,)
        copies = batch.kind[tr.index] != FINAL
        for t in range(N_TASKS):
            pos = np.flatnonzero(copies & (tr.labels[:, t] == 1) & (tr.mask[:, t] > 0))
            if pos.size == 0:
                continue
            rows = tr.index[pos]
            if self.stabilisers.delay_in_training:
                tr.weight[pos, t] *= delay.factors(t, arrival[rows]).astype(np.float32)
            delay.observe(t, batch.event_time_ms[rows], arrival[rows])
        delay.advance(int(arrival.max()))

    def _count_arrived(self, batch: SampleBatch, holdout: np.ndarray, ids: np.ndarray, probs: np.ndarray) -> None:
        """The trained impressions join the count of arrived positives (``stream.learn.served_level``):
        by their first sample, or, without one, by their final (settled); corrections and finals
        credit the positives they bring."""
        assert self.arrived is not None
        iids, kind = batch.impression_ids, batch.kind
        first = np.flatnonzero((kind == FIRST) & ~holdout)
        self.arrived.add([iids[i] for i in first], ids[first], batch.event_time_ms[first], batch.labels[first],
                         probs[first], settled=False)
        later = np.flatnonzero((kind == CORRECTION) & ~holdout)
        self.arrived.credit([iids[i] for i in later], batch.labels[later])
        final = np.flatnonzero((kind == FINAL) & ~holdout)
        self.arrived.add([iids[i] for i in final], ids[final], batch.event_time_ms[final], batch.labels[final],
                         probs[final], settled=True)

    def _count_steps(self, batch: SampleBatch, holdout: np.ndarray) -> None:
        """The samples' step positives join the counts of the served step rates
        (``stream.learn.served_ratio``), at the event time of what each sample reflects (the
        newest label's event for a correction or a final: a daily file's activation at its own
        time, not the file's)."""
        mine = np.flatnonzero(~holdout)
        at_ms = (batch.event_time_ms + batch.elapsed_ms)[mine]
        iids = [batch.impression_ids[i] for i in mine]
        labels, final = batch.labels[mine] > 0, batch.kind[mine] == FINAL
        for t, counts in self.step_counts.items():
            # labels are cumulative: a sample without the predecessor's positive changes nothing kept
            rows = np.flatnonzero(labels[:, t - 1])
            counts.observe([iids[i] for i in rows], labels[rows, t - 1], labels[rows, t], at_ms[rows],
                           final[rows])

    def _ratio_targets(self, target: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """``target`` (T,) with each counted step's served level set to its predecessor's times the
        counted step rate (in funnel order: a counted predecessor's own new level carries on), and
        the tasks so set."""
        st = self.stabilisers
        out = target.copy()
        done: list[int] = []
        for t in sorted(self.step_counts):
            counts = self.step_counts[t]
            if counts.size == 0 or out[t - 1] <= 0 or target[t - 1] <= 0:
                continue
            own = float(min(target[t] / target[t - 1], 1.0))  # the live model's own step rate
            if st.served_ratio_prior_target and st.prior_rates is not None and st.prior_rates[t - 1] > 0:
                # a cold model's own ratio reads low (it learns late positives late): no lower than the
                # configured funnel's step rate, which the count overrules as it grows
                own = max(own, min(st.prior_rates[t] / st.prior_rates[t - 1], 1.0))
            r, a, g = counts.ratio(st.step_windows_ms[t], st.delay_window_quantile, st.delay_window_prior_sd, own,
                                   st.served_ratio_pseudo_count, st.served_ratio_min_g)
            self.served_ratio[t] = (r, a, g)
            out[t] = min(out[t - 1] * r, 0.999)
            done.append(t)
        return out, done

    def _level_shift(self, recentred: torch.Tensor) -> torch.Tensor:
        """The served bias shift with the counted tasks' levels from the count of arrived positives
        (``stream.learn.served_level``): for each, the shift that makes the served mean on the
        counted impressions the count's rate, shrunk towards the model's own (the live model's
        mean there x the completeness factor); the other tasks keep ``recentred``."""
        arrived = self.arrived
        assert arrived is not None and self.average is not None
        n = arrived.size
        every = slice(0, n, -(-n // RECENTRE_EVAL_ROWS))
        own = np.nan_to_num(np.nanmean(arrived.probs[:n], 0)) * self.completeness  # (T,)
        cap = 1.0 / self.delay.max_factor if self.delay is not None else 0.0
        target = own.copy()
        for t in self.stabilisers.served_level_tasks:
            self.served_level[t] = arrived.level(t, self._completeness_now(t), float(own[t]),
                                                 self.stabilisers.served_level_pseudo_count, cap)
            target[t] = self.served_level[t, 0]
        x = torch.as_tensor(arrived.ids[every], device=self.device)
        w = np.ones(x.shape[0])
        level = output_bias_shift(self.average.model, x, np.clip(target, 1e-6, 0.999).tolist(), w, lower=True)
        counted = torch.zeros(N_TASKS, dtype=torch.bool, device=level.device)
        counted[list(self.stabilisers.served_level_tasks)] = True
        return torch.where(counted, level.to(recentred), recentred)

    def _completeness_now(self, task: int) -> Callable[[np.ndarray], np.ndarray]:
        """G of task ``task`` at the age now of impressions with these event times (1 without a
        delay model, before its fit and past the window)."""
        delay = self.delay
        if delay is None:
            return lambda at: np.ones(np.shape(at))

        return lambda at: delay.windowed_cdf(task, np.maximum(delay.now_ms - np.asarray(at, np.int64), 1))

    def _late_rows(self, batch: SampleBatch, holdout: np.ndarray) -> tuple[np.ndarray, int]:
        """(N,) the task each row is a paced late positive of (-1: none), and the first samples the
        batch brings - what the mixing buffer is told about the batch."""
        late = np.full(len(batch), -1, np.int64)
        if self.mode == "fnw" and self.stabilisers.positive_slack is not None:  # late positives are paced
            step = np.clip(batch.seq, 1, N_TASKS) - 1
            credited = ((batch.kind == CORRECTION) & (batch.seq >= 1) & (batch.seq <= N_TASKS) & ~holdout
                        & (batch.labels[np.arange(len(batch)), step] == 1))
            late[credited] = step[credited]
        return late, int(((batch.kind == FIRST) & ~holdout).sum())

    def _pace_completeness(self) -> np.ndarray | None:
        """(T,) the completeness G of each task's late positives arriving now, from the delay model
        (``MixingBuffer``: the queues drain at the steady rate, not the cold start's rate seen so
        far); None when the pace is the rate seen (``TRAINER_POSITIVE_PACE=seen``) or there is no
        delay model."""
        if self.delay is None or not self.stabilisers.positive_pace_steady:
            return None
        return np.array([self.delay.completeness(t) for t in range(N_TASKS)])

    def _optimize(self, ready: RowBlock, logits: torch.Tensor | None, fwd_rows: np.ndarray,
                  waited: tuple[RowBlock, torch.Tensor] | None) -> None:
        """One optimizer step on ``ready`` (then the weight average follows). Rows that came with
        this batch reuse the scoring pass's logits (one pass), and so do the rows that waited in the
        buffer when the pass included them (``waited``: what ``MixingBuffer.upcoming`` foresaw);
        any other row gets its own forward pass, in the same graph."""
        dev = self.device
        labels = self.io.to_device(ready.labels)  # (R, T)
        mask = self.io.to_device(ready.mask)
        weight = self.io.to_device(ready.weight)
        if logits is not None:
            here = ready.origin >= 0
            at = np.minimum(np.searchsorted(fwd_rows, ready.origin[here]), max(fwd_rows.size - 1, 0))  # positions
            if here.any() and not np.array_equal(fwd_rows[at], ready.origin[here]):
                raise RuntimeError(f"{self.mode}: a trained row was not in the scoring pass")
            parts = [logits[torch.as_tensor(at, device=dev)]] if here.any() else []
            if not here.all():
                old = ready.ids[~here]  # (W, F) rows that waited
                if waited is not None and np.array_equal(waited[0].ids, old):
                    parts.append(waited[1])  # foreseen: already in the scoring pass
                else:
                    with self.io.autocast():
                        parts.append(self.model(self.io.to_device(old)))  # (W, T)
            order = np.concatenate([np.flatnonzero(here), np.flatnonzero(~here)])
            sel = torch.as_tensor(order, device=dev)
            loss = self._loss(torch.cat(parts).float(), labels[sel], mask[sel], weight[sel], ready.mask)
        else:
            self._set_training(True)
            with self.io.autocast():
                out = self.model(self.io.to_device(ready.ids))
            loss = self._loss(out.float(), labels, mask, weight, ready.mask)
        self.optimizer.zero_grad(set_to_none=True)
        total = [len(ready)]
        touched: list[torch.Tensor] = []

        def before_step() -> None:
            if self.sync is not None:  # several ranks: the row-weighted mean gradient, before the step
                total[0] = self.sync.reduce(self.model, len(ready))
            touched.append(self.prepare_step())

        self.io.backward_step(loss, self.optimizer, before_step)
        self.after_step(total[0], touched[0])

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
              host_mask: np.ndarray) -> torch.Tensor:
        """The AITM loss of a step's rows. Several ranks: each task's mean is over the unmasked rows
        of every rank (one small all-reduce), and the BCE part is scaled so that the ranks'
        row-weighted mean gradient (``RankSync.reduce``) is exactly one trainer's on the round's
        rows - with each rank's own per-task means, a rank with few unmasked rows of a task
        weighed them as much as another's many."""
        if self.sync is None:
            return aitm_loss(logits, labels, mask, weight, self.alpha)
        rows = len(host_mask)
        every = self.sync.counts([float(rows), *np.asarray(host_mask, np.float64).sum(0).tolist()])  # (1 + T,)
        counts = torch.tensor(every[1:], device=logits.device)
        loss = bce_per_task(logits, labels, mask, weight, counts).sum() * (every[0] / rows)
        return loss + self.alpha * calibrator(torch.sigmoid(logits)) if self.alpha else loss

    def _encode(self, columns: Mapping[str, Sequence[str]], n: int, update: bool,
                event_time_ms: np.ndarray, order: np.ndarray | None = None) -> np.ndarray:
        """(N, F) ids; with several ranks, every rank's rows go through the table (``RankSync``)."""
        if self.sync is not None:
            return self.sync.encode(self.encoder, columns, n, update, event_time_ms, order)
        return self.encoder.encode_columns(columns, n, update=update, event_time_ms=event_time_ms)

    def prepare_step(self) -> torch.Tensor:
        """Just before ``optimizer.step()`` (gradients final, over every rank): the table rows the
        step moves, and only those; the weight average catches them up first."""
        touched = self.optimizer.touched_rows()
        if self.average is not None:
            self.average.catch_up(self.model, touched)  # before the step changes them
        return touched

    def after_step(self, rows: int, touched: torch.Tensor) -> None:
        """After an optimizer step on ``rows`` rows (over every rank) that moved the table rows
        ``touched``: they are marked changed, and the weight average follows."""
        self.changed_rows[touched.cpu().numpy()] = True
        self.steps += 1
        if self.average is not None:
            self.average.update(self.model, rows, touched)
            self._average_moved = True

    def take_changed_rows(self) -> np.ndarray:
        """(R,) the table rows trained or reset since the previous call (sorted): the rows of the
        served model a version changes, since the embedding table is trained row-wise."""
        rows = np.flatnonzero(self.changed_rows)
        self.changed_rows[rows] = False
        return rows

    def served_model(self) -> AITM:
        """The model a new version serves: the weight average when there is one (its output biases
        re-centred on the live model's recent predictions, when that is on and the average moved
        since), else the trained model."""
        if self.average is None:
            return self.model
        recent = self.recent
        if self._average_moved and recent is not None and recent.size >= RECENTRE_MIN_ROWS:
            every = slice(0, recent.size, -(-recent.size // RECENTRE_EVAL_ROWS))  # an even subsample
            w = recent.weights(float(self.trained_samples), RECENTRE_HALF_LIVES * self.average.half_life)[every]  # (K,)
            target = (w[:, None] * recent.probs[every]).sum(0) / w.sum()  # (T,)
            if self.delay is not None and not self.stabilisers.delay_in_training:
                # the live predictions were learned from positives arriving at G(age) of their rate
                self.completeness = np.array([self.delay.completeness_factor(t, recent.at_ms[every], w)
                                              for t in range(N_TASKS)])
                target = np.minimum(target * self.completeness, 0.999)
            x = torch.as_tensor(recent.ids[every], device=self.device)
            self.average.unshift()
            ratio_target, counted = self._ratio_targets(target) if self.step_counts else (target, [])
            if counted and self.stabilisers.served_ratio_raise_only:
                # both levels are low in a cold start, each for its own reason (docs/serving.md,
                # eighth round): the counted step rate may raise the live model's, never lower it
                target = np.maximum(target, ratio_target)
            # raised only: the average's shrink is always downward (Jensen, convex region); a live
            # model below its average is the cold start's dip, which the average rightly lags
            delta = output_bias_shift(self.average.model, x, target.tolist(), w, lower=False)
            if counted and not self.stabilisers.served_ratio_raise_only:
                # set: these may be lowered too, their level is counted, not the live model's
                both = output_bias_shift(self.average.model, x, ratio_target.tolist(), w, lower=True)
                mask = torch.zeros(N_TASKS, dtype=torch.bool, device=delta.device)
                mask[counted] = True
                delta = torch.where(mask, both.to(delta), delta)
            if self.arrived is not None and self.arrived.size >= RECENTRE_MIN_ROWS:
                delta = self._level_shift(delta)
            self.average.shift_bias(delta)
            self.bias_shift = delta.cpu().numpy()
            self._average_moved = False
        return cast(AITM, self.average.model)

    # --- the frozen copy ------------------------------------------------------------------------

    def _maybe_freeze(self, batch: SampleBatch) -> None:
        times = batch.event_time_ms
        if self.stream_start_ms is None:
            self.stream_start_ms = int(times.min())
        cutoff = self.stream_start_ms + (self.freeze_after_ms or 0)
        if int(times.max()) >= cutoff:
            self.freeze(cutoff)

    def freeze(self, cutoff_ms: int) -> None:
        """Keep a copy of the model as it is now; it scores impressions from ``cutoff_ms`` on."""
        self.frozen = FrozenBaseline(self.model, self.encoder, cutoff_ms, self.device, self.eval_window)

    def frozen_metric_values(self) -> dict[str, list[dict[str, float]]] | None:
        """The frozen copy's evaluator values, None before the freeze."""
        return self.frozen.evaluator.values() if self.frozen is not None else None

    def paired_metric_values(self) -> dict[str, list[dict[str, float]]] | None:
        """The live model's values on the frozen copy's evaluation set, None before the freeze."""
        return self.frozen.paired.values() if self.frozen is not None else None

    # --- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a restart needs besides the model (which ``make_checkpoint`` stores)."""
        ids = list(self.pending)
        probs = np.stack(list(self.pending.values())) if ids else np.zeros((0, N_TASKS), np.float32)
        return {
            "mode": self.mode,
            "optimizer": self.optimizer.state_dict(),
            "evaluator": self.evaluator.state_dict(),
            "pending_ids": ids,
            "pending_probs": torch.from_numpy(np.asarray(probs, np.float32)),
            "trained_samples": self.trained_samples,
            "samples_seen": self.samples_seen,
            "steps": self.steps,
            "mixer": self.mixer.state_dict(),
            # the trained weights (the checkpoint's model_state is what is served: the average)
            "trained_model": None if self.average is None else _cloned(self.model.state_dict()),
            "average": None if self.average is None else self.average.state_dict(),
            "stream_start_ms": self.stream_start_ms,
            "delay": None if self.delay is None else self.delay.state_dict(),
            "arrived": None if self.arrived is None else self.arrived.state_dict(),
            "step_counts": {t: c.state_dict() for t, c in self.step_counts.items()},
            "frozen": None if self.frozen is None else self.frozen.state_dict(),
            "lr_rate": None if self.lr_rate is None else self.lr_rate.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.evaluator.load_state_dict(list(state["evaluator"]))
        probs = np.asarray(state["pending_probs"], np.float32).reshape(-1, N_TASKS)
        self.pending = dict(zip(state["pending_ids"], probs, strict=True))
        self.trained_samples = int(state["trained_samples"])
        self.samples_seen = int(state["samples_seen"])
        self.steps = int(state.get("steps", 0))
        if state.get("mixer") is not None:
            self.mixer.load_state_dict(state["mixer"])
        if state.get("trained_model") is not None:
            self.model.load_state_dict(state["trained_model"])
        if self.average is not None:
            if state.get("average") is not None:
                self.average.load_state_dict(state["average"])
            else:  # a checkpoint from before the average: start it from the trained weights
                self.average = WeightAverage(self.model, self.average.half_life, lazy=TABLE)
        self.stream_start_ms = state.get("stream_start_ms")
        if self.delay is not None and state.get("delay") is not None:
            self.delay.load_state_dict(state["delay"])
        if self.lr_rate is not None and state.get("lr_rate") is not None:
            self.lr_rate.load_state_dict(state["lr_rate"])
        # the rate of this run's settings (or the one the volume reached), not the checkpoint's groups'
        self.optimizer.set_lr(self.base_lr if self.lr_rate is None else self.lr_rate.lr)
        if self.arrived is not None and state.get("arrived") is not None:
            self.arrived.load_state_dict(state["arrived"])
        for t, kept in (state.get("step_counts") or {}).items():
            if int(t) in self.step_counts:
                self.step_counts[int(t)].load_state_dict(kept)
        frozen = state.get("frozen")
        if frozen is not None:
            self.freeze(int(frozen["cutoff_ms"]))
            assert self.frozen is not None
            self.frozen.load_state_dict(frozen)

    def metric_values(self) -> dict[str, list[dict[str, float]]]:
        return self.evaluator.values()


def _arrival_ms(batch: SampleBatch) -> np.ndarray:
    """(N,) when each sample reached the trainer in event time: its partition's watermark when the
    joiner emitted it, and never before the event it reflects."""
    out: np.ndarray = np.maximum(batch.watermark_ms, batch.event_time_ms + batch.elapsed_ms)
    return out


def _cloned(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def fields_of(samples: SampleBatch | Sequence[Sample]) -> tuple[str, ...]:
    """The feature fields of a cold start: every field name in the first batch, sorted."""
    names = set(as_batch(samples).features)
    if not names:
        raise ValueError("the first batch of samples has no features: cannot fix the field list")
    return tuple(sorted(names))
