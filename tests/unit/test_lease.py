"""The model store's writer lease: one holder; a standby takes over when the holder is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from stream.ops.lease import WriterLease

HOLD = "import sys, time; from stream.ops.lease import WriterLease; l = WriterLease(sys.argv[1]); assert l.try_acquire(); print('held', flush=True); time.sleep(600)"


def holder(store: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_waits_and_takes_over_after_kill_9(tmp_path: Path) -> None:
    first = holder(tmp_path)
    try:
        standby = WriterLease(tmp_path, poll_s=0.05)
        assert not standby.try_acquire()
        assert f"pid {first.pid} " in standby.holder()
        got = threading.Event()
        waiter = threading.Thread(target=lambda: standby.wait() and got.set(), daemon=True)
        waiter.start()
        assert not got.wait(1.0)  # still a standby while the holder lives
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        t0 = time.monotonic()
        assert got.wait(10), "the standby did not take over"
        assert time.monotonic() - t0 < 5
        assert standby.held and f"pid {os.getpid()} " in standby.holder()
        # now the first can't come back as a second writer
        again = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(600)", ""), str(tmp_path)],
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert again.returncode != 0 and "AssertionError" in again.stderr
        standby.release()
        assert not standby.held
    finally:
        if first.poll() is None:
            first.kill()


def test_wait_gives_up_when_stopped(tmp_path: Path) -> None:
    first = holder(tmp_path)
    try:
        stop = threading.Event()
        stop.set()
        assert WriterLease(tmp_path, poll_s=0.05).wait(stop) is False
    finally:
        first.kill()
        first.wait()


def test_release_lets_the_next_writer_in_at_once(tmp_path: Path) -> None:
    a, b = WriterLease(tmp_path), WriterLease(tmp_path)
    assert a.try_acquire() and not b.try_acquire()  # flock is per open file: even in one process
    a.release()
    assert b.try_acquire()
    b.release()
