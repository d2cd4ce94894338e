"""Prune old experiment folders in the runs folder: move them to a trash first; later purge them, or pack them
into an archive folder; copy the models worth keeping to a backup folder. Restore an archive to a free expN.

This file is the policy: what is pruned, archived or backed up, and when. The file mechanics live in
`yolofuse/archive.py`: packing a folder into a checked archive, copying a file only when its content differs,
unpacking an archive safely.

Importable (`prune`, `make_callback`; restoring is `yolofuse.archive.restore`) and a command line:

    python cleanup.py [RUNS_DIR] [--keep N] [--map X] [--older-than AGE] [--archive-to DIR] [--backup-to DIR]
                      [--dry-run] [--purge-trash]
    python cleanup.py --restore ARCHIVE [RUNS_DIR]
"""

import argparse
import ast
import calendar
import logging
import math
import os
import re
import shutil
import sys
import tarfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from yolofuse import checkpoint
from yolofuse.archive import (
    ARCHIVE_SUFFIX,
    ArchiveError,
    RestoreError,
    durable_copy,
    is_real_dir,
    restore,
    same_content,
    write_archive,
)
from yolofuse.checkpoint import EXP_NAME, TRASH_NAME, CheckpointError
from yolofuse.lock import CleanupLock, LockedError, is_locked

log = logging.getLogger("cleanup")

ROOT = Path(__file__).resolve().parent
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # UTC in the trash entry's name: its age survives copies and touches
MAP_COLUMN = "metrics/mAP50(B)"
GB = 1e9
BACKUP_FILES = ("weights/best.pt", "results.csv", "args.yaml")  # what a kept experiment's backup holds
CALLBACK_BUDGET_S = 1.0  # the most a cleanup pass holds up training; the rest goes on in a background thread
CLI_LOCK_WAIT_S = 10.0  # a command-line run waits this long for another cleanup (training's) before it skips
AGE_UNITS = {"h": 3600, "d": 86400, "w": 7 * 86400}  # for --older-than


@dataclass(frozen=True)
class Candidate:
    """An `exp<N>` folder and every fact `decide` needs about it."""

    path: Path
    number: int
    made_at: float  # when its run was made (checkpoint.made_at): what "newest" and "older than" go by
    size: int
    map50: float | None
    map_source: str  # where map50 came from, or why there is none
    has_keep: bool
    in_use: bool


@dataclass(frozen=True)
class TrashEntry:
    path: Path
    stamp: float  # seconds since the epoch, from the name
    size: int


@dataclass
class Report:
    """What a prune did (or, in a dry run, would do); each item is (path, size in bytes, reason)."""

    kept: list = field(default_factory=list)
    trashed: list = field(default_factory=list)
    purged: list = field(default_factory=list)
    archived: list = field(default_factory=list)
    backed_up: list = field(default_factory=list)  # one item per file copied
    bytes_freed: int = 0
    dry_run: bool = False
    skipped: bool = False  # another cleanup held the lock: nothing was looked at

    def table(self) -> str:
        title = "cleanup (dry run, nothing changed)" if self.dry_run else "cleanup"
        rows = (
            ("kept", self.kept),
            ("trashed", self.trashed),
            ("purged", self.purged),
            ("archived", self.archived),
            ("backed up", self.backed_up),
        )
        lines = [title, f"{'':<12}{'count':>7}{'size':>12}"]
        lines += [f"{name:<12}{len(items):>7}{human_size(sum(s for _, s, _ in items)):>12}" for name, items in rows]
        lines.append(f"{'space freed':<19}{human_size(self.bytes_freed):>12}")
        return "\n".join(lines)


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def dir_size(path) -> int:
    """Bytes of the files under `path`; symlinks count as themselves and are never followed."""
    total = 0
    for root, _, files in os.walk(path, followlinks=False):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # vanished while walking
    return total


def _free_bytes(path) -> int:
    """Free space on the disk holding `path`; a function so tests can fake a full disk."""
    return shutil.disk_usage(path).free


