"""Simulator families for offline model comparisons: four ways a funnel's truth can be built.

Each family draws impressions with categorical features, the true end-to-end probability of
every step and monotone labels (``y_1 >= y_2 >= ... >= y_T``), in time order, deterministic
per seed. Why these four is declared in docs/models.md ("Simulator families"):

- ``funnel``: the project's simulator (``simulators.funnel``): a product of step conditionals.
- ``tanh_product``: a held-out-style product of step conditionals written apart from it:
  20 Zipf fields of cardinality 5..20,000; each step's conditional logit is a linear term of
  hidden per-value embeddings plus tanh x tanh interactions of them; labels drawn step by step.
- ``cascade``: sequential dependence that a product of independently modelled conditionals
  does not share: step t's conditional logit is the previous step's conditional logit (scaled)
  plus a small term of its own, so keen audiences pass every step; later steps are very sparse.
- ``adverse``: the same, but approval carries application's conditional logit with a *negative*
  weight (adverse selection: the keenest applicants are the riskiest to approve), so the
  end-to-end ranking of the late steps is not the earlier steps'; later steps are very sparse.

>>> d = generate("cascade", 2_000, seed=1)
>>> d.features.shape, d.labels.shape, bool((d.labels[:, 1:] <= d.labels[:, :-1]).all())
((2000, 20), (2000, 4), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

TASKS = ("click", "application", "approval", "activation")
FAMILIES = ("funnel", "tanh_product", "cascade", "adverse")
N_FIELDS = 20
MIN_CARD, MAX_CARD = 5, 20_000
_CALIBRATION_ROWS = 60_000


@dataclass(frozen=True)
class FamilyData:
    """Impressions in time order: codes (N, F) int64, labels (N, T) int8, truth (N, T) float64."""

    family: str
    seed: int
    field_names: tuple[str, ...]
    features: np.ndarray
    labels: np.ndarray
    p_true: np.ndarray

    def __len__(self) -> int:
        return int(self.features.shape[0])


@dataclass(frozen=True)
class FamilySpec:
    """Knobs of the two families written here (the ``funnel`` family has its own SimConfig)."""

    # end-to-end positive rate of each step
    rates: tuple[float, ...]
    linear_scale: float  # std of the linear term of each step's logit
    interaction_scale: float  # std of the tanh x tanh term
    task_correlation: float  # share of the step weights drawn from a shared component
    carry: float | tuple[float, ...] = 0.0  # weight of the previous step's conditional logit (per later step)
    own: float = 1.0  # cascade: scale of a later step's own term
    k: int = 8  # width of the hidden per-value embeddings
    pairs: int = 4  # tanh x tanh products per step


SPECS: dict[str, FamilySpec] = {
    # rates as the paper's industrial set; conditionals of the later steps are high (0.72, 0.77)
    "tanh_product": FamilySpec(
        rates=(0.23, 0.018, 0.013, 0.010), linear_scale=0.9, interaction_scale=0.7, task_correlation=0.5
    ),
    # sparse later steps: 0.5% approval and 0.25% activation end to end
    "cascade": FamilySpec(
        rates=(0.15, 0.015, 0.005, 0.0025),
        linear_scale=0.9,
        interaction_scale=0.8,
        task_correlation=0.0,
        carry=0.5,
        own=0.7,
    ),
    # as cascade, but approval's conditional carries application's with a negative weight
    "adverse": FamilySpec(
        rates=(0.15, 0.015, 0.005, 0.0025),
        linear_scale=0.9,
        interaction_scale=0.8,
        task_correlation=0.0,
        carry=(0.5, -0.8, 0.5),
        own=0.7,
    ),
}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class ZipfFields:
    """20 categorical fields, cardinalities log-spaced 5..20,000, Zipf-distributed values."""

    def __init__(self, rng: np.random.Generator, n_fields: int = N_FIELDS) -> None:
        self.cardinalities = tuple(int(c) for c in np.geomspace(MIN_CARD, MAX_CARD, n_fields).round())
        self.names = tuple(f"f{i:02d}_c{c}" for i, c in enumerate(self.cardinalities))
        self._cdfs = []
        for card in self.cardinalities:
            a = rng.uniform(0.8, 1.3)  # Zipf exponent of this field
            p = 1.0 / np.arange(1, card + 1) ** a
            p = p[rng.permutation(card)]
            self._cdfs.append(np.cumsum(p / p.sum()))

    def draw(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Codes (n, F) int64."""
        u = rng.random((n, len(self.cardinalities)))
        cols = [np.minimum(np.searchsorted(cdf, u[:, f]), len(cdf) - 1) for f, cdf in enumerate(self._cdfs)]
        return np.stack(cols, axis=1).astype(np.int64)


