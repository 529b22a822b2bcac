"""File sink of a simulated stream (NDJSON events, truth, faults) and the progress display."""

from __future__ import annotations

import base64
import json
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

from simulators.faults import Record, SimulatedStream


def record_to_json(rec: Record, topic: str) -> dict[str, Any]:
    """One line of ``events.ndjson``; values that are not UTF-8 are base64 (``value_b64``)."""
    line: dict[str, Any] = {
        "topic": topic,
        "key": rec.key.decode(),
        "timestamp_ms": rec.timestamp_ms,
        "deliver_ms": rec.deliver_ms,
    }
    try:
        line["value"] = rec.value.decode("utf-8")
    except UnicodeDecodeError:
        line["value_b64"] = base64.b64encode(rec.value).decode()
    return line


def read_events_file(path: Path) -> Iterator[tuple[str, Record]]:
    """Read back ``events.ndjson`` as (topic, record) pairs."""
    with path.open() as fh:
        for line in fh:
            d = json.loads(line)
            value = d["value"].encode() if "value" in d else base64.b64decode(d["value_b64"])
            step = d.get("step", d["topic"])
            yield (
                d["topic"],
                Record(step, d["key"].encode(), value, d["timestamp_ms"], d["deliver_ms"]),
            )


def write_files(stream: SimulatedStream, out: Path, topics: dict[str, str]) -> dict[str, int]:
    """Write events.ndjson, truth.ndjson (each impression's world labels and the final the joiner
    must emit), faults.ndjson and dead_letters.ndjson (every record the joiner must dead-letter)
    under ``out``; returns counts per topic."""
    out.mkdir(parents=True, exist_ok=True)
    counts: Counter[str] = Counter()
    with (out / "events.ndjson").open("w") as fh:
        for rec in stream:
            topic = topics[rec.step]
            line = record_to_json(rec, topic)
            line["step"] = rec.step
            fh.write(json.dumps(line, separators=(",", ":")) + "\n")
            counts[topic] += 1
    with (out / "truth.ndjson").open("w") as fh:
        for row in stream.truth:
            fh.write(json.dumps(asdict(row), separators=(",", ":")) + "\n")
    with (out / "faults.ndjson").open("w") as fh:
        for fault in stream.faults:
            fh.write(json.dumps(asdict(fault), separators=(",", ":")) + "\n")
    with (out / "dead_letters.ndjson").open("w") as fh:
        for dead in stream.dead_letters:
            fh.write(json.dumps(asdict(dead), separators=(",", ":")) + "\n")
    return dict(counts)


class Progress:
    """A one-line progress display: simulated day, records sent, records/s."""

    def __init__(self, out: TextIO = sys.stderr, every_s: float = 1.0, epoch_ms: int = 0) -> None:
        self.out, self.every_s, self.epoch_ms = out, every_s, epoch_ms
        self.start = self._last = time.monotonic()
        self.tty = out.isatty()

    def update(self, sent: int, sim_ms: int, counts: Counter[str], force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.every_s:
            return
        self._last = now
        rate = sent / max(now - self.start, 1e-9)
        day = (sim_ms - self.epoch_ms) / 86_400_000
        per_topic = " ".join(f"{t}={n}" for t, n in sorted(counts.items()))
        line = f"sim day {day:6.2f} | {sent} records | {rate:,.0f}/s | {per_topic}"
        self.out.write(("\r" + line) if self.tty else line + "\n")
        self.out.flush()
