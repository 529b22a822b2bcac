"""A seeded generative funnel whose truth is known.

Each impression has ~20 categorical fields. A hidden non-linear function of them (per-value
effects, pairwise interactions and a small random tanh network, partly shared across steps)
gives the conditional probability of each step; labels are drawn step by step, so
``y_click >= y_application >= y_approval >= y_activation`` always holds. Intercepts are
calibrated so that end-to-end rates sit near the paper's (23% / 1.8% / 1.3% / 1.0%).
With ``drift > 0`` the hidden weights rotate slowly over the days (a frozen model degrades).
With ``churn > 0`` user and creative IDs retire and new ones appear every day: an observed code is
``slot + generation * cardinality``; the hidden function sees ``hidden_codes`` of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TASKS = ("click", "application", "approval", "activation")
EPOCH_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z, simulated day 0
DAY_MS = 86_400_000
HOUR_MS = 3_600_000
# Windows of each step after its predecessor (the joiner's defaults; the paper's T+14).
WINDOWS_MS = (HOUR_MS, 3 * DAY_MS, DAY_MS, 14 * DAY_MS)

# (name, cardinality, zipf exponent or 0 for uniform); "bank_id" is both a field and the bank.
FIELDS: tuple[tuple[str, int, float], ...] = (
    ("user_id", 50_000, 1.05),
    ("user_age", 8, 0.0),
    ("user_gender", 3, 0.0),
    ("user_city", 400, 1.1),
    ("user_income", 10, 0.0),
    ("user_credit", 12, 0.0),
    ("user_tenure", 10, 0.0),
    ("user_past_clicks", 8, 0.9),
    ("user_past_apps", 5, 1.5),
    ("user_has_card", 3, 0.0),
    ("hour", 24, 0.0),
    ("weekday", 7, 0.0),
    ("slot", 6, 0.8),
    ("channel", 5, 0.7),
    ("page", 40, 1.0),
    ("device_os", 4, 0.5),
    ("bank_id", 6, 0.3),
    ("creative_id", 3_000, 1.1),
    ("campaign_id", 200, 1.0),
    ("card_type", 8, 0.5),
)
USER_ATTRS = (
    "user_age",
    "user_gender",
    "user_city",
    "user_income",
    "user_credit",
    "user_tenure",
    "user_has_card",
)
# Pairs of fields whose interaction matters (latent dot products).
INTERACTIONS = (
    ("user_age", "card_type"),
    ("user_income", "bank_id"),
    ("user_credit", "bank_id"),
    ("user_city", "campaign_id"),
    ("hour", "channel"),
    ("user_past_apps", "card_type"),
    ("creative_id", "page"),
    ("user_tenure", "user_has_card"),
)
CHURN_FIELDS = ("user_id", "creative_id")
_GEN_STRIDE = 7919  # a new generation of a slot takes another slot's hidden effect (a prime step)
# Hourly traffic shape (evenings busier).
HOUR_WEIGHTS = np.array([2, 1, 1, 1, 1, 2, 3, 5, 6, 6, 6, 7, 8, 7, 6, 6, 7, 8, 10, 11, 11, 9, 6, 3], float)


@dataclass(frozen=True)
class SimConfig:
    """Knobs of the simulated world; the defaults mimic the paper's funnel."""

    seed: int = 0
    impressions_per_day: int = 20_000
    n_users: int = 50_000
    # end-to-end positive rates of click, application, approval, activation (within windows)
    target_rates: tuple[float, float, float, float] = (0.23, 0.018, 0.013, 0.010)
    # radians per day by which the hidden weights rotate (0 = a stationary world)
    drift: float = 0.0
    # std of each logit component: per-value effects, interactions, hidden network, bank
    main_scale: float = 0.8
    interaction_scale: float = 0.6
    network_scale: float = 0.9
    bank_scale: float = 0.7
    # correlation of the step-specific weights with a shared component (tasks are related)
    task_correlation: float = 0.6
    # activation delay after approval: lognormal (median days, sigma); a few exceed 14 days
    activation_median_days: float = 2.0
    activation_sigma: float = 1.1
    # share of each step's delays drawn at its window's edge (within 15 min either side, a fifth
    # of them exactly on it or 1 ms past it): the joiner's window rules get exercised at the edge
    edge_rate: float = 0.01
    # ID churn: the share of user and creative IDs that retire each day, each replaced by a new ID
    # (with its own hidden effect and attributes) that takes over its popularity. Over D days a
    # field of C values shows about C * (1 + churn * D) IDs. 0 = the same IDs forever
    churn: float = 0.0
    # sequential dependence: step t's conditional logit also carries ``carry[t-1]`` x step t-1's
    # (centred, itself carried). (0.5, -0.8, 0.5) is the ``adverse`` world of docs/models.md: the
    # keenest applicants are the riskiest to approve. All 0 = the steps' logits as drawn
    carry: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class ImpressionBatch:
    """A day (or several) of impressions with their truth, in time order."""

    impression_ids: list[str]
    event_time_ms: np.ndarray  # int64 (N,)
    day: np.ndarray  # int64 (N,)
    bank: np.ndarray  # int64 (N,)
    features: np.ndarray  # int64 (N, F) category codes
    p_true: np.ndarray  # float64 (N, T) true end-to-end probability of each task
    labels: np.ndarray  # int8 (N, T) final labels (within windows), monotone
    happened: np.ndarray = field(repr=False)  # int8 (N, T) step happened at all (any delay)
    delays_ms: np.ndarray = field(repr=False)  # int64 (N, T) delay of each step after its predecessor

    def __len__(self) -> int:
        return len(self.impression_ids)

    @staticmethod
    def concat(batches: list[ImpressionBatch]) -> ImpressionBatch:
        return ImpressionBatch(
            impression_ids=[i for b in batches for i in b.impression_ids],
            **{
                name: np.concatenate([getattr(b, name) for b in batches])
                for name in (
                    "event_time_ms",
                    "day",
                    "bank",
                    "features",
                    "p_true",
                    "labels",
                    "happened",
                    "delays_ms",
                )
            },
        )


