"""``aitm-stream bench ablation``: where our AITM differs from a straightforward one, one knob at a time.

Every variant is trained on the same held-out-style data (``simulators.families``) with the
issue's protocol: first 80% of the impressions for training (its last 10% validation), last
20% test, a fixed number of epochs, batch 2,000, Adam 1e-3, the best epoch state on the
validation sum of AUCs. A variant is a base model and knobs, e.g. ``ours+emb=0.01`` or
``ref+attn=torch``:

- bases: ``ours`` (the product's ``AITM``), ``ref`` (``bench.reference.ReferenceAITM``,
  built like the original code), or a baseline name (``ESMM``, ``MLP``, ``MMoE``, ...);
- ``emb=STD`` embedding init std; ``dense=glorot|he|torch|zbias`` init of towers, transfer and
  heads (``glorot-tower``: all but the heads); ``head=glorot|torch`` the heads' weights alone;
  ``attn=normal|torch`` init of the AIT maps; ``shared=0|1`` one AIT for all transitions (ref);
  ``tdrop=0|1`` dropout after the transfer layer; ``bn=1`` batch norm in the towers (ref);
  ``opt=fused|plain`` Adam kernel; ``l2=default|none|all|emb`` L2 targets; ``alpha=A`` the
  calibrator's weight.

Results are appended to the JSON after every run, so an interrupted bench resumes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aitm.baselines import TaskHeads, build_model
from aitm.features import FeatureEncoder
from aitm.layers import FusedEmbedding, FusedTowers
from aitm.loss import ALPHA, aitm_loss
from aitm.model import AIT, AITM, AITMConfig
from aitm.train import Split, predict_proba, regularized_parameters, task_aucs
from bench.reference import ReferenceAITM, ReferenceConfig
from bench.report import write_with_markdown
from stream.ops.command import command_parser

DEFAULT_VARIANTS = (
    "ours",
    "ref",
    "ESMM",
    "MLP",
)


@dataclass(frozen=True)
class AblationData:
    """Encoded splits of one family world, and the oracle's test AUC."""

    source: str
    vocab_sizes: tuple[int, ...]
    train: Split
    val: Split
    test: Split
    oracle_auc: list[float]


