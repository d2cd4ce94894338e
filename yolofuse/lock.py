"""Exclusive OS locks on a file in a folder, which die with their process: one training per run folder
(`.train.lock`), one cleanup at a time per runs folder (`.cleanup.lock`)."""

import fcntl
import os
import time
from pathlib import Path

LOCK_NAME = ".train.lock"  # lives inside the run folder it guards
CLEANUP_LOCK_NAME = ".cleanup.lock"  # lives inside the runs folder that cleanup prunes
POLL_SECONDS = 0.05  # how often a waiting `acquire` tries again


class LockedError(RuntimeError):
    """Another live process holds the lock."""


class RunLockedError(LockedError):
    """Another live process is training in this run folder."""


class FolderLock:
    """Exclusive flock on `<folder>/<name>`; the file holds the owner's PID for the message only.

    The kernel drops the lock when the process dies (even by SIGKILL), so a stale file never blocks. The lock
    belongs to the open file, so two acquisitions in one process (two threads) exclude each other too.
    """

    def __init__(self, folder, name: str):
        self.path = Path(folder) / name
        self._fd = None

    def locked_error(self, owner: str) -> LockedError:
        return LockedError(f"{self.path} is held by PID {owner}")

    def acquire(self, wait: float = 0.0):
        """Take the lock, trying for up to `wait` seconds; raises `locked_error` when another process keeps it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                    os.close(fd)
                    raise self.locked_error(owner) from None
                time.sleep(POLL_SECONDS)
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


class RunLock(FolderLock):
    """The training lock of a run folder: `<run_dir>/.train.lock`."""

    def __init__(self, run_dir):
        super().__init__(run_dir, LOCK_NAME)

    def locked_error(self, owner: str) -> LockedError:
        return RunLockedError(
            f"{self.path.parent} is in use by another training (PID {owner}); wait for it or set another RUNS_DIR"
        )


class CleanupLock(FolderLock):
    """The lock of a runs folder whose experiments are being moved: `<runs_dir>/.cleanup.lock`, held by a cleanup
    pass, and by archiving and restoring, which pick an `expN` and fill it."""

    def __init__(self, runs_dir):
        super().__init__(runs_dir, CLEANUP_LOCK_NAME)


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