def map50_from_csv(csv_path) -> tuple[float | None, str]:
    """Best mAP50 in an Ultralytics results.csv, tolerant of other versions and of a crash mid-write."""
    if not os.path.isfile(csv_path):
        return None, "results.csv missing"
    try:
        # usecols keeps the parse fast; strip() because old versions padded the header with spaces
        df = pd.read_csv(
            csv_path, usecols=lambda c: c.strip() == MAP_COLUMN, on_bad_lines="skip", encoding_errors="replace"
        )
    except Exception as e:  # pandas raises many kinds for a damaged file
        return None, f"results.csv unreadable ({type(e).__name__})"
    if df.shape[1] == 0:
        return None, f"results.csv has no {MAP_COLUMN} column"
    best = float(pd.to_numeric(df.iloc[:, 0], errors="coerce").max())  # max() skips the NaN of cut or junk lines
    if math.isnan(best):
        return None, "results.csv has no mAP50 number"
    return best, "results.csv"


def map50_from_checkpoint(pt_path) -> tuple[float | None, str]:
    """mAP50 stored by Ultralytics in a checkpoint's `train_metrics`. Loading it (torch, only here: the CLI stays fast
    when every results.csv is fine) imports `yolofuse.nn` by its module path, which registers the fusion layer."""
    if not os.path.isfile(pt_path):
        return None, "weights/best.pt missing"
    try:
        ckpt = checkpoint.load(pt_path)
    except CheckpointError as e:
        return None, str(e)
    try:
        value = float((ckpt.get("train_metrics") or {})[MAP_COLUMN])
    except (KeyError, TypeError, ValueError):
        value = math.nan
    if math.isnan(value):
        return None, "weights/best.pt has no mAP50 number"
    return value, "weights/best.pt"


def best_map50(exp_dir) -> tuple[float | None, str]:
    """(best mAP50 or None, where it came from or why there is none): results.csv first, then weights/best.pt."""
    exp_dir = Path(exp_dir)
    value, csv_why = map50_from_csv(exp_dir / "results.csv")
    if value is not None:
        return value, csv_why
    value, pt_why = map50_from_checkpoint(exp_dir / "weights" / "best.pt")
    if value is not None:
        return value, f"{pt_why} ({csv_why})"
    return None, f"{csv_why}; {pt_why}"


def read_candidate(path: Path, made_at: float, archiving_into: Path | None) -> Candidate:
    map50, map_source = best_map50(path)
    return Candidate(
        path=path,
        number=int(path.name[3:]),
        made_at=made_at,
        size=dir_size(path),
        map50=map50,
        map_source=map_source,
        has_keep=os.path.lexists(path / ".keep"),
        in_use=is_locked(path) or path == archiving_into,  # a training there, or a launch to finish its archive
    )


def find_candidates(runs_dir) -> list[Candidate]:
    """Real `exp<N>` folders directly inside `runs_dir` that hold a run; nothing else is ever pruned."""
    candidates = []
    archiving_into = checkpoint.archive_pending(runs_dir)
    with os.scandir(runs_dir) as entries:
        for entry in entries:
            if EXP_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                path = Path(entry.path)
                try:
                    made_at = checkpoint.made_at(path)
                    if made_at is None:
                        log.info(f"{path}  left alone: no run in it (no results.csv, args.yaml or weights/)")
                        continue
                    candidates.append(read_candidate(path, made_at, archiving_into))
                except OSError as e:  # vanished, or its lock unreadable: what we can't judge, we leave alone
                    log.warning(f"{path}  left alone: {e}")
    return candidates


def is_worth_backing_up(c: Candidate, map_whitelist: float) -> bool:
    """Kept for its mAP or its .keep (whether or not it is also among the newest); a live run is not finished."""
    return not c.in_use and (c.has_keep or (c.map50 is not None and c.map50 >= map_whitelist))


