"""JSON-safe copies of figures: NaN and infinities become null (JSON has neither), so a summary or
a bench report with an undefined figure (an AUC over one class) is still valid JSON."""

from __future__ import annotations

import math
from typing import Any


def finite(o: Any) -> Any:
    """``o`` with every non-finite float replaced by None (dicts, lists and tuples rebuilt).

    >>> finite({"auc": float("nan"), "n": [1.5, float("inf")]})
    {'auc': None, 'n': [1.5, None]}
    """
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if isinstance(o, dict):
        return {k: finite(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [finite(v) for v in o]
    return o
