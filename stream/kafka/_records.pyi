# Types of the compiled module (stream/kafka/_records.c).
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

def lean_records(batch: Iterable[Any], topic: str, partition: int, min_offset: int, cls: type) -> list[Any]: ...
def fetch_batches(
    records: Mapping[Any, Sequence[Any]], highwaters: Mapping[Any, int | None], first: int, size: int
) -> list[tuple[list[tuple[str, int, bytes | None, bytes | None, int, bool]], list[tuple[Any, int, int]]]]: ...