def decide(
    candidates, keep_latest: int, map_whitelist: float, min_age: float | None = None, now: float = 0.0
) -> dict[Path, str]:
    """Reason for each candidate's fate; the first reason that applies wins, in the order written below.
    Age is the time the run was made; with `min_age` (seconds), experiments younger than that at `now` are kept too."""
    if keep_latest < 0:
        raise ValueError(f"keep_latest must be >= 0, got {keep_latest}")
    # ties: larger N is newer; a kept-for-another-reason candidate still takes its place among the newest
    by_age = sorted(candidates, key=lambda c: (c.made_at, c.number), reverse=True)
    newest = {c.path for c in by_age[:keep_latest]}
    reasons = {}
    for c in candidates:
        if c.in_use:
            reasons[c.path] = "kept: in use"
        elif c.has_keep:
            reasons[c.path] = "kept: .keep"
        elif c.path in newest:
            reasons[c.path] = "kept: newest"
        elif c.map50 is not None and c.map50 >= map_whitelist:
            reasons[c.path] = f"kept: whitelisted mAP50={c.map50:.3g}"
        elif min_age is not None and now - c.made_at < min_age:
            reasons[c.path] = f"kept: younger than {format_age(min_age)}"
        else:
            reasons[c.path] = "trashed"
    return reasons


def parse_age(text: str) -> float:
    """Seconds in an age like `14d`, `36h` or `2w`."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([hdw])", text.strip())
    if not match:
        raise ValueError(f"age {text!r} is not a number followed by h, d or w (e.g. 14d)")
    return float(match[1]) * AGE_UNITS[match[2]]


def format_age(seconds: float) -> str:
    return f"{seconds / 86400:g}d" if seconds % 3600 == 0 and seconds >= 86400 else f"{seconds / 3600:g}h"


def _stamp_of(name: str) -> float | None:
    """Seconds since the epoch from a `<name>-<UTC stamp>` trash entry name; None when not ours."""
    try:
        return calendar.timegm(time.strptime(name.rpartition("-")[2], STAMP_FORMAT))
    except ValueError:
        return None


def find_trash(trash_dir) -> list[TrashEntry]:
    """Entries of the trash we created (real folders with a stamp in the name); other things are left alone."""
    if not is_real_dir(trash_dir):
        return []
    entries = []
    for path in Path(trash_dir).iterdir():
        stamp = _stamp_of(path.name)
        if stamp is None or not is_real_dir(path):
            log.info(f"{path}  left alone: not a trash entry made by cleanup")
            continue
        entries.append(TrashEntry(path, stamp, dir_size(path)))
    return entries


def why_purge(entry: TrashEntry, now: float, trash_hours: float, free: int, min_free_gb: float, purge_all: bool):
    """Why a trash entry goes now (oldest entries are asked first), or None when it stays."""
    if purge_all:
        return "--purge-trash"
    if now - entry.stamp >= trash_hours * 3600:
        return f"in trash over {trash_hours:g} h"
    if free < min_free_gb * GB:
        return f"low disk: {human_size(free)} free < {min_free_gb:g} GB"
    return None


def _trash_path(path: Path, trash_dir: Path, now: float) -> Path:
    return trash_dir / f"{path.name}-{time.strftime(STAMP_FORMAT, time.gmtime(now))}"


def _move_to_trash(path: Path, target: Path) -> bool:
    try:
        target.parent.mkdir(exist_ok=True)
        os.rename(path, target)  # same filesystem: instant, and nothing is half-deleted if training dies meanwhile
    except OSError as e:
        log.warning(f"{path}  could not be trashed, kept: {e}")
        return False
    return True


def _purge(entry: TrashEntry) -> int:
    """rmtree one trash entry, logging and skipping what can't be removed; returns the bytes freed."""

    def report_error(func, path, exc_info):
        log.warning(f"{path}  could not be purged: {exc_info[1]}")

    shutil.rmtree(entry.path, onerror=report_error)  # rmtree unlinks symlinks, it never follows them
    return entry.size - (dir_size(entry.path) if os.path.lexists(entry.path) else 0)


# --- archive ----------------------------------------------------------------------------------------------------


def archive_path(entry: TrashEntry, archive_dir: Path) -> Path:
    """`ARCHIVE_DIR/exp3-<UTC stamp>.tar`: the trash entry's own name, so a retry after a kill finds its archive."""
    return Path(archive_dir) / (entry.path.name + ARCHIVE_SUFFIX)


