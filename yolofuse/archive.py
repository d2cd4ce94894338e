"""File mechanics for cleanup.py: pack a folder into a verified archive, copy a file only when its content differs,
unpack an archive safely into a new folder.

Kept apart from cleanup.py's policy (what to archive or back up, and when) so that each reads on its own. Standard
library only, plus checkpoint's temp-name-then-rename writes (`staged`, `commit`), which need no torch: `python
cleanup.py` starts without loading torch or Ultralytics.
"""

import functools
import hashlib
import os
import shutil
import stat
import tarfile
from pathlib import Path

from yolofuse.checkpoint import commit, error_line, next_experiment, staged
from yolofuse.lock import CleanupLock, LockedError

ARCHIVE_SUFFIX = ".tar"  # not .tar.gz: gzip saves ~11% on .pt files at a small fraction of the speed (bench_cleanup)


def is_real_dir(path) -> bool:
    """A folder, not a symlink to one: neither cleanup nor restore follows a link out of the folder it was given."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # lstat: a symlink to a folder is not a folder here
    except OSError:
        return False


def _create(path):
    """Open a new file for writing; a function so tests can fake a disk that fills up part-way."""
    return open(path, "wb")


# --- archive ----------------------------------------------------------------------------------------------------


class ArchiveError(RuntimeError):
    """An archive does not hold its folder whole."""


def folder_listing(folder: Path) -> dict[str, tuple]:
    """{path relative to `folder`: (kind, size or link target)} of everything under it, symlinks not followed."""
    listing = {}
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in dirs + files:
            path = os.path.join(root, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                kind = ("link", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                kind = ("dir", 0)
            elif stat.S_ISREG(st.st_mode):
                kind = ("file", st.st_size)
            else:
                kind = ("other", 0)  # fifo, socket, device: an archive that drops one does not match
            listing[os.path.relpath(path, folder)] = kind
    return listing


def archive_listing(members: list, top: str) -> dict[str, tuple]:
    """The same listing as `folder_listing`, from the members of an archive of the folder `top`."""
    file_sizes = {m.name: m.size for m in members if m.isreg()}
    listing = {}
    for m in members:
        if m.name == top:
            continue
        if m.issym():
            kind = ("link", m.linkname)
        elif m.isdir():
            kind = ("dir", 0)
        elif m.islnk():
            kind = ("file", file_sizes.get(m.linkname))  # a hard link: the size of the file it shares
        elif m.isreg():
            kind = ("file", m.size)
        else:
            kind = ("other", 0)
        listing[m.name.removeprefix(top + "/")] = kind
    return listing


def check_archive(archive: Path, folder: Path, top: str) -> None:
    """Raise ArchiveError unless `archive` opens, holds every member's data in full (tarfile checks that while
    listing), and lists every path under `folder` with its kind and size or link target."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ArchiveError(f"does not open ({error_line(e)})") from None
    stored, expected = archive_listing(members, top), folder_listing(folder)
    if stored != expected:
        differ = min(name for name in stored.keys() | expected.keys() if stored.get(name) != expected.get(name))
        raise ArchiveError(f"holds {len(stored)} entries, the folder {len(expected)}; first to differ: {differ}")


def write_archive(folder: Path, final: Path, top: str) -> None:
    """Pack `folder` as `top/...` into `final`: written to a temp name, checked against the folder, fsynced, renamed.
    On any failure (or a kill) `final` is never created; the temp file is removed, or overwritten by the retry."""
    tmp = staged(final)
    done = False
    try:
        with _create(tmp) as f, tarfile.open(fileobj=f, mode="w") as tar:
            tar.add(folder, arcname=top)  # never follows symlinks
        check_archive(tmp, folder, top)
        commit(tmp, final)  # fsync, rename, fsync the folder
        done = True
    finally:
        if not done:
            tmp.unlink(missing_ok=True)


