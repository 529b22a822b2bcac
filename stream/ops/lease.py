"""The single-writer lease of the model store: one active trainer, any number of standbys.

A trainer holds an exclusive ``flock`` on ``MODEL_STORE/.writer.lock`` for as long as it lives.
A second trainer started on the same store waits as a standby - before it reads a checkpoint or
joins Kafka - and takes over as soon as the first one dies: the kernel drops the lock of a dead
process (``kill -9`` included), and the standby resumes from the newest version in the store,
with that version's offsets, so version numbers never collide.

Why a lock on the store rather than a Kafka lease: the model store is what the writers race on
(file names are version numbers) and every trainer and scorer shares it anyway; a kernel lock
has no expiry to tune and no window in which a paused ex-holder still writes. It needs a
filesystem whose ``flock`` works between the trainers: a local disk or a Docker volume on one
host; on NFS, v4 with its locks. Why ``fcntl`` itself and not the ``filelock`` library: the lock
is one system call, and filelock 4 falls back to a "soft" lock (a file's existence) where flock
fails - a lock that survives ``kill -9`` and would keep the standby waiting forever.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)
LOCK_NAME = ".writer.lock"


class WriterLease:
    """An exclusive, process-lifetime lock on a model store directory."""

    def __init__(self, store_dir: Path, poll_s: float = 0.2) -> None:
        self.path = Path(store_dir) / LOCK_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.poll_s = poll_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lease if it is free right now (the file is never deleted: a new inode would
        let two holders in)."""
        if self._fd is not None:
            return True
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)  # who holds it, for operators and the standby's log line
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%FT%TZ', time.gmtime())}\n".encode())
        self._fd = fd
        return True

    def wait(self, stop: threading.Event | None = None) -> bool:
        """Block as a standby until the lease is ours (True) or ``stop`` is set (False)."""
        if self.try_acquire():
            return True
        log.info("standby: the writer lease %s is held by %s; waiting to take over", self.path, self.holder())
        stop = stop or threading.Event()
        while not stop.wait(self.poll_s):
            if self.try_acquire():
                log.info("took over the writer lease %s", self.path)
                return True
        return False

    def holder(self) -> str:
        """Who holds the lease, as the holder wrote it (advisory: the lock is what counts)."""
        try:
            return self.path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