def archive_entry(entry: TrashEntry, archive_dir: Path, dry_run: bool) -> Path | None:
    """Archive one trash entry (the caller then removes it): the archive's path, or None, logged in one line."""
    final = archive_path(entry, archive_dir)
    top = entry.path.name.rpartition("-")[0]  # exp3, as `tar -cf exp3.tar exp3` would name it
    try:
        if os.path.lexists(final):  # a run killed after the rename: the archive was checked before it got its name
            log.info(f"{entry.path}  already archived as {final}")
        elif not dry_run:
            free = _free_bytes(archive_dir)
            if free < entry.size:
                raise ArchiveError(f"{human_size(free)} free in {archive_dir}, it needs {human_size(entry.size)}")
            write_archive(entry.path, final, top)
    except (ArchiveError, OSError, tarfile.TarError) as e:
        log.warning(f"{entry.path}  not archived, kept in the trash: {e}")
        return None
    return final


# --- backup -----------------------------------------------------------------------------------------------------


def back_up(exp: Path, backup_dir: Path, dry_run: bool) -> list:
    """Copy `exp`'s BACKUP_FILES to `backup_dir/<exp name>/`, durably, skipping those already there with the same
    content; returns (copy, size, reason) for each file copied. Raises OSError when the backup folder fails."""
    copied = []
    for name in BACKUP_FILES:
        source, copy = exp / name, backup_dir / exp.name / name
        if not source.is_file() or source.is_symlink() or same_content(source, copy):
            continue
        if not dry_run:
            durable_copy(source, copy)
        copied.append((copy, source.stat().st_size, "backed up"))
    return copied


def back_up_kept(candidates, map_whitelist: float, backup_dir: Path, report: Report) -> None:
    """Back up every experiment kept for its mAP or its .keep; a failure is logged, never raised."""
    worth = [c for c in sorted(candidates, key=lambda c: c.number) if is_worth_backing_up(c, map_whitelist)]
    if worth and not is_real_dir(backup_dir):
        log.warning(f"{backup_dir}  is not a folder (not mounted?): no backups this time; create it or fix it")
        return
    for c in worth:
        try:
            copied = back_up(c.path, backup_dir, report.dry_run)
        except OSError as e:
            log.warning(f"{c.path}  backup to {backup_dir / c.path.name} failed, retried next cleanup: {e}")
            continue
        for copy, size, reason in copied:
            source = c.path / copy.relative_to(backup_dir / c.path.name)
            _log_decision(report.dry_run, source, size, reason, f" to {copy}")
        report.backed_up += copied


# --- prune ------------------------------------------------------------------------------------------------------


def _log_decision(dry_run, path, size, reason, note=""):
    log.info(f"{'[dry run] ' if dry_run else ''}{path}  {human_size(size)}  {reason}{note}")


def _trash_note(c: Candidate, map_whitelist: float) -> str:
    if c.map50 is None:
        return f" (not whitelisted: {c.map_source})"
    return f" (mAP50={c.map50:.3g} < {map_whitelist:g}, from {c.map_source})"


@contextmanager
def cleanup_lock(runs_dir: Path, wait: float):
    """Hold `runs_dir/.cleanup.lock` and yield True, or yield False (one log line) when another cleanup keeps it
    longer than `wait` seconds."""
    lock = CleanupLock(runs_dir)
    try:
        try:
            lock.acquire()
        except LockedError as e:
            if wait <= 0:
                raise
            log.info(f"another cleanup is running ({e}): waiting up to {wait:g} s")
            lock.acquire(wait=wait)
    except LockedError as e:
        log.info(f"cleanup skipped, another cleanup is running: {e}")
        yield False
        return
    except OSError as e:  # a read-only runs folder, say
        log.warning(f"cleanup skipped, its lock can't be taken: {e}")
        yield False
        return
    try:
        yield True
    finally:
        lock.release()


