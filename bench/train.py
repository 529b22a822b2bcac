"""``aitm-stream bench train``: AITM training samples/s and batch-1 scoring latency, as JSON."""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import numpy as np
import torch

from aitm.embedding_table import DynamicTable, Encoder
from aitm.features import FeatureEncoder
from aitm.loss import aitm_loss
from aitm.model import AITM, AITMConfig
from aitm.train import make_optimizer, pick_device, train_step
from bench.feed import measure, simulated_samples
from bench.report import write_json
from stream.contract.samples import ENCODINGS
from stream.learn.device import AMP_MODES, DevicePath, Prefetcher
from stream.ops.command import command_parser


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _host_loop(path: DevicePath, model: AITM, host: list[tuple[np.ndarray, np.ndarray]], overlap: bool,
               seed: int) -> tuple[float, list[float]]:
    """The streaming trainer's situation: every batch starts in host memory. Seconds and losses
    of one pass, with the next batch's copy overlapping the step (pinned, non-blocking, side
    stream) or with plain blocking copies from pageable memory."""
    torch.manual_seed(seed)
    optimizer = make_optimizer(model)
    model.train()
    losses: list[torch.Tensor] = []
    batches = (Prefetcher(path, host) if overlap
               else ((torch.as_tensor(i).to(path.device), torch.as_tensor(y).to(path.device)) for i, y in host))
    _sync(path.device)
    start = time.perf_counter()
    for ids, labels in batches:
        with path.autocast():
            loss = aitm_loss(model(ids).float(), labels)
        optimizer.zero_grad(set_to_none=True)
        path.backward_step(loss, optimizer)
        losses.append(loss.detach())  # no host sync in the loop
    _sync(path.device)
    elapsed = time.perf_counter() - start
    return elapsed, [float(x) for x in losses]


