"""Run the Procfile's processes as child process groups; stop them cleanly or kill them.

Used by the demo, the stream and chaos benchmarks and the end-to-end tests, so that every one of
them runs the very commands a user runs (``honcho start`` runs the same Procfile).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from stream import resources

PROCFILE = resources.path("Procfile")  # the top-level Procfile, packaged


def read_procfile(path: Path = PROCFILE) -> dict[str, list[str]]:
    """``name: command`` lines -> argv lists (``aitm-stream`` runs through this Python). Leading
    ``NAME=value`` words set the command's environment, as the shell that honcho runs them in
    does (the argv then starts with ``env``)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, cmd = line.partition(":")
        argv = shlex.split(cmd)
        assigns = []
        while argv and "=" in argv[0] and argv[0].partition("=")[0].isidentifier():
            assigns.append(argv.pop(0))
        if argv and argv[0] == "aitm-stream":
            argv = [sys.executable, "-m", "stream.cli", *argv[1:]]
        out[name.strip()] = ["env", *assigns, *argv] if assigns else argv
    return out


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    """Starts children in their own process groups, with one environment and per-child logs."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, Child] = {}
        self.restarts: dict[str, int] = {}

    def start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("ab") as fh:
            proc = subprocess.Popen(
                argv,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env, **(extra_env or {}), "PYTHONUNBUFFERED": "1"},
                cwd=None,  # the caller's directory (an installed package has no repository root)
                start_new_session=True,
            )
        if name in self.children:
            self.restarts[name] = self.restarts.get(name, 0) + 1
        child = Child(name, argv, proc, log)
        self.children[name] = child
        return child

    def alive(self, name: str) -> bool:
        child = self.children.get(name)
        return child is not None and child.proc.poll() is None

    def kill(self, name: str) -> None:
        """SIGKILL the child's whole process group (a crash, for chaos runs)."""
        child = self.children[name]
        if child.proc.poll() is None:
            _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()

    def stop(self, name: str, timeout_s: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        child = self.children.get(name)
        if child is None:
            return None
        if child.proc.poll() is None:
            _signal_group(child.proc, signal.SIGTERM)
            try:
                child.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                _signal_group(child.proc, signal.SIGKILL)
                child.proc.wait()
        # anything the child left in its group goes too
        _signal_group(child.proc, signal.SIGKILL)
        return child.proc.returncode

    def stop_all(self, order: list[str] | None = None, timeout_s: float = 20.0) -> dict[str, int | None]:
        names = order or list(reversed(self.children))
        return {name: self.stop(name, timeout_s) for name in names if name in self.children}

    def tail(self, name: str, lines: int = 20) -> str:
        child = self.children.get(name)
        if child is None or not child.log.exists():
            return ""
        return "\n".join(child.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all(timeout_s=10.0)


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def wait_http(url: str, timeout_s: float, alive: Callable[[], bool] | None = None) -> None:
    """Wait until ``url`` answers 200, or raise ``TimeoutError``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"the process behind {url} exited")
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout_s}s")


def scrape(url: str, timeout_s: float = 2.0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Read a /metrics endpoint: (sample name, sorted labels) -> value; {} if unreachable."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out
