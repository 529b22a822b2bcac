# Types of the compiled module (stream/kafka/_records.c).
from collections.abc import Iterable, Mapping
from typing import Any

def lean_records(batch: Iterable[Any], topic: str, partition: int, min_offset: int, cls: type) -> list[Any]: ...
def bulk_chunk(
    pairs: list[tuple[Any, Any]], start: int, end: int, highwaters: Mapping[Any, int | None]
) -> tuple[list[tuple[str, int, bytes | None, bytes | None, int, bool]], list[tuple[Any, int, int]]]: ...
