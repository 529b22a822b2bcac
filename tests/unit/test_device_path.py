"""The trainer's device path on CPU: the same code the GPU runs, pinning and AMP off
(stream/learn/device.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aitm.loss import aitm_loss
from aitm.model import AITM, AITMConfig
from aitm.train import make_optimizer, train_step
from stream.learn.device import DevicePath, Prefetcher
from stream.ops.settings import Settings


def _batches(n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [(rng.integers(0, 30, (64, 3)), (rng.random((64, 4)) < 0.3).astype(np.float32)) for _ in range(n)]


def _model() -> AITM:
    torch.manual_seed(0)
    model = AITM(AITMConfig(vocab_sizes=[30, 30, 30], n_tasks=4))
    return model


def test_prefetcher_issues_the_next_copy_before_handing_out_the_current_batch() -> None:
    batches = _batches(5)
    pf = Prefetcher(DevicePath("cpu"), batches)
    seen = []
    for i, (ids, labels) in enumerate(pf):
        # the copy of batch i+1 was started before batch i reached the step (the overlap)
        assert pf.issued == min(i + 2, len(batches)) and pf.handed == i + 1
        seen.append((ids, labels))
    assert len(seen) == len(batches)
    for (ids, labels), (h_ids, h_labels) in zip(seen, batches, strict=True):  # same batches, same order
        assert torch.equal(ids, torch.as_tensor(h_ids)) and torch.equal(labels, torch.as_tensor(h_labels))
    assert list(Prefetcher(DevicePath("cpu"), [])) == []


def test_the_overlapped_loop_trains_to_the_same_weights_and_losses_as_the_plain_loop() -> None:
    batches = _batches(6)
    plain, overlapped = _model(), _model()
    opt_a, opt_b = make_optimizer(plain, lr=0.01), make_optimizer(overlapped, lr=0.01)
    torch.manual_seed(1)  # the same dropout masks in both loops
    losses_a = [float(train_step(plain, opt_a, torch.as_tensor(i), torch.as_tensor(y))) for i, y in batches]
    plain.eval()
    path = DevicePath("cpu")
    losses_b = []
    torch.manual_seed(1)
    for ids, y in Prefetcher(path, batches):
        overlapped.train()
        with path.autocast():
            loss = aitm_loss(overlapped(ids).float(), y)
        opt_b.zero_grad(set_to_none=True)
        path.backward_step(loss, opt_b)
        losses_b.append(float(loss.detach()))
    assert losses_a == losses_b
    for k, v in plain.state_dict().items():
        assert torch.equal(v, overlapped.state_dict()[k]), k


def test_cpu_keeps_pinning_and_amp_off_and_copies_nothing() -> None:
    for amp in ("off", "bf16", "fp16"):
        path = DevicePath("cpu", amp=amp)
        assert (path.amp, path.pin, path.scaler, path.copy_stream) == ("off", False, None, None)
    a = np.arange(6, dtype=np.int64).reshape(2, 3)
    t = DevicePath("cpu", pin=True).to_device(a)
    assert t.data_ptr() == a.ctypes.data  # wrapped, not copied
    with pytest.raises(ValueError, match="TRAINER_AMP"):
        DevicePath("cpu", amp="fp8")


def test_trainer_amp_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINER_AMP", "bf16")
    assert Settings().trainer_amp == "bf16"
    monkeypatch.setenv("TRAINER_AMP", "fp8")
    with pytest.raises(ValueError):
        Settings()


def test_bench_train_device_path_section_on_cpu() -> None:
    import argparse

    from bench.train import _device_path

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 30, (400, 3))
    labels = (rng.random((400, 4)) < 0.3).astype(np.float32)
    args = argparse.Namespace(seed=0, batch=50, steps=4, warmup=1, amp="bf16", amp_tolerance=0.02)
    out = _device_path(args, torch.device("cpu"), ids, labels, (30, 30, 30))
    assert set(out) >= {"host_plain_samples_per_s", "host_overlap_samples_per_s", "overlap_speedup",
                        "overlap_loss_max_abs_diff", "amp", "amp_samples_per_s", "amp_loss_max_rel_diff",
                        "amp_losses_within_tolerance", "amp_final_loss_rel_diff"}
    # on CPU: no pinning, AMP off, and the three loops compute the very same losses
    assert (out["pinned"], out["amp"]) == (False, "off")
    assert out["overlap_loss_max_abs_diff"] == 0.0 and out["amp_loss_max_rel_diff"] == 0.0
    assert out["amp_losses_within_tolerance"] is True