def _zipf_probs(n: int, a: float, rng: np.random.Generator) -> np.ndarray:
    p = np.ones(n) if a == 0 else 1.0 / np.arange(1, n + 1) ** a
    p = p[rng.permutation(n)]
    return p / p.sum()


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class FunnelSimulator:
    """The hidden world: draws impressions, step probabilities, labels and delays."""

    def __init__(self, config: SimConfig | None = None) -> None:
        self.config = cfg = config or SimConfig()
        self.field_names = tuple(f[0] for f in FIELDS)
        self.cardinalities = tuple(f[1] for f in FIELDS)
        self._col = {name: i for i, name in enumerate(self.field_names)}
        rng = np.random.default_rng([cfg.seed, 7919])
        self._value_probs = [_zipf_probs(card, a, rng) for _, card, a in FIELDS]
        # a fixed user table: attributes are consistent per user id
        self._users = np.stack(
            [
                rng.choice(
                    self.cardinalities[self._col[a]],
                    size=cfg.n_users,
                    p=self._value_probs[self._col[a]],
                )
                for a in USER_ATTRS
            ],
            axis=1,
        )
        self._user_probs = _zipf_probs(cfg.n_users, FIELDS[0][2], rng)
        # two parameter sets, A and B, that drift rotates between
        self._params = [self._draw_params(rng) for _ in range(2)]
        self._bias = np.zeros(len(TASKS))
        self._calibrate(rng)

    # ------------------------------------------------------------------ hidden function
    def _draw_params(self, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
        cfg, n_steps, k, hidden = self.config, len(TASKS), 4, 16
        rho = cfg.task_correlation
        importance = rng.gamma(1.0, 1.0, size=len(FIELDS))  # some fields matter more
        mains, lat, nets_in = [], [], []
        for f, card in enumerate(self.cardinalities):
            shared = rng.normal(size=card)
            steps = [rho * shared + math.sqrt(1 - rho**2) * rng.normal(size=card) for _ in range(n_steps)]
            mains.append(np.stack(steps, axis=1) * importance[f])  # (card, T)
            lat.append(rng.normal(size=(card, n_steps, k)) / math.sqrt(k))  # (card, T, k)
            nets_in.append(rng.normal(size=(card, hidden)) * importance[f] / math.sqrt(len(FIELDS)))
        shared_out = rng.normal(size=hidden)
        net_out = np.stack(
            [rho * shared_out + math.sqrt(1 - rho**2) * rng.normal(size=hidden) for _ in range(n_steps)],
            axis=1,
        )  # (hidden, T)
        bank = rng.normal(size=(self.cardinalities[self._col["bank_id"]], n_steps))
        bank[:, :2] *= 0.3  # banks differ mostly in approval and activation propensity
        return {"mains": mains, "lat": lat, "net_in": nets_in, "net_out": [net_out], "bank": [bank]}

    def _components(self, feats: np.ndarray, params: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
        n = len(feats)
        main = np.zeros((n, len(TASKS)))
        for f, table in enumerate(params["mains"]):
            main += table[feats[:, f]]
        inter = np.zeros((n, len(TASKS)))
        for a, b in INTERACTIONS:
            ia, ib = self._col[a], self._col[b]
            inter += np.einsum(
                "ntk,ntk->nt", params["lat"][ia][feats[:, ia]], params["lat"][ib][feats[:, ib]]
            )
        pre = np.zeros((n, params["net_in"][0].shape[1]))
        for f, table in enumerate(params["net_in"]):
            pre += table[feats[:, f]]
        net = np.tanh(pre) @ params["net_out"][0]
        bank = params["bank"][0][feats[:, self._col["bank_id"]]]
        return [main, inter, net, bank]

    def _calibrate(self, rng: np.random.Generator) -> None:
        """Scale each component to its target std and solve intercepts for the target rates."""
        cfg = self.config
        days = np.arange(40_000) % 7
        feats = self._draw_features(rng, 40_000, days)
        scales = (cfg.main_scale, cfg.interaction_scale, cfg.network_scale, cfg.bank_scale)
        # each component centred and scaled to its target std, so drift keeps the base rates
        self._norm: list[list[tuple[np.ndarray, np.ndarray]]] = []
        for params in self._params:
            comps = self._components(feats, params)
            self._norm.append(
                [(c.mean(axis=0), s / (c.std(axis=0) + 1e-9)) for s, c in zip(scales, comps, strict=True)]
            )
        logits = self._logits(feats, 0)
        reach = np.ones(len(feats))
        within = np.cumprod(self.within_window_probs())
        for t, rate in enumerate(cfg.target_rates):
            target = rate / within[t]
            lo, hi = -20.0, 20.0
            for _ in range(60):
                mid = (lo + hi) / 2
                if (reach * _sigmoid(logits[:, t] + mid)).mean() < target:
                    lo = mid
                else:
                    hi = mid
            self._bias[t] = (lo + hi) / 2
            reach = reach * _sigmoid(logits[:, t] + self._bias[t])

    def hidden_codes(self, feats: np.ndarray) -> np.ndarray:
        """Observed codes (N, F) -> the codes the hidden function indexes: a churned ID
        ``slot + g * C`` has the hidden value ``(slot + g * stride) % C`` (itself for g = 0)."""
        if not any(feats[:, self._col[name]].max(initial=0) >= self.cardinalities[self._col[name]]
                   for name in CHURN_FIELDS):
            return feats
        out = feats.copy()
        for name in CHURN_FIELDS:
            c, card = self._col[name], self.cardinalities[self._col[name]]
            out[:, c] = (feats[:, c] % card + (feats[:, c] // card) * _GEN_STRIDE) % card
        return out

    def generations(self, name: str, slots: np.ndarray, day: int) -> np.ndarray:
        """The generation of each slot of a churned field on ``day`` (staggered: each day a
        ``churn`` share of the slots turns over)."""
        cfg = self.config
        card = self.cardinalities[self._col[name]]
        phase = np.random.default_rng([cfg.seed, 104_729, self._col[name]]).random(card)  # (C,)
        return np.floor(day * cfg.churn + phase[slots]).astype(np.int64)

    def _logits(self, feats: np.ndarray, day: np.ndarray | int) -> np.ndarray:
        feats = self.hidden_codes(feats)
        phase = self.config.drift * np.asarray(day, dtype=float)
        a, b = np.cos(phase), np.sin(phase)
        out = np.zeros((len(feats), len(TASKS)))
        for weight, params, norm in zip((a, b), self._params, self._norm, strict=True):
            if np.all(weight == 0):
                continue
            comps = self._components(feats, params)
            total = sum((c - mu) * s for c, (mu, s) in zip(comps, norm, strict=True))
            out += np.reshape(weight, (-1, 1)) * total
        carry = self.config.carry
        if any(carry):
            for t in range(1, len(TASKS)):
                out[:, t] += carry[t - 1] * out[:, t - 1]
        return out + self._bias

    def conditional_probs(self, feats: np.ndarray, day: np.ndarray | int) -> np.ndarray:
        """(N, T) probability of each step given its predecessor happened."""
        return _sigmoid(self._logits(feats, day))

    def activation_within_window_prob(self) -> float:
        """P(activation delay <= 14 days) under the lognormal delay."""
        cfg = self.config
        z = math.log(14.0 / cfg.activation_median_days) / cfg.activation_sigma
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    def within_window_probs(self) -> np.ndarray:
        """(T,) P(a step's delay is within its window): the lognormal body (only the activation's
        reaches past its window) mixed with the edge draws, half of which fall inside."""
        e = self.config.edge_rate
        body = np.array([1.0, 1.0, 1.0, self.activation_within_window_prob()])
        return (1 - e) * body + e * 0.5

    # ------------------------------------------------------------------ sampling
    def _draw_features(self, rng: np.random.Generator, n: int, day: int | np.ndarray) -> np.ndarray:
        feats = np.empty((n, len(FIELDS)), dtype=np.int64)
        for f, card in enumerate(self.cardinalities):
            feats[:, f] = rng.choice(card, size=n, p=self._value_probs[f])
        users = rng.choice(self.config.n_users, size=n, p=self._user_probs)
        feats[:, 0] = users % self.cardinalities[0]
        churned = self.config.churn > 0 and np.ndim(day) == 0
        if churned:  # observed codes of this day's generation; attributes follow the hidden user
            for name in CHURN_FIELDS:
                c, card = self._col[name], self.cardinalities[self._col[name]]
                feats[:, c] += self.generations(name, feats[:, c], int(day)) * card
            users = self.hidden_codes(feats)[:, 0] % self.config.n_users
        for j, name in enumerate(USER_ATTRS):
            feats[:, self._col[name]] = self._users[users, j]
        feats[:, self._col["weekday"]] = np.asarray(day) % 7
        feats[:, self._col["hour"]] = rng.choice(24, size=n, p=HOUR_WEIGHTS / HOUR_WEIGHTS.sum())
        return feats

    def day_batch(self, day: int, n: int | None = None) -> ImpressionBatch:
        """The impressions of simulated ``day`` (deterministic per seed, day and n)."""
        cfg = self.config
        n = cfg.impressions_per_day if n is None else n
        rng = np.random.default_rng([cfg.seed, day, n])
        feats = self._draw_features(rng, n, day)
        offsets = feats[:, self._col["hour"]] * HOUR_MS + rng.integers(0, HOUR_MS, size=n)
        order = np.argsort(offsets, kind="stable")
        feats, offsets = feats[order], offsets[order]
        cond = self.conditional_probs(feats, day)  # (N, T)
        e2e = np.cumprod(cond * self.within_window_probs(), axis=1)
        happened = np.cumprod(rng.random((n, len(TASKS))) < cond, axis=1).astype(np.int8)
        delays = self._draw_delays(rng, n)
        within = delays <= np.array(WINDOWS_MS)
        labels = np.cumprod(happened * within, axis=1).astype(np.int8)
        return ImpressionBatch(
            impression_ids=[f"s{cfg.seed}-d{day}-{i}" for i in range(n)],
            event_time_ms=EPOCH_MS + day * DAY_MS + offsets,
            day=np.full(n, day, dtype=np.int64),
            bank=feats[:, self._col["bank_id"]].copy(),
            features=feats,
            p_true=e2e,
            labels=labels,
            happened=happened,
            delays_ms=delays,
        )

    def _draw_delays(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Delays after the predecessor: click s-min, application min-h, approval s-min, activation
        0-14+ d; ``edge_rate`` of each step's delays at its window's edge, on either side."""
        cfg = self.config

        def lognormal_ms(median_s: float, sigma: float, cap_ms: float) -> np.ndarray:
            d = median_s * 1000 * np.exp(sigma * rng.standard_normal(n))
            return np.minimum(d, cap_ms)

        # caps far past the windows: a delay may cross its window (it then counts as a negative)
        click = lognormal_ms(20, 1.0, 2 * WINDOWS_MS[0])
        application = lognormal_ms(20 * 60, 1.3, 2 * WINDOWS_MS[1])
        approval = lognormal_ms(60, 1.0, 2 * WINDOWS_MS[2])
        activation = lognormal_ms(cfg.activation_median_days * 86_400, cfg.activation_sigma, 40 * DAY_MS)
        delays = np.stack([click, application, approval, activation], axis=1).astype(np.int64) + 1
        windows = np.array(WINDOWS_MS, dtype=np.int64)
        edge = rng.random((n, len(TASKS))) < cfg.edge_rate
        offset = rng.integers(-15 * 60_000, 15 * 60_000 + 1, size=(n, len(TASKS)))
        exact = rng.random((n, len(TASKS))) < 0.2
        offset = np.where(exact, rng.integers(0, 2, size=(n, len(TASKS))), offset)  # on the edge, or 1 ms past
        return np.where(edge, np.maximum(windows + offset, 1), delays)

    def dataset(self, days: int, start_day: int = 0) -> ImpressionBatch:
        """``days`` consecutive days of impressions, in time order."""
        return ImpressionBatch.concat([self.day_batch(d) for d in range(start_day, start_day + days)])

    def feature_dicts(self, batch: ImpressionBatch) -> list[dict[str, str]]:
        """The impressions' feature maps as they appear in events (field -> str(code))."""
        names = self.field_names
        return [dict(zip(names, map(str, row), strict=True)) for row in batch.features.tolist()]

    def bank_name(self, bank: int) -> str:
        return f"bank_{bank}"
