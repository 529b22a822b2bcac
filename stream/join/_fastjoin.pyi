# Types of the compiled module (stream/join/_fastjoin.c).
from collections.abc import Callable
from typing import Any

from stream.join.funnel import Dues, Swept

class DueIndex:
    def set(self, key: bytes, dues: Dues | None) -> None: ...
    def pop_due(self, lane: int, until_ms: int) -> list[bytes]: ...
    def __len__(self) -> int: ...

SweptState = tuple[bool, Dues | None, list[tuple[int, int, bytes]]]

def sweep_states(
    keys: list[bytes],
    olds: list[bytes | None],
    prev: Swept,
    now: Swept,
    cfg: tuple[int, int, int, int, int, int, int, int, int],
    msgpack: bool,
    policy: str,
) -> list[SweptState | None]: ...

def parse_records(values: list[bytes | None], steps: list[int]) -> list[tuple[bytes, int, bytes | None] | None]: ...
def advance_step(
    ikey: bytes,
    old: bytes | None,
    raw: bytes,
    step: int,
    swept: Swept,
    partition_swept: Swept,
    cfg: tuple[int, int, int, int, int, int, int, int, int],
    msgpack: bool,
    policy: str,
) -> tuple[bool, bytes | None, Dues | None, list[tuple[int, int, bytes]], bool] | None: ...
def advance_impression(
    ikey: bytes,
    state: bytes,
    old: bytes | None,
    swept: Swept,
    partition_swept: Swept,
    cfg: tuple[int, int, int, int, int, int, int, int, int],
    msgpack: bool,
    policy: str,
) -> tuple[bytes, Dues, list[tuple[int, int, bytes]]] | None: ...
def murmur2(data: bytes) -> int: ...
def advance_groups(
    keys: list[bytes],
    olds: list[bytes | None],
    groups: list[list[tuple[int, Any, bytes, Swept, Any]]],
    partition_swept: Swept,
    cfg: tuple[int, int, int, int, int, int, int, int, int],
    msgpack: bool,
    policy: str,
    output: type[tuple[Any, ...]],
    topic: str,
    out: list[Any],
    delays: list[int] | None,
) -> tuple[
    list[tuple[bytes, bytes, Dues]],
    list[tuple[int, int, bytes | None, bool]],
    tuple[int, int, int],
    tuple[int, int, int, int, int],
]: ...
def sweep_out(
    keys: list[bytes],
    olds: list[bytes | None],
    prev: Swept,
    now: Swept,
    cfg: tuple[int, int, int, int, int, int, int, int, int],
    msgpack: bool,
    policy: str,
    output: type[tuple[Any, ...]],
    topic: str,
    out: list[Any],
    delays: list[int] | None,
) -> tuple[int, list[bytes], list[tuple[bytes, Dues]], list[int], tuple[int, int, int]]: ...
def gather(
    records: list[tuple[str, int, bytes | None, bytes | None, int | None, bool]],
    steps: list[int],
    pre: list[tuple[bytes, int, bytes | None] | None],
    events: list[Any],
    part: Callable[[int], Any],
    now: float,
    horizon: int | None,
    event_type: type,
) -> tuple[dict[int, dict[bytes, list[Any]]], dict[int, Any], tuple[int, int, int, int, int], list[tuple[int, int | None]]]: ...
def store_put_many(items: list[tuple[bytes, bytes, Dues | None]], outbox: dict[bytes, bytes | None], held: set[bytes],
                   index: Any) -> None: ...
def store_lookup(keys: list[bytes], held: set[bytes], layers: list[dict[bytes, bytes | None]]
                 ) -> tuple[list[bytes | None], list[int]]: ...