def prune(
    runs_dir,
    keep_latest: int,
    map_whitelist: float,
    trash_hours: float,
    min_free_gb: float,
    dry_run: bool = False,
    purge_all: bool = False,
    now: float | None = None,
    archive_dir=None,
    backup_dir=None,
    min_age: float | None = None,
    lock_wait: float = 0.0,
) -> Report:
    """Trash the `exp<N>` folders nobody needs and back up the kept ones worth it (with `backup_dir`); then purge
    trash entries older than `trash_hours` (all of them if `purge_all`), and more, oldest first, while the disk has
    less than `min_free_gb` free. With `archive_dir`, a trash entry is archived there instead of purged. `min_age`
    (seconds) spares younger experiments. A dry run reports the same and changes nothing.

    Holds `runs_dir/.cleanup.lock` throughout, so two cleanups never prune one folder at once: the second waits up
    to `lock_wait` seconds, then skips with a log line (a dry run changes nothing and takes no lock)."""
    runs_dir = Path(runs_dir)
    now = time.time() if now is None else now
    report = Report(dry_run=dry_run)
    trash_dir = runs_dir / TRASH_NAME
    if not runs_dir.is_dir():
        log.warning(f"{runs_dir}  is not a folder; nothing done")
        return report
    if os.path.lexists(trash_dir) and not is_real_dir(trash_dir):
        # a symlinked trash could lead the purge outside the runs folder
        log.warning(f"{trash_dir}  is not a real folder; nothing done")
        return report

    with nullcontext(True) if dry_run else cleanup_lock(runs_dir, lock_wait) as held:
        if not held:
            report.skipped = True
            return report
        trash = find_trash(trash_dir)
        candidates = find_candidates(runs_dir)
        reasons = decide(candidates, keep_latest, map_whitelist, min_age, now)
        _trash_unneeded(candidates, reasons, trash_dir, now, map_whitelist, trash, report)
        if backup_dir is not None:
            back_up_kept(candidates, map_whitelist, Path(backup_dir), report)
        _empty_trash(trash, runs_dir, now, trash_hours, min_free_gb, purge_all, archive_dir, report)
    return report


def _trash_unneeded(candidates, reasons, trash_dir, now, map_whitelist, trash, report) -> None:
    """Move the candidates decided "trashed" into the trash (adding them to `trash`); log every decision."""
    dry_run = report.dry_run
    for c in sorted(candidates, key=lambda c: c.number):
        reason = reasons[c.path]
        if reason == "trashed":
            target = _trash_path(c.path, trash_dir, now)
            if dry_run or _move_to_trash(c.path, target):
                report.trashed.append((c.path, c.size, reason))
                trash.append(TrashEntry(target, now, c.size))  # in a dry run: where it would be
                _log_decision(dry_run, c.path, c.size, reason, _trash_note(c, map_whitelist))
                continue
            reason = "kept: could not trash"
        report.kept.append((c.path, c.size, reason))
        _log_decision(dry_run, c.path, c.size, reason)


def _empty_trash(trash, runs_dir, now, trash_hours, min_free_gb, purge_all, archive_dir, report) -> None:
    """Purge (or archive, then remove) the trash entries that are due, oldest first.

    With `archive_dir`, an entry is never removed unarchived, not even when the disk is low: if the archive folder is
    unavailable (not mounted, full), the entry stays, and below `min_free_gb` one warning says how much is kept."""
    dry_run = report.dry_run
    archive_ok = archive_dir is None or is_real_dir(archive_dir)
    if not archive_ok:
        log.warning(f"{archive_dir}  is not a folder (not mounted?): nothing archived this time; create it or fix it")
    free = free_before = _free_bytes(runs_dir)  # queried once then counted up, so a dry run computes the same
    kept_unarchived = 0
    for entry in sorted(trash, key=lambda e: e.stamp):
        why = why_purge(entry, now, trash_hours, free, min_free_gb, purge_all)
        if why is None:
            continue
        if archive_dir is not None:
            archive = archive_entry(entry, Path(archive_dir), dry_run) if archive_ok else None
            if archive is None:
                kept_unarchived += entry.size  # logged; the entry stays in the trash
                continue
            done, what, note = report.archived, "archived", f" to {archive} ({why})"
        else:
            done, what, note = report.purged, "purged", f" ({why})"
        freed = entry.size if dry_run else _purge(entry)
        free += freed
        report.bytes_freed += freed
        if dry_run or not os.path.lexists(entry.path):
            done.append((entry.path, entry.size, what))
            _log_decision(dry_run, entry.path, entry.size, what, note)
    if free_before < min_free_gb * GB:
        low = (
            f"{'[dry run] ' if dry_run else ''}low disk: {human_size(free_before)} free < {min_free_gb:g} GB, "
            f"freed {human_size(report.bytes_freed)}, {human_size(free)} free now"
        )
        if kept_unarchived:
            log.warning(
                f"{low}; {human_size(kept_unarchived)} of trash kept because ARCHIVE_DIR {archive_dir} is unavailable "
                f"(see above): mount or fix it, or set ARCHIVE_DIR=None to have the trash deleted instead"
            )
        else:
            log.info(low)