# --- copy -------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _digest_of(path: str, size: int, mtime_ns: int, inode: int) -> str:
    """SHA-256 of a file, remembered by (path, size, mtime, inode): an unchanged file is read once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(path: Path) -> str:
    st = os.stat(path)
    return _digest_of(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


def same_content(a: Path, b: Path) -> bool:
    return b.is_file() and a.stat().st_size == b.stat().st_size and _digest(a) == _digest(b)


def durable_copy(source: Path, copy: Path) -> None:
    """Copy `source` to `copy` (creating its folder), so that `copy` is never half-written, even after a kill."""
    copy.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, staged(copy))
    commit(staged(copy), copy)  # fsync, rename over an older copy, fsync the folder


# --- restore ----------------------------------------------------------------------------------------------------


class RestoreError(RuntimeError):
    """An archive that can't be restored; the message names it and why."""


def _single_top(members) -> str | None:
    """The folder every member sits in (`exp3` of `exp3/...`), or None when members sit side by side."""
    tops = {m.name.split("/", 1)[0] for m in members}
    top = tops.pop() if len(tops) == 1 else None
    if top in (None, ".") or not all((m.name == top and m.isdir()) or m.name.startswith(top + "/") for m in members):
        return None
    return top


def _refusal(member: tarfile.TarInfo, target: Path) -> str | None:
    """Why `member` may not be unpacked into `target`, or None. tarfile's "data" filter refuses `..` and links
    that leave the target; it would unpack an absolute path inside the target, but such an archive is not ours."""
    if os.path.isabs(member.name):
        return "an absolute path"
    try:
        tarfile.data_filter(member, str(target))
    except tarfile.FilterError as e:
        return str(e)
    return None


def restore(archive, runs_dir, archive_dir=None, backup_dir=None, lock_wait: float = 0.0) -> Path:
    """Unpack `archive` (.tar or .tar.gz) into a new `expN` of `runs_dir` and return that folder; N skips the numbers
    left in `archive_dir` and `backup_dir` too (see `checkpoint.next_experiment`).

    Every member is checked before anything is written: an absolute path, a `..` that leaves the target, or a link
    pointing outside it refuses the whole archive. It is unpacked to a hidden folder first, then renamed, under the
    runs folder's cleanup lock (waiting up to `lock_wait` seconds for a cleanup to end, else refusing)."""
    archive, runs_dir = Path(archive), Path(runs_dir)
    if not is_real_dir(runs_dir):
        raise RestoreError(f"{runs_dir} is not a folder; create it or name another RUNS_DIR")
    try:
        tar = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise RestoreError(f"{archive} is not a readable tar archive ({error_line(e)})") from None
    unpack = runs_dir / f".restoring-{archive.name}"
    with tar:
        members = tar.getmembers()
        if not members:
            raise RestoreError(f"{archive} is empty; nothing restored")
        for m in members:
            why = _refusal(m, unpack)
            if why:
                raise RestoreError(
                    f"{archive}: member {m.name!r} refused ({why}); nothing restored. Unpack it by hand if you trust it"
                )
        shutil.rmtree(unpack, ignore_errors=True)  # left by a restore that was killed
        try:
            tar.extractall(unpack, filter="data")
            top = _single_top(members)
            try:
                lock = CleanupLock(runs_dir).acquire(wait=lock_wait)
            except LockedError as e:
                why = f"{runs_dir} is being cleaned up ({e})"
                raise RestoreError(f"{why}; nothing restored: run it again when that cleanup has ended") from None
            try:
                target = next_experiment(runs_dir, *(d for d in (archive_dir, backup_dir) if d is not None))
                if os.path.lexists(target):
                    raise RestoreError(f"{target} appeared meanwhile; run the restore again")
                os.rename(unpack / top if top else unpack, target)
            finally:
                lock.release()
        finally:
            shutil.rmtree(unpack, ignore_errors=True)
    return target
