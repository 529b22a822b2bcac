"""``stream.kafka.faust_bulk``: the bulk fetch loop is installed as a subclass of faust's own consumer,
and it is refused - and this test fails - on any faust-streaming but the one its loop copies."""

from __future__ import annotations

import hashlib
import inspect

import faust
import pytest
from faust.transport.consumer import Consumer as BaseConsumer
from faust.transport.drivers.aiokafka import Consumer

from stream.kafka import faust_bulk
from stream.kafka.faust_bulk import FAUST_VERSION, bulk_consumer

# sha256 of the source of the faust internals the bulk loop copies or calls, in faust-streaming
# 0.15.3. A change in any of them means stream/kafka/faust_bulk.py must be re-checked against
# faust's new loop (then update the digests here).
FAUST_INTERNALS = {
    "_drain_messages": "44a2500309e83c630493f6828af50166ec8d96a0b3e4fb2bab735f704ae93417",
    "getmany": "4b168d84882a70d6e3e2f9804430a63b92f8fd117d3187cbb4aeb54305bda34e",
    "_wait_next_records": "6218e1969a636b3ff504ad1b8e7ad58a113572e43d746cc96d684ed5153032c6",
    "_to_message": "6a0ee0c2072f534ccadb9ff28a90f43b09484c5ec393ad0cac976c996e7704d3",
    "_add_gap": "4df2573ded7c1c2cde04dc6bde6d4480cb5875ef565256e56966b585ae39b1c1",
}


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


def test_the_installed_faust_is_the_one_the_bulk_loop_copies() -> None:
    """Fails loudly on another faust-streaming: its version, or the source of the internals the
    loop copies, differ from what faust_bulk.py was written against."""
    assert faust.__version__ == FAUST_VERSION, (
        f"faust-streaming {faust.__version__} installed; stream/kafka/faust_bulk.py copies {FAUST_VERSION}'s loop"
    )
    changed = [
        name for name, digest in FAUST_INTERNALS.items()
        if hashlib.sha256(inspect.getsource(getattr(BaseConsumer, name)).encode()).hexdigest() != digest
    ]  # fmt: skip
    assert not changed, f"faust's {changed} changed: re-check stream/kafka/faust_bulk.py against them"


def test_bulk_consumer_refuses_another_faust_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(faust_bulk.faust, "__version__", "0.16.0")
    with pytest.raises(TypeError, match=r"copies faust-streaming 0\.15\.3's consumer loop, and 0\.16\.0 is installed"):
        bulk_consumer(Consumer, ["impressions"], lambda message, behind: False, _flush)