# --- in training ------------------------------------------------------------------------------------------------


@dataclass
class PruneCallback:
    """Ultralytics `on_fit_epoch_end` callback; a plain class so cloudpickle can ship it to DDP workers.

    Each pass runs in a background thread and the callback waits for it at most `budget_s`: a slow or hung archive
    or backup folder never holds training up longer. A pass still running when the next one is due makes that one
    skip (the cleanup lock), with a log line."""

    runs_dir: str
    keep_latest: int
    map_whitelist: float
    every: int
    min_free_gb: float
    trash_hours: float
    archive_dir: str | None = None
    backup_dir: str | None = None
    budget_s: float = CALLBACK_BUDGET_S
    training_over: bool = False  # set on the loop's last epoch; final_eval then fires this callback once more

    def __call__(self, trainer):
        from ultralytics.utils import RANK  # imported here: training has it loaded, the CLI need not

        if RANK not in (-1, 0) or self.training_over:
            return
        if not log.hasHandlers():  # a DDP worker: train_dual.py set up this log in the launching process only
            log.addHandler(logging.StreamHandler(sys.stdout))
            log.setLevel(logging.INFO)
        try:
            # Ultralytics sets trainer.stop on the loop's last epoch, early stop or not
            self.training_over = bool(getattr(trainer, "stop", False)) or trainer.epoch + 1 >= trainer.epochs
            due = (trainer.epoch + 1) % self.every == 0  # epoch is 0-based
            if due or _free_bytes(self.runs_dir) < self.min_free_gb * GB:
                self.start_pass()
        except Exception as e:  # a failed cleanup must never cost a training
            log.warning(f"cleanup failed at epoch {getattr(trainer, 'epoch', '?')}, training goes on: {e!r}")

    def start_pass(self) -> None:
        """One cleanup pass, waited for at most `budget_s`; the rest finishes in the background."""
        worker = threading.Thread(target=self._pass, name="cleanup", daemon=True)
        worker.start()
        worker.join(self.budget_s)
        if worker.is_alive():
            log.info(f"cleanup still busy after {self.budget_s:g} s; it goes on in the background, training goes on")

    def _pass(self) -> None:
        try:
            prune(
                self.runs_dir,
                self.keep_latest,
                self.map_whitelist,
                self.trash_hours,
                self.min_free_gb,
                archive_dir=self.archive_dir,
                backup_dir=self.backup_dir,
            )
        except Exception as e:  # the thread has no caller to raise to
            log.warning(f"cleanup failed, training goes on: {e!r}")


def make_callback(
    runs_dir, keep_latest, map_whitelist, every, min_free_gb, trash_hours, archive_dir=None, backup_dir=None
) -> PruneCallback:
    """The `on_fit_epoch_end` callback train_dual.py registers: prune every `every` epochs or when the disk is low."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    folders = (str(d) if d is not None else None for d in (archive_dir, backup_dir))
    return PruneCallback(str(runs_dir), keep_latest, map_whitelist, every, min_free_gb, trash_hours, *folders)


# --- command line -----------------------------------------------------------------------------------------------


def resolve(path) -> Path | None:
    """A path setting of train_dual.py (also there): a relative path is taken from this folder, not from the cwd."""
    return None if path is None else Path(path) if Path(path).is_absolute() else ROOT / path


def train_dual_settings(*names: str, source: Path = ROOT / "train_dual.py") -> dict:
    """train_dual.py's constants, read from its source: importing it would load torch and Ultralytics (seconds)."""
    values = {}
    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in names:
                values[node.targets[0].id] = ast.literal_eval(node.value)
    missing = [name for name in names if name not in values]
    if missing:
        raise SystemExit(f"error: {source} has no constant {missing[0]}; restore it there, or pass the option")
    return values


