"""The trainer's feed process on the embedded broker: chunks in order with offsets, refused
records with reasons, resume from offsets, and no orphan left when the trainer dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from kafka import KafkaProducer

from stream.contract.samples import Sample, encode_binary, encode_sample
from stream.learn.feed import Chunk, SampleFeed
from stream.ops.settings import Settings, kafka_client_config


def _sample(i: int, binary: bool = False) -> bytes:
    s = Sample(f"imp-{i}", "bank_1", i, {"a": str(i % 7)}, (0, 0, 0, 0), (False,) * 4,  # type: ignore[arg-type]
               "first", 1800_000, 0)
    return encode_binary(s) if binary else encode_sample(s)


def _produce(settings: Settings, values: list[bytes]) -> None:
    producer = KafkaProducer(enable_idempotence=False, **settings.kafka_python_config())
    for v in values:
        producer.send(settings.topic_samples, value=v, partition=0)
    producer.flush()
    producer.close()


def _drain(feed: SampleFeed, n: int, timeout_s: float = 30.0) -> list[Chunk]:
    chunks: list[Chunk] = []
    deadline = time.monotonic() + timeout_s
    while sum(len(c) for c in chunks) < n:
        assert time.monotonic() < deadline, f"only {sum(len(c) for c in chunks)} of {n} records arrived"
        chunk = feed.get(0.5)
        if chunk is not None:
            chunks.append(chunk)
    return chunks


def _read(settings: Settings, n: int, offsets: dict[int, int] | None = None, chunk_size: int = 32) -> tuple[list[Chunk], SampleFeed]:
    """``n`` records through a feed process started at ``offsets`` (closed after)."""
    feed = SampleFeed(partial(kafka_client_config, settings, "aiokafka"), settings.topic_samples, offsets or {},
                      chunk_size=chunk_size)
    feed.start_and_wait()
    try:
        return _drain(feed, n), feed
    finally:
        feed.close()


def test_feed_process_parses_in_order_and_resumes_from_offsets(make_settings: Callable[..., Settings]) -> None:
    settings = make_settings()
    values = [_sample(i) for i in range(120)]
    values[50] = b"{broken"
    _produce(settings, values)
    chunks, feed = _read(settings, 120, chunk_size=32)
    assert max(len(c) for c in chunks) <= 32
    ids = [i for c in chunks for i in c.samples.impression_ids]
    assert ids == [f"imp-{i}" for i in range(120) if i != 50]
    bad = [r for c in chunks for r in c.invalid]
    assert [(r.offset, r.reason, r.value) for r in bad] == [(50, "malformed_json", b"{broken")]
    assert chunks[-1].offsets[0] == 120
    assert feed.lag({0: 100}) == 20  # high watermarks came back with the chunks

    rest, _ = _read(settings, 20, {0: 100}, chunk_size=500)
    assert [i for c in rest for i in c.samples.impression_ids] == [f"imp-{i}" for i in range(100, 120)]


def test_feed_process_reads_json_and_binary_samples_mixed(make_settings: Callable[..., Settings]) -> None:
    """A joiner switching SAMPLES_ENCODING mid-stream: the trainer's feed reads both, in order."""
    settings = make_settings()
    values = [_sample(i, binary=(i // 25) % 2 == 1) for i in range(100)]  # runs of 25 of each
    values[30] = values[30][:-3]  # a truncated binary record
    _produce(settings, values)
    chunks, _ = _read(settings, 100, chunk_size=40)
    got = [c.samples.sample(i) for c in chunks for i in range(len(c.samples))]
    want = [Sample(f"imp-{i}", "bank_1", i, {"a": str(i % 7)}, (0, 0, 0, 0), (False,) * 4,  # type: ignore[arg-type]
                   "first", 1800_000, 0) for i in range(100) if i != 30]
    assert got == want
    assert [(r.offset, r.reason) for c in chunks for r in c.invalid] == [(30, "malformed_msgpack")]


def test_a_backlog_of_several_partitions_comes_out_merged_by_stream_time(
        make_settings: Callable[..., Settings]) -> None:
    """A trainer catching up met one partition's fetch after another (a time-shuffled stream, in
    a different order each run); the feed hands a backlog over in the joiner's watermark order,
    ties to the lower partition, each partition's own order kept."""
    settings = make_settings()
    producer = KafkaProducer(enable_idempotence=False, **settings.kafka_python_config())
    for p in (1, 0, 2):  # each partition's whole backlog before the next, as a joiner may leave it
        for i in range(250):
            s = Sample(f"p{p}-{i}", "bank_1", i, {"a": str(i % 7)}, (0, 0, 0, 0), (False,) * 4,  # type: ignore[arg-type]
                       "first", 0, 0, watermark_ms=1_000 * i + (10 * p if p < 2 else 0))
            producer.send(settings.topic_samples, value=encode_binary(s), partition=p)
    producer.flush()
    producer.close()
    chunks, _ = _read(settings, 750, chunk_size=32)
    assert max(len(c) for c in chunks) <= 32
    got = [i for c in chunks for i in c.samples.impression_ids]
    assert got == [f"p{p}-{i}" for i in range(250) for p in (0, 2, 1)]  # times 1000i, 1000i, 1000i + 10
    resumed = {p: o for c in chunks for p, o in c.offsets.items()}
    assert resumed == {0: 250, 1: 250, 2: 250}


CHILD = """
import sys, time
from functools import partial
from stream.learn.feed import SampleFeed
from stream.ops.settings import kafka_client_config, load_settings
if __name__ == "__main__":  # the feed process is spawned: it imports this file again
    s = load_settings(kafka_bootstrap_servers=sys.argv[1], topic_samples=sys.argv[2])
    feed = SampleFeed(partial(kafka_client_config, s, "aiokafka"), s.topic_samples, {}, chunk_size=10)
    feed.start_and_wait()
    print(feed.pid, flush=True)
    time.sleep(600)
"""


def test_the_feed_process_exits_when_the_trainer_is_killed(make_settings: Callable[..., Settings],
                                                           tmp_path: Path) -> None:
    settings = make_settings()
    script = tmp_path / "trainer_like.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), settings.bootstrap(), settings.topic_samples],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout is not None
    feed_pid = int(proc.stdout.readline())
    os.kill(feed_pid, signal.SIGTERM)  # as a process manager signals the whole group: the trainer decides
    time.sleep(0.5)
    assert _alive(feed_pid), "the feed died of a SIGTERM meant for its trainer"
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    deadline = time.monotonic() + 15
    while _alive(feed_pid):
        if time.monotonic() > deadline:
            os.kill(feed_pid, signal.SIGKILL)
            raise AssertionError("the feed process outlived its trainer")
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
