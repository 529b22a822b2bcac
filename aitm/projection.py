"""The funnel order of served probabilities: no step above the step before it.

End-to-end probabilities of a funnel satisfy p(click) >= p(application) >= p(approval) >=
p(activation): a later step cannot happen without the earlier ones. AITM's calibrator loss only
pushes the model towards that order; at the sparse steps (1% positives, rates within a factor
1.3 of each other) the raw model broke it for most rows of most versions. Every probability the
scorer publishes - on the ``scores`` topic and from ``POST /score`` alike, both through
``ScoringModel.predict`` - is therefore projected onto the order by a cumulative minimum along
the funnel: a step predicted above its predecessor is lowered to the predecessor's value, every
other value is left as it is. Of all the ways to restore the order it is the one that trusts the
earlier steps - the ones with the most positives behind them - and never raises a probability:
the result is the largest funnel-ordered vector below the raw one, and a row already in order is
unchanged. (Averaging a violating pair, the Euclidean projection, would raise the earlier step
on the evidence of the sparser one.)

>>> funnel_order(np.array([[0.20, 0.02, 0.03, 0.01], [0.20, 0.02, 0.01, 0.005]])).tolist()
[[0.2, 0.02, 0.02, 0.01], [0.2, 0.02, 0.01, 0.005]]
"""

from __future__ import annotations

import numpy as np


def funnel_order(probs: np.ndarray) -> np.ndarray:
    """(N, T) probabilities in funnel order -> the same with each step capped by the one before it."""
    out: np.ndarray = np.minimum.accumulate(np.asarray(probs), axis=-1)
    return out