def _cli_defaults() -> dict:
    """train_dual.py's constants, so the command line prunes like training does."""
    s = train_dual_settings(
        "RUNS_DIR", "KEEP_LATEST", "MAP_WHITELIST", "TRASH_HOURS", "MIN_FREE_GB", "ARCHIVE_DIR", "BACKUP_DIR"
    )

    return dict(
        runs_dir=resolve(s["RUNS_DIR"]),
        keep=s["KEEP_LATEST"],
        map=s["MAP_WHITELIST"],
        trash_hours=s["TRASH_HOURS"],
        min_free_gb=s["MIN_FREE_GB"],
        archive_to=resolve(s["ARCHIVE_DIR"]),
        backup_to=resolve(s["BACKUP_DIR"]),
    )


def main(argv=None) -> int:
    defaults = _cli_defaults()
    parser = argparse.ArgumentParser(
        description="Move old exp<N> runs to RUNS_DIR/.trash; purge or archive old trash; back up the kept models."
    )
    parser.add_argument(
        "runs_dir", nargs="?", type=Path, default=defaults["runs_dir"], metavar="RUNS_DIR", help="default: %(default)s"
    )
    parser.add_argument(
        "--keep", type=int, default=defaults["keep"], help="newest experiments kept (default %(default)s)"
    )
    parser.add_argument(
        "--map", type=float, default=defaults["map"], help="best mAP50 >= this is kept (default %(default)s)"
    )
    parser.add_argument(
        "--older-than", type=parse_age, metavar="AGE", help="only experiments older than AGE (14d, 36h, 2w) may go"
    )
    parser.add_argument(
        "--archive-to",
        type=Path,
        default=defaults["archive_to"],
        metavar="DIR",
        help="archive trash entries there instead of purging them (default: ARCHIVE_DIR, %(default)s)",
    )
    parser.add_argument(
        "--backup-to",
        type=Path,
        default=defaults["backup_to"],
        metavar="DIR",
        help="copy best.pt, results.csv, args.yaml of kept experiments there (default: BACKUP_DIR, %(default)s)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would happen, change nothing")
    parser.add_argument("--purge-trash", action="store_true", help="also empty the whole trash now, whatever its age")
    parser.add_argument("--restore", type=Path, metavar="ARCHIVE", help="unpack ARCHIVE to the next free RUNS_DIR/expN")
    args = parser.parse_args(argv)
    if args.keep < 0:
        parser.error("--keep must be >= 0")

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    runs_dir = args.runs_dir.absolute()  # relative to the cwd; absolute so the log says where
    if not runs_dir.is_dir():  # a cron job must notice a wrong or unmounted folder
        print(f"error: {runs_dir} is not a folder; name the runs folder (RUNS_DIR), or create it", file=sys.stderr)
        return 1
    if args.restore is not None:
        try:
            target = restore(args.restore, runs_dir, args.archive_to, args.backup_to, lock_wait=CLI_LOCK_WAIT_S)
        except (RestoreError, OSError, tarfile.TarError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(
            f"Restored {args.restore} to {target}. It keeps the age of its run, so cleanup may prune it again: "
            f"add {target / '.keep'} to keep it."
        )
        return 0
    report = prune(
        runs_dir,
        keep_latest=args.keep,
        map_whitelist=args.map,
        trash_hours=defaults["trash_hours"],
        min_free_gb=defaults["min_free_gb"],
        dry_run=args.dry_run,
        purge_all=args.purge_trash,
        archive_dir=args.archive_to,
        backup_dir=args.backup_to,
        min_age=args.older_than,
        lock_wait=CLI_LOCK_WAIT_S,
    )
    if not report.skipped:
        print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
