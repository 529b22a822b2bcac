"""A served model to ONNX, one way for the scorer's fast path and ``aitm-stream export``.

torch's TorchScript-based exporter has no symbolic for ``aten::expm1`` at opset 17, and the
conditional head's end-to-end logits (``aitm.layers.end_to_end_logits``, ESMM's and the product's
AITM's) compute log(1 - p) as log(-expm1(log p)). ONNX has no Expm1 operator, so the exporter's
own mechanism for an operator it lacks, ``torch.onnx.register_custom_op_symbolic``, maps it to
Exp(x) - 1: the same value but for float rounding when x is within ~1e-4 of 0 (p within that of 1,
where the probability itself moves by less than the fast path's tolerance). The training and
eager-scoring paths keep torch's exact expm1.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any, Final

import torch
from torch import nn

ONNX_OPSET: Final = 17


def _expm1(g: Any, x: Any) -> Any:
    one = g.op("Constant", value_t=torch.tensor(1.0))
    return g.op("Sub", g.op("Exp", x), g.op("CastLike", one, x))


def to_onnx(served: nn.Module, n_fields: int, dest: Path | io.BytesIO) -> None:
    """Export ``served`` (local feature ids ``ids`` (N, F) int64 -> ``probabilities`` (N, T), N
    dynamic) to ``dest`` at ``ONNX_OPSET``."""
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1, ONNX_OPSET)
    example = torch.zeros((2, n_fields), dtype=torch.int64)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated
        torch.onnx.export(
            served, (example,), dest if isinstance(dest, io.BytesIO) else str(dest),  # type: ignore[arg-type]
            input_names=["ids"], output_names=["probabilities"],
            dynamic_axes={"ids": {0: "N"}, "probabilities": {0: "N"}},
            opset_version=ONNX_OPSET, dynamo=False,
        )
