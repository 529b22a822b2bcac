"""``stream.kafka.faust_bulk``: the bulk fetch loop is installed as a subclass of faust's own consumer."""

from __future__ import annotations

import pytest
from faust.transport.drivers.aiokafka import Consumer

from stream.kafka.faust_bulk import bulk_consumer


async def _flush() -> None:
    return None


def test_bulk_consumer_subclasses_faust_consumer_and_overrides_only_the_fetch_loop() -> None:
    cls = bulk_consumer(Consumer, ["impressions"], lambda message, behind: False, _flush)
    assert issubclass(cls, Consumer)
    overridden = {name for name, v in vars(cls).items() if callable(v) and not name.startswith("__")}
    assert overridden == {"_drain_messages"}


def test_bulk_consumer_refuses_a_consumer_without_the_internals_it_uses() -> None:
    class Other:
        pass

    with pytest.raises(TypeError, match="faust-streaming changed"):
        bulk_consumer(Other, ["impressions"], lambda message, behind: False, _flush)