class HiddenLogits:
    """Per-step logit parts from hidden per-value embeddings: a linear term and tanh x tanh pairs.

    ``parts(codes)`` -> linear (N, T) and interaction (N, T), both unscaled.
    """

    def __init__(self, rng: np.random.Generator, fields: ZipfFields, spec: FamilySpec, n_steps: int) -> None:
        k, m, rho = spec.k, spec.pairs, spec.task_correlation
        importance = rng.gamma(1.0, 1.0, size=len(fields.cardinalities))  # some fields matter more
        scale = importance / math.sqrt(float((importance**2).sum()))
        self.emb = [rng.normal(size=(c, k)) * s for c, s in zip(fields.cardinalities, scale, strict=True)]

        def step_weights(shape: tuple[int, ...]) -> np.ndarray:
            shared = rng.normal(size=shape)
            own = rng.normal(size=(n_steps, *shape))
            return rho * shared + math.sqrt(1 - rho**2) * own  # (T, *shape)

        f = len(fields.cardinalities)
        self.w_lin = step_weights((f, k))  # (T, F, k): a per-field, per-step read-out
        self.w_a = step_weights((k, m))  # (T, k, m)
        self.w_b = step_weights((k, m))  # (T, k, m)
        self.w_pair = rng.choice((-1.0, 1.0), size=(n_steps, m))

    def parts(self, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        e = np.stack([table[codes[:, f]] for f, table in enumerate(self.emb)], axis=1)  # (N, F, k)
        linear = np.einsum("nfk,tfk->nt", e, self.w_lin)  # (N, T)
        h = e.sum(1)  # (N, k)
        a = np.tanh(np.einsum("nk,tkm->ntm", h, self.w_a) * 1.5)  # (N, T, m)
        b = np.tanh(np.einsum("nk,tkm->ntm", h, self.w_b) * 1.5)  # (N, T, m)
        inter = np.einsum("ntm,tm->nt", a * b, self.w_pair)  # (N, T)
        return linear, inter


class FamilyWorld:
    """The hidden world of ``tanh_product``, ``cascade`` or ``adverse``: features, truth and labels by seed."""

    def __init__(self, family: str, seed: int) -> None:
        if family not in SPECS:
            raise ValueError(f"unknown family {family!r}; choose from {tuple(SPECS)}")
        self.family, self.seed, self.spec = family, seed, SPECS[family]
        rng = np.random.default_rng([seed, 104_729, FAMILIES.index(family)])
        self.fields = ZipfFields(rng)
        n_steps = len(self.spec.rates)
        self.hidden = HiddenLogits(rng, self.fields, self.spec, n_steps)
        calib = self.fields.draw(rng, _CALIBRATION_ROWS)
        lin, inter = self.hidden.parts(calib)
        self._norm = (lin.mean(0), lin.std(0) + 1e-9, inter.mean(0), inter.std(0) + 1e-9)
        self._bias = np.zeros(n_steps)
        self._calibrate(calib)

    def _raw(self, codes: np.ndarray) -> np.ndarray:
        """Step terms before carry and intercepts, (N, T), each with the spec's std."""
        lin, inter = self.hidden.parts(codes)
        mu_l, sd_l, mu_i, sd_i = self._norm
        s = self.spec
        return s.linear_scale * (lin - mu_l) / sd_l + s.interaction_scale * (inter - mu_i) / sd_i

    def _conditional_logits(self, raw: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """(N, T) conditional logits; in ``cascade`` and ``adverse`` step t carries step t-1's logit."""
        out = raw + bias
        carry = self.spec.carry
        if carry:
            weights = carry if isinstance(carry, tuple) else (carry,) * (out.shape[1] - 1)
            own = raw.copy()
            own[:, 1:] *= self.spec.own  # a later step's own term, beside the carried one
            out = own + bias
            for t in range(1, out.shape[1]):
                out[:, t] += weights[t - 1] * (out[:, t - 1] - bias[t - 1])
        return out

    def _calibrate(self, codes: np.ndarray) -> None:
        """Solve the intercepts, step by step, so that end-to-end rates hit ``spec.rates``."""
        raw = self._raw(codes)
        for t, rate in enumerate(self.spec.rates):
            lo, hi = -25.0, 25.0
            for _ in range(60):
                self._bias[t] = (lo + hi) / 2
                p = np.cumprod(_sigmoid(self._conditional_logits(raw, self._bias)[:, : t + 1]), axis=1)
                if p[:, t].mean() < rate:
                    lo = self._bias[t]
                else:
                    hi = self._bias[t]

    def conditional_probs(self, codes: np.ndarray) -> np.ndarray:
        """(N, T) probability of each step given that its predecessor happened."""
        return _sigmoid(self._conditional_logits(self._raw(codes), self._bias))

    def sample(self, n: int) -> FamilyData:
        """``n`` impressions (deterministic per seed and n)."""
        rng = np.random.default_rng([self.seed, n, 15_485_863])
        codes = self.fields.draw(rng, n)
        cond = self.conditional_probs(codes)
        labels = np.cumprod(rng.random(cond.shape) < cond, axis=1).astype(np.int8)
        return FamilyData(self.family, self.seed, self.fields.names, codes, labels, np.cumprod(cond, axis=1))


def _funnel(n: int, seed: int) -> FamilyData:
    from simulators.funnel import FunnelSimulator, SimConfig

    per_day = 20_000
    sim = FunnelSimulator(SimConfig(seed=seed, impressions_per_day=per_day))
    batch = sim.dataset(max(1, math.ceil(n / per_day)))
    return FamilyData("funnel", seed, sim.field_names, batch.features[:n], batch.labels[:n], batch.p_true[:n])


def generate(family: str, n: int, seed: int = 0) -> FamilyData:
    """``n`` impressions of ``family`` in time order, deterministic per (family, n, seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if family == "funnel":
        return _funnel(n, seed)
    return FamilyWorld(family, seed).sample(n)
