"""The ``aitm-stream`` command line as a user meets it: version, help with defaults, and one clear
line with a non-zero exit code for bad flags, bad settings and an unreachable broker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib.metadata import version

import pytest

from stream.kafka.broker import free_port
from stream.ops.command import COMMANDS

CLI = [sys.executable, "-m", "stream.cli"]


def run(*args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP_SERVERS"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env={**base, **env})


def test_version_is_the_installed_distributions() -> None:
    r = run("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"aitm-stream {version('aitm-stream')}"


def test_top_level_help_lists_every_command_and_the_exit_codes() -> None:
    r = run("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"  {name} " in r.stdout, name
    assert "69 Kafka unreachable" in r.stdout and "78 bad settings" in r.stdout


@pytest.mark.parametrize("command", ["trainer", "scorer", "joiner", "simulate", "broker", "prometheus", "demo"])
def test_command_help_shows_defaults_not_the_developer_docstring(command: str) -> None:
    import importlib

    r = run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert COMMANDS[command][1] in r.stdout  # the user-facing summary
    doc = importlib.import_module(COMMANDS[command][0]).__doc__ or ""
    second_line = [line for line in doc.strip().splitlines()[1:] if line.strip()][:1]
    for line in second_line:
        assert line.strip() not in r.stdout, "the module docstring leaks into --help"
    assert "(default: " in r.stdout or "(default " in r.stdout


def test_options_without_a_help_text_still_show_their_default() -> None:
    flat = " ".join(run("demo", "--help").stdout.split())
    assert "--drift DRIFT (default: 0.03)" in flat
    assert "--impressions-per-day IMPRESSIONS_PER_DAY (default: 10000)" in flat
    flat = " ".join(run("simulate", "--help").stdout.split())
    assert "--seed SEED random seed of the simulated world (default: 0)" in flat


def one_error_line(r: subprocess.CompletedProcess[str], prog: str) -> str:
    lines = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert lines, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"aitm-stream {prog}: error: "), r.stderr
    return last


@pytest.mark.parametrize("command", ["trainer", "scorer", "joiner"])
def test_bad_loglevel_is_a_usage_error(command: str) -> None:
    r = run(command, "--loglevel", "loud")
    assert r.returncode == 2
    assert "invalid choice: 'loud'" in one_error_line(r, command)


def test_unknown_flag_and_unknown_command() -> None:
    r = run("trainer", "--no-such-flag")
    assert r.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in one_error_line(r, "trainer")
    r = run("trainr")
    assert r.returncode == 2 and "unknown command 'trainr'" in r.stderr


def test_bad_setting_names_the_variable_in_one_line() -> None:
    r = run("joiner", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", JOINER_POLICY="sometimes")
    assert r.returncode == 78, r.stderr
    line = one_error_line(r, "joiner")
    assert "bad settings: JOINER_POLICY='sometimes'" in line


def test_settings_that_do_not_fit_together_are_bad_settings() -> None:
    r = run("joiner", KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:1", KAFKA_SECURITY_PROTOCOL="SASL_SSL")
    assert r.returncode == 78, r.stderr
    assert "KAFKA_SASL_USERNAME" in one_error_line(r, "joiner")


def test_unreachable_broker_retries_with_backoff_then_one_line_and_69(tmp_path: object) -> None:
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = run("joiner", KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{port}", KAFKA_CONNECT_TIMEOUT_S="3",
            DATA_DIR=str(tmp_path), METRICS_PORT_JOINER=str(free_port()))  # fmt: skip
    took = time.monotonic() - t0
    assert r.returncode == 69, r.stderr
    line = one_error_line(r, "joiner")
    assert f"no Kafka broker reachable at 127.0.0.1:{port} after " in line and "KAFKA_BOOTSTRAP_SERVERS" in line
    attempts = int(line.split(" after ")[1].split()[0])
    assert attempts >= 2  # it retried ...
    assert r.stderr.count("is not reachable (attempt") == attempts - 1  # ... logging each backoff once
    assert took < 60  # ... and gave up within its bound


def test_health_probe(tmp_path: object) -> None:
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        ok = run("health", f"http://127.0.0.1:{server.server_address[1]}/")
        assert ok.returncode == 0, ok.stderr
    finally:
        server.shutdown()
    down = run("health", HEALTH_URL=f"http://127.0.0.1:{free_port()}/metrics")
    assert down.returncode == 1 and "unhealthy" in down.stderr


def test_loglevel_defaults_to_the_environments_log_level(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse

    from stream.ops.command import add_loglevel

    def default(env: str | None) -> str:
        if env is None:
            monkeypatch.delenv("LOG_LEVEL", raising=False)
        else:
            monkeypatch.setenv("LOG_LEVEL", env)
        p = argparse.ArgumentParser()
        add_loglevel(p, "warning")
        return str(p.parse_args([]).loglevel)

    assert default(None) == "warning"
    assert default("INFO") == "info"
    assert default("loud") == "warning"  # not a level: the command's own default
    monkeypatch.setenv("LOG_LEVEL", "info")
    p = argparse.ArgumentParser()
    add_loglevel(p, "warning")
    assert p.parse_args(["--loglevel", "error"]).loglevel == "error"  # the flag still wins
