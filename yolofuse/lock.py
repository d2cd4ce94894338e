"""One training per run folder, enforced with an OS lock that dies with its process."""

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".train.lock"  # lives inside the run folder it guards


class RunLockedError(RuntimeError):
    """Another live process is training in this run folder."""


class RunLock:
    """Exclusive flock on `<run_dir>/.train.lock`; the file holds the owner's PID for the message only.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale file never blocks.
    """

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_NAME
        self._fd = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another training (PID {owner}); wait for it or set another RUNS_DIR"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def is_locked(run_dir) -> bool:
    """True when a live process holds the training lock of `run_dir` (a folder without a lock file is free)."""
    path = Path(run_dir) / LOCK_NAME
    if path.is_symlink() or not path.is_file():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also releases the probe's shared lock
