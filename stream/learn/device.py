"""The trainer's device path: host batches to the accelerator without stalling it, and AMP.

On a GPU a copy from pageable memory is synchronous (the host waits for it) and serialises with
the step. Here batches are staged in pinned (page-locked) host memory and copied with
``non_blocking=True`` on a side CUDA stream, so the next batch's transfer runs while the current
step computes (``Prefetcher``); the step's stream waits for the copy by an event, not the host.
``TRAINER_AMP`` adds autocast (bf16, or fp16 with a ``GradScaler``). On CPU the same code runs with
pinning, the side stream and AMP off: tensors are wrapped without a copy, and ``Prefetcher`` keeps
its one-batch-ahead order, so the CPU tests exercise the overlap logic the GPU runs.

    path = DevicePath(torch.device("cuda"), amp="bf16")
    for ids, labels in Prefetcher(path, host_batches):   # batch i+1 copies during step i
        with path.autocast():
            loss = loss_fn(model(ids), labels)
        path.backward_step(loss, optimizer)
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import numpy as np
import torch

log = logging.getLogger(__name__)
AMP_MODES: Final = ("off", "bf16", "fp16")
_DTYPES: Final = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DevicePath:
    """Copies to ``device`` (pinned + non-blocking on CUDA) and the AMP context and step."""

    def __init__(self, device: torch.device | str, amp: str = "off", pin: bool | None = None) -> None:
        if amp not in AMP_MODES:
            raise ValueError(f"TRAINER_AMP must be one of {AMP_MODES}, got {amp!r}")
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if amp != "off" and not self.cuda:
            log.info("TRAINER_AMP=%s ignored on %s: autocast is for the GPU", amp, self.device)
            amp = "off"
        self.amp = amp
        self.pin = self.cuda if pin is None else pin and self.cuda  # pinning needs a CUDA runtime
        self.copy_stream: Any = torch.cuda.Stream(self.device) if self.cuda else None
        self.scaler: Any = torch.amp.GradScaler("cuda") if amp == "fp16" else None

    def to_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """One host array on the device: pinned and non-blocking on CUDA, no copy on CPU."""
        t = torch.as_tensor(array)
        if not self.cuda:
            return t if t.device == self.device else t.to(self.device)
        if self.pin and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Mixed precision for the forward pass and the loss (``TRAINER_AMP``), else nothing."""
        if self.amp == "off":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=_DTYPES[self.amp])

    def backward_step(self, loss: torch.Tensor, optimizer: Any, before_step: Any = None) -> None:
        """``loss.backward()`` then ``optimizer.step()``, through the fp16 gradient scaler when on;
        ``before_step()`` runs between them (the ranks' gradient all-reduce). fp16 needs a torch
        optimizer (the scaler unscales its param groups): the trainer's row-wise table optimizer
        (``aitm.lazy_adam.LazyAdam``) is not one, so the trainer refuses fp16 - bf16 needs no scaler."""
        if self.scaler is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise RuntimeError(
                "TRAINER_AMP=fp16 needs a gradient scaler over a torch optimizer, and the row-wise "
                "embedding optimizer (aitm.lazy_adam) is not one: use TRAINER_AMP=bf16 (no scaler needed)"
            )
        if self.scaler is None:
            loss.backward()
            if before_step is not None:
                before_step()
            optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if before_step is not None:
            before_step()
        self.scaler.step(optimizer)  # skips the step when a gradient overflowed, and lowers the scale
        self.scaler.update()


class Prefetcher:
    """Iterates ``batches`` (tuples of host arrays) as device tensors, the copy of batch i+1 issued
    before batch i is handed out - so it overlaps the caller's step on batch i."""

    def __init__(self, path: DevicePath, batches: Iterable[Sequence[np.ndarray | torch.Tensor]]) -> None:
        self.path = path
        self.batches = batches
        self.issued = 0  # copies started (tests: one ahead of the batches handed out)
        self.handed = 0

    def _start(self, host: Sequence[np.ndarray | torch.Tensor]) -> tuple[list[torch.Tensor], Any]:
        self.issued += 1
        path = self.path
        if path.copy_stream is None:
            return [path.to_device(a) for a in host], None
        with torch.cuda.stream(path.copy_stream):
            tensors = [path.to_device(a) for a in host]
            done = torch.cuda.Event()
            done.record(path.copy_stream)
        return tensors, done

    def _ready(self, staged: tuple[list[torch.Tensor], Any]) -> tuple[torch.Tensor, ...]:
        tensors, done = staged
        if done is not None:
            current = torch.cuda.current_stream(self.path.device)
            current.wait_event(done)  # the GPU waits for the copy, the host does not
            for t in tensors:
                t.record_stream(current)  # the allocator keeps the memory until the step used it
        self.handed += 1
        return tuple(tensors)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        it = iter(self.batches)
        first = next(it, None)
        if first is None:
            return
        staged = self._start(first)
        for host in it:
            nxt = self._start(host)  # issued before the caller steps on ``staged``
            yield self._ready(staged)
            staged = nxt
        yield self._ready(staged)