def _log(msg: str) -> None:
    print(f"[bench ablation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def family_data(family: str, n: int, seed: int, min_count: int = 10) -> AblationData:
    """The issue's split in time order: train 72%, validation 8%, test 20%."""
    from simulators.families import generate

    d = generate(family, n, seed)
    n_test = n // 5
    n_val = (n - n_test) // 10
    n_train = n - n_test - n_val
    enc = FeatureEncoder(d.field_names, capacity=10**9, min_count=min_count)
    x_train = enc.encode_array(d.features[:n_train], update=True)
    x_val = enc.encode_array(d.features[n_train : n_train + n_val])
    x_test = enc.encode_array(d.features[n_train + n_val :])
    y = d.labels
    return AblationData(
        source=f"{family} (seed {seed}, {n} impressions)",
        vocab_sizes=tuple(len(v) + 1 for v in enc.vocab),
        train=Split.from_numpy(x_train, y[:n_train]),
        val=Split.from_numpy(x_val, y[n_train : n_train + n_val]),
        test=Split.from_numpy(x_test, y[n_train + n_val :]),
        oracle_auc=task_aucs(y[n_train + n_val :], d.p_true[n_train + n_val :]),
    )


# --- variants -------------------------------------------------------------------------------------


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """``base+key=value+...`` -> (base, knobs)."""
    base, *rest = spec.split("+")
    knobs: dict[str, str] = {}
    for item in rest:
        if "=" not in item:
            raise ValueError(f"variant knob {item!r} in {spec!r} is not key=value")
        key, value = item.split("=", 1)
        knobs[key] = value
    return base, knobs


def _glorot_(w: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        w.uniform_(-bound, bound)


def _init_(w: torch.Tensor, b: torch.Tensor | None, fan_in: int, fan_out: int, how: str) -> None:
    """Re-initialise one dense layer: ``glorot`` (Keras), ``he`` (ReLU gain, fan in), ``torch``
    (nn.Linear's default), ``zbias`` (torch's weights, zero bias); ``*-tower`` as the first word."""
    with torch.no_grad():
        if how.startswith("glorot"):
            _glorot_(w, fan_in, fan_out)
        elif how.startswith("he"):
            bound = math.sqrt(6.0 / fan_in)  # kaiming uniform, gain sqrt(2)
            w.uniform_(-bound, bound)
        elif how in ("torch", "zbias"):  # nn.Linear's default weights: U(+-1/sqrt(fan_in))
            w.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        else:
            raise ValueError(f"unknown dense init {how!r}")
        if b is None:
            return
        if how == "torch":
            b.uniform_(-1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        else:
            b.zero_()


def _reinit_dense(model: AITM, how: str) -> None:
    """Towers, transfer layers and heads re-initialised (``*-tower``: towers and transfers only)."""
    for w, b in zip(model.towers.weights, model.towers.biases, strict=True):
        _init_(w, b, w.shape[1], w.shape[2], how)
    for seq in model.transfers:
        assert isinstance(seq, nn.Sequential)
        lin = seq[0]
        assert isinstance(lin, nn.Linear)
        _init_(lin.weight, lin.bias, lin.in_features, lin.out_features, how)
    if not how.endswith("-tower"):  # the heads' biases start at zero in every init
        _init_(model.head_w, None, model.head_w.shape[1], 1, how)
        nn.init.zeros_(model.head_b)


def _reinit_any(model: nn.Module, how: str) -> None:
    """A baseline's fused towers, linear layers and task heads re-initialised."""
    for m in model.modules():
        if isinstance(m, FusedTowers):
            for w, b in zip(m.weights, m.biases, strict=True):
                _init_(w, b, w.shape[1], w.shape[2], how)
        elif isinstance(m, nn.Linear):
            _init_(m.weight, m.bias, m.in_features, m.out_features, how)
        elif isinstance(m, TaskHeads) and not how.endswith("-tower"):
            _init_(m.w, None, m.w.shape[1], 1, how)
            nn.init.zeros_(m.b)


def _product_aitm(vocab: tuple[int, ...], n_tasks: int, knobs: dict[str, str]) -> AITM:
    """The product's AITM, with knobs applied by re-initialising or swapping its parts."""
    model = AITM(AITMConfig(vocab_sizes=vocab, n_tasks=n_tasks))
    if "emb" in knobs:
        nn.init.normal_(model.embedding.table.weight, std=float(knobs["emb"]))
    if "dense" in knobs:
        _reinit_dense(model, knobs["dense"])
    if "head" in knobs:
        _init_(model.head_w, None, model.head_w.shape[1], 1, knobs["head"])
    if knobs.get("attn") == "normal":
        for m in model.aits:
            assert isinstance(m, AIT)
            nn.init.normal_(m.qkv.weight, std=0.01)
    if knobs.get("tdrop") == "0":
        for seq in model.transfers:
            assert isinstance(seq, nn.Sequential)
            seq[2] = nn.Identity()
    return model


def _reference(vocab: tuple[int, ...], n_tasks: int, knobs: dict[str, str]) -> ReferenceAITM:
    cfg = ReferenceConfig()
    if "emb" in knobs:
        cfg = replace(cfg, emb_std=float(knobs["emb"]))
    if "dense" in knobs:
        cfg = replace(cfg, dense_init=knobs["dense"])
    if "attn" in knobs:
        cfg = replace(cfg, attn_init=knobs["attn"])
    if "shared" in knobs:
        cfg = replace(cfg, shared_attention=knobs["shared"] == "1")
    if "tdrop" in knobs:
        cfg = replace(cfg, transfer_dropout=knobs["tdrop"] == "1")
    if "bn" in knobs:
        cfg = replace(cfg, batch_norm=knobs["bn"] == "1")
    return ReferenceAITM(vocab, n_tasks, cfg)


def build_variant(spec: str, vocab: tuple[int, ...], n_tasks: int) -> tuple[nn.Module, dict[str, str]]:
    """The network of a variant and its remaining (training) knobs."""
    base, knobs = parse_variant(spec)
    if base == "ours":
        return _product_aitm(vocab, n_tasks, knobs), knobs
    if base == "ref":
        return _reference(vocab, n_tasks, knobs), knobs
    model = build_model(base, vocab, n_tasks)
    if "dense" in knobs:
        _reinit_any(model, knobs["dense"])
    if "head" in knobs:
        for m in model.modules():
            if isinstance(m, TaskHeads):
                _init_(m.w, None, m.w.shape[1], 1, knobs["head"])
    if "emb" in knobs:
        for m in model.modules():
            if isinstance(m, FusedEmbedding):
                nn.init.normal_(m.table.weight, std=float(knobs["emb"]))
    return model, knobs


def make_variant_optimizer(
    model: nn.Module, knobs: dict[str, str], lr: float, l2: float
) -> torch.optim.Optimizer:
    """Adam with L2 on the chosen targets; fused kernel unless ``opt=plain``."""
    which = knobs.get("l2", "default")
    if which == "none":
        reg: list[torch.Tensor] = []
    elif which == "all":
        reg = list(model.parameters())
    elif which == "emb":
        reg = [m.weight for m in model.modules() if isinstance(m, nn.Embedding)]
        reg += [p for n, p in model.named_parameters() if n.endswith("embedding.table.weight")]
        reg = list({id(p): p for p in reg}.values())
    else:
        reg = regularized_parameters(model)
    ids = {id(p) for p in reg}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": reg, "weight_decay": l2}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.Adam(groups, lr=lr, fused=knobs.get("opt", "fused") == "fused")


def ait_weights_by_stage(model: nn.Module, split: Split) -> dict[str, dict[str, float | None]] | None:
    """Mean weight on the transferred p_{t-1}, by (previous, current) test label (paper Figure 6)."""
    fww: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = getattr(
        model, "forward_with_weights", None
    )
    if fww is None:
        return None
    model.eval()
    with torch.inference_mode():
        w = torch.cat([fww(split.ids[i : i + 50_000])[1] for i in range(0, len(split), 50_000)]).numpy()
    y = split.labels.numpy().astype(int)
    out: dict[str, dict[str, float | None]] = {}
    for t in range(1, y.shape[1]):
        stage = y[:, t - 1] * 10 + y[:, t]
        out[f"{t}->{t + 1}"] = {
            f"{s:02d}": float(w[stage == s, t - 1].mean()) if (stage == s).any() else None
            for s in (0, 10, 11)
        }
    return out


def run_variant(
    spec: str, data: AblationData, seed: int, epochs: int = 3, lr: float = 1e-3, l2: float = 1e-6
) -> dict[str, Any]:
    """Train one variant for ``epochs``; test AUC of the epoch state best on validation."""
    torch.manual_seed(seed)
    n_tasks = int(data.train.labels.shape[1])
    model, knobs = build_variant(spec, data.vocab_sizes, n_tasks)
    base = parse_variant(spec)[0]
    alpha = float(knobs.get("alpha", ALPHA if base in ("ours", "ref") else 0.0))
    opt = make_variant_optimizer(model, knobs, lr, l2)
    gen = torch.Generator().manual_seed(seed)
    n, bs = len(data.train), 2000
    best_sum, best_state, val_hist = -math.inf, None, []
    t0 = time.perf_counter()
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for s in range(n // bs):
            idx = perm[s * bs : (s + 1) * bs]
            loss = aitm_loss(model(data.train.ids[idx]), data.train.labels[idx], alpha=alpha)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        val = task_aucs(data.val.labels.numpy(), predict_proba(model, data.val.ids))
        val_hist.append(val)
        if float(np.nansum(val)) > best_sum:
            best_sum, best_state = float(np.nansum(val)), copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)
    return {
        "test_auc": task_aucs(data.test.labels.numpy(), predict_proba(model, data.test.ids)),
        "val_auc": val_hist,
        "seconds": round(time.perf_counter() - t0, 1),
        "ait_weights": ait_weights_by_stage(model, data.test),
    }


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant: mean and std (ddof 1) of test AUC per task over its seeds."""
    out = {}
    for spec, by_seed in runs.items():
        a = np.array([r["test_auc"] for r in by_seed.values()], dtype=float)  # (S, T)
        std = a.std(0, ddof=1) if len(a) > 1 else np.zeros(a.shape[1])
        out[spec] = {"mean": a.mean(0).tolist(), "std": std.tolist(), "n": len(a)}
    return out


def render(report: dict[str, Any], against: str = "ours") -> str:
    """Markdown: mean ± std per task and the difference to ``against``."""
    summ = report["summary"]
    tasks = report["tasks"]
    lines = [f"# Ablation on {report['source']}", ""]
    lines += ["| variant | n | " + " | ".join(tasks) + f" | mean Δ vs {against} (tasks 2-4) |"]
    lines += ["|---" * (len(tasks) + 3) + "|"]
    ref = summ.get(against)
    for spec, s in summ.items():
        cells = [f"{m:.4f} ± {sd:.4f}" for m, sd in zip(s["mean"], s["std"], strict=True)]
        delta = ""
        if ref is not None:
            d = np.array(s["mean"][1:]) - np.array(ref["mean"][1:])
            delta = f"{d.mean():+.4f}"
        lines.append(f"| {spec} | {s['n']} | " + " | ".join(cells) + f" | {delta} |")
    lines.append("| oracle | | " + " | ".join(f"{a:.4f}" for a in report["oracle_auc"]) + " | |")
    return "\n".join(lines) + "\n"


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench ablation")
    p.add_argument("--json", type=Path, default=Path("reports/bench_ablation.json"))
    p.add_argument("--family", default="tanh_product")
    p.add_argument("--n", type=int, default=300_000, help="impressions")
    p.add_argument("--sim-seed", type=int, default=7)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated BASE+KNOB=VALUE+...: bases ours, ref, ESMM, MLP, ...; knobs in bench/ablation.py",
    )
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    data = family_data(args.family, args.n, args.sim_seed)
    _log(f"{data.source}: train {len(data.train)}, val {len(data.val)}, test {len(data.test)}")
    report: dict[str, Any] = {}
    if args.json.exists():
        report = json.loads(args.json.read_text())
        if report.get("source") != data.source or report.get("epochs") != args.epochs:
            raise SystemExit(f"{args.json} holds another set-up ({report.get('source')}); use another --json")
    report.update(
        source=data.source, epochs=args.epochs, tasks=["click", "application", "approval", "activation"]
    )
    report["oracle_auc"] = data.oracle_auc
    runs: dict[str, dict[str, Any]] = report.setdefault("runs", {})
    for spec in variants:
        build_variant(spec, data.vocab_sizes, 4)  # fail early on a bad spec
        for seed in range(args.seeds):
            if str(seed) in runs.get(spec, {}):
                continue
            r = run_variant(spec, data, seed, args.epochs)
            runs.setdefault(spec, {})[str(seed)] = r
            _log(f"{spec} seed {seed}: test AUC {np.round(r['test_auc'], 4).tolist()} ({r['seconds']}s)")
            report["summary"] = summarise(runs)
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1) + "\n")
    report["summary"] = summarise({v: runs[v] for v in runs})
    write_with_markdown(args.json, report, render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