def _device_path(args: argparse.Namespace, device: torch.device, ids: np.ndarray, labels: np.ndarray,
                 vocab_sizes: tuple[int, ...]) -> dict[str, object]:
    """Host-to-device training loops: plain copies vs overlapped copies (fp32), and AMP on/off."""
    rng = np.random.default_rng(args.seed)
    host = [(ids[idx], labels[idx]) for idx in (rng.integers(0, len(ids), args.batch) for _ in range(args.steps))]
    runs: dict[str, tuple[float, list[float]]] = {}
    for name, amp, overlap in (("plain", "off", False), ("overlap", "off", True), ("amp", args.amp, True)):
        torch.manual_seed(args.seed)
        model = AITM(AITMConfig(vocab_sizes=vocab_sizes, n_tasks=labels.shape[1])).to(device)
        path = DevicePath(device, amp)
        _host_loop(path, model, host[: args.warmup], overlap, args.seed)  # warm-up (allocator, kernels)
        torch.manual_seed(args.seed)
        model = AITM(AITMConfig(vocab_sizes=vocab_sizes, n_tasks=labels.shape[1])).to(device)
        runs[name] = _host_loop(DevicePath(device, amp), model, host, overlap, args.seed)
    rate = {k: args.steps * args.batch / v[0] for k, v in runs.items()}
    ref = np.array(runs["overlap"][1])
    amp_losses = np.array(runs["amp"][1])
    rel = np.abs(amp_losses - ref) / np.maximum(np.abs(ref), 1e-12)
    # parity: the two runs' trajectories part a little more every step, so one step's loss may
    # stray while the training does not; judged on the mean loss of the last fifth of the steps
    tail = slice(-max(1, len(ref) // 5), None)
    final = abs(float(amp_losses[tail].mean() - ref[tail].mean())) / max(abs(float(ref[tail].mean())), 1e-12)
    same = np.array(runs["plain"][1]) - ref
    return {
        "host_plain_samples_per_s": round(rate["plain"], 1),
        "host_overlap_samples_per_s": round(rate["overlap"], 1),
        "overlap_speedup": round(rate["overlap"] / rate["plain"], 3),
        # dropout draws the same masks in both: on CPU the losses are equal, on a GPU within float noise
        "overlap_loss_max_abs_diff": float(np.abs(same).max()),
        "amp": DevicePath(device, args.amp).amp,
        "amp_samples_per_s": round(rate["amp"], 1),
        "amp_speedup": round(rate["amp"] / rate["overlap"], 3),
        "amp_loss_max_rel_diff": round(float(rel.max()), 5),
        "amp_loss_mean_rel_diff": round(float(rel.mean()), 5),
        "amp_final_loss_rel_diff": round(final, 5),
        "amp_losses_within_tolerance": bool(final <= args.amp_tolerance),
        "amp_tolerance": args.amp_tolerance,
        "pinned": DevicePath(device).pin,
    }


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = command_parser("bench train")
    p.add_argument("--json", type=Path, default=Path("reports/bench_train.json"))
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads on CPU")
    p.add_argument("--batch", type=int, default=2000)
    p.add_argument("--steps", type=int, default=150, help="timed training steps")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--score-calls", type=int, default=3000, help="timed batch-1 scoring calls")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", type=int, default=0,
                   help="the streaming trainer's embedding table of this many rows (TRAINER_EMBEDDING_ROWS); "
                        "default 0: a fixed table of each field's cardinality + 1")
    p.add_argument("--feed-encoding", choices=ENCODINGS, default="msgpack",
                   help="the samples encoding whose feed rate train_vs_feed compares the step with")
    p.add_argument("--feed-samples", type=int, default=20_000, help="samples the feed rate is timed on")
    p.add_argument("--amp", choices=AMP_MODES, default="bf16",
                   help="the device_path section's mixed precision (a GPU only; off on CPU)")
    p.add_argument("--amp-tolerance", type=float, default=0.02,
                   help="largest relative difference of the AMP mean loss (last fifth of the steps) from fp32")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Time AITM (paper sizes) on simulator features; write the JSON report."""
    from simulators.funnel import TASKS, FunnelSimulator, SimConfig

    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    sim = FunnelSimulator(SimConfig(seed=args.seed))
    data = sim.dataset(2)
    encoder: Encoder
    if args.rows:  # the streaming trainer's table: like with like in ``bench stream``
        encoder = DynamicTable(sim.field_names, args.rows, 10, 7 * 86_400_000)
        cols = {f: [str(v) for v in data.features[:, k].tolist()] for k, f in enumerate(sim.field_names)}
        ids_np = encoder.encode_columns(cols, len(data), update=True, event_time_ms=data.event_time_ms)  # (N, F)
    else:
        encoder = FeatureEncoder(sim.field_names, capacity=[c + 1 for c in sim.cardinalities], min_count=10)
        ids_np = encoder.encode_array(data.features, update=True)  # (N, F)
    ids = torch.as_tensor(ids_np, device=device)  # (N, F)
    labels = torch.as_tensor(data.labels, dtype=torch.float32, device=device)  # (N, T)
    model = AITM(AITMConfig(vocab_sizes=encoder.vocab_sizes, n_tasks=len(TASKS))).to(device)
    optimizer = make_optimizer(model)
    n = len(ids)
    batches = [
        torch.randint(0, n, (args.batch,), device=device) for _ in range(16)
    ]  # 16 x (B,) index sets, drawn up front so timing covers the step only

    def run(steps: int) -> float:
        _sync(device)
        start = time.perf_counter()
        for i in range(steps):
            idx = batches[i % len(batches)]
            train_step(model, optimizer, ids[idx], labels[idx])
        _sync(device)
        return time.perf_counter() - start

    run(args.warmup)
    elapsed = run(args.steps)
    samples_per_s = args.steps * args.batch / elapsed

    model.eval()
    rows = ids_np[: args.score_calls]  # (C, F)
    dicts = sim.feature_dicts(data)[: args.score_calls]
    lat_ms, lat_dict_ms = [], []
    with torch.inference_mode():
        for i in range(len(rows)):
            t0 = time.perf_counter_ns()
            x = torch.as_tensor(rows[i : i + 1], device=device)  # (1, F)
            torch.sigmoid(model(x)).cpu()  # (1, T)
            lat_ms.append((time.perf_counter_ns() - t0) / 1e6)
        for row in dicts:  # the scorer's path: a feature dict in, probabilities out
            t0 = time.perf_counter_ns()
            x = torch.as_tensor(encoder.encode_dicts([row]), device=device)  # (1, F)
            torch.sigmoid(model(x)).cpu()  # (1, T)
            lat_dict_ms.append((time.perf_counter_ns() - t0) / 1e6)
    device_path = _device_path(args, device, ids_np, np.asarray(data.labels, np.float32), encoder.vocab_sizes)
    # the feed's rate in this run: above 1, the step outruns what one feed process can parse
    feed = measure(simulated_samples(args.feed_samples, args.seed), args.feed_encoding, args.batch, repeats=3)
    skip = min(100, len(lat_ms) // 10)  # warm-up calls
    lat = np.array(lat_ms[skip:])
    lat_dict = np.array(lat_dict_ms[skip:])
    report = {
        "train_samples_per_s": round(samples_per_s, 1),
        "score_batch1_p99_ms": round(float(np.percentile(lat, 99)), 4),
        "score_batch1_p50_ms": round(float(np.percentile(lat, 50)), 4),
        "score_dict_batch1_p99_ms": round(float(np.percentile(lat_dict, 99)), 4),
        "train_vs_feed": round(samples_per_s / feed["feed_samples_per_s"], 3),
        "feed_samples_per_s": feed["feed_samples_per_s"],
        "feed_encoding": args.feed_encoding,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch,
        "steps": args.steps,
        "model": "AITM",
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "device_path": device_path,
    }
    print(write_json(args.json, report), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
