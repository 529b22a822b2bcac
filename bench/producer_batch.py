"""CPU per record of the joiner's ``BatchSender`` over aiokafka, by the producer's max batch size:
``python -m bench.producer_batch [--json FILE] [SIZE ...]``.

The joiner's output pattern on the embedded broker: 420-byte records alternating two topics of 4
partitions (samples and changelog), a flush every 2,500 records whose acks are awaited before
the next flush is submitted. Sizes are measured in turn, ``--rounds`` times, in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from stream.kafka.broker import EmbeddedBroker
from stream.kafka.partitioner import key_partition
from stream.kafka.sender import BatchSender, Sent

RECORDS = 50_000
FLUSH_EVERY = 2_500


async def cpu_us_per_record(bootstrap: str, max_batch: int, tag: str) -> float:
    """Produce ``RECORDS`` records through a ``BatchSender``; the process's CPU per record."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, max_batch_size=max_batch, max_request_size=max(1_048_576, max_batch), acks=-1
    )
    await producer.start()
    try:
        topics = (f"samples-{tag}", f"changelog-{tag}")
        sender = BatchSender(producer, lambda _t, key: key_partition(key, [0, 1, 2, 3]))
        rnd = random.Random(1)
        values = [rnd.randbytes(420) for _ in range(64)]
        for topic in topics:  # metadata first, outside the measurement
            sender.add(topic, b"warm", b"warm")
        for sent in await sender.flush():
            await sent.ack
        start = time.process_time()
        pending: list[Sent] = []
        for i in range(RECORDS):
            sender.add(topics[i & 1], b"s7-d0-%d" % (i >> 1), values[i & 63])
            if (i + 1) % FLUSH_EVERY == 0:
                for sent in pending:
                    await sent.ack
                pending = await sender.flush()
        pending += await sender.flush()
        for sent in pending:
            await sent.ack
        return (time.process_time() - start) / RECORDS * 1e6
    finally:
        await producer.stop()


async def measure(sizes: list[int], rounds: int) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {size: [] for size in sizes}
    with EmbeddedBroker() as broker:
        for r in range(rounds):
            for size in sizes:
                out[size].append(round(await cpu_us_per_record(broker.bootstrap, size, f"{size}-{r}"), 2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=[16_384, 65_536, 262_144])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    load = round(os.getloadavg()[0], 2)
    runs = asyncio.run(measure(args.sizes, args.rounds))
    result = {
        "cpu_us_per_record": {str(s): v for s, v in runs.items()},
        "mean_cpu_us_per_record": {str(s): round(sum(v) / len(v), 2) for s, v in runs.items()},
        "records": RECORDS,
        "load_1min_at_start": load,
    }
    text = json.dumps(result, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
