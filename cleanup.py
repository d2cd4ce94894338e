"""Prune old experiment folders in the runs folder: move them to a trash first, purge the trash later.

Importable (`prune`, `make_callback`) and a command line:

    python cleanup.py [RUNS_DIR] [--keep N] [--map X] [--dry-run] [--purge-trash]
"""

import argparse
import calendar
import logging
import math
import os
import re
import shutil
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from yolofuse.lock import is_locked

log = logging.getLogger("cleanup")

EXP_NAME = re.compile(r"exp\d+")  # the only folder names that may ever be pruned
TRASH_NAME = ".trash"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # UTC in the trash entry's name: its age survives copies and touches
MAP_COLUMN = "metrics/mAP50(B)"
GB = 1e9


@dataclass(frozen=True)
class Candidate:
    """An `exp<N>` folder and every fact `decide` needs about it."""

    path: Path
    number: int
    ctime: float
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
    bytes_freed: int = 0
    dry_run: bool = False

    def table(self) -> str:
        title = "cleanup (dry run, nothing changed)" if self.dry_run else "cleanup"
        rows = (("kept", self.kept), ("trashed", self.trashed), ("purged", self.purged))
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


def _ctime(path) -> float:
    """st_ctime of `path` itself; a function so tests can fake the order without sleeping."""
    return os.lstat(path).st_ctime


def _free_bytes(path) -> int:
    """Free space on the disk holding `path`; a function so tests can fake a full disk."""
    return shutil.disk_usage(path).free


def _is_real_dir(path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)  # lstat: a symlink to a folder is not a folder here
    except OSError:
        return False


def map50_from_csv(csv_path) -> tuple[float | None, str]:
    """Best mAP50 in an Ultralytics results.csv, tolerant of other versions and of a crash mid-write."""
    if not os.path.isfile(csv_path):
        return None, "results.csv missing"
    try:
        # usecols keeps the parse fast; strip() because old versions padded the header with spaces
        df = pd.read_csv(csv_path, usecols=lambda c: c.strip() == MAP_COLUMN, on_bad_lines="skip", engine="c")
    except Exception as e:  # pandas raises many kinds for a damaged file
        return None, f"results.csv unreadable ({type(e).__name__})"
    if df.shape[1] == 0:
        return None, f"results.csv has no {MAP_COLUMN} column"
    best = float(pd.to_numeric(df.iloc[:, 0], errors="coerce").max())  # max() skips the NaN of cut or junk lines
    if math.isnan(best):
        return None, "results.csv has no mAP50 number"
    return best, "results.csv"


def map50_from_checkpoint(pt_path) -> tuple[float | None, str]:
    """mAP50 stored by Ultralytics in a checkpoint's `train_metrics`."""
    if not os.path.isfile(pt_path):
        return None, "weights/best.pt missing"
    import torch  # only here: the CLI stays fast when every results.csv is fine

    try:
        import yolofuse  # noqa: F401  registers the custom layers that unpickling the model needs
    except ImportError:
        pass
    try:
        ckpt = torch.load(pt_path, map_location="cpu", weights_only=False)
        value = float(ckpt["train_metrics"][MAP_COLUMN])
    except Exception as e:  # a bad pickle can raise almost anything
        return None, f"weights/best.pt unreadable ({type(e).__name__})"
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


def read_candidate(path: Path) -> Candidate:
    map50, map_source = best_map50(path)
    return Candidate(
        path=path,
        number=int(path.name[3:]),
        ctime=_ctime(path),
        size=dir_size(path),
        map50=map50,
        map_source=map_source,
        has_keep=os.path.lexists(path / ".keep"),
        in_use=is_locked(path),
    )


def find_candidates(runs_dir) -> list[Candidate]:
    """Real `exp<N>` folders directly inside `runs_dir`; nothing else is ever pruned."""
    candidates = []
    with os.scandir(runs_dir) as entries:
        for entry in entries:
            if EXP_NAME.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False):
                try:
                    candidates.append(read_candidate(Path(entry.path)))
                except OSError as e:  # vanished, or its lock unreadable: what we can't judge, we leave alone
                    log.warning(f"{entry.path}  left alone: {e}")
    return candidates


def decide(candidates, keep_latest: int, map_whitelist: float) -> dict[Path, str]:
    """Reason for each candidate's fate; the first reason that applies wins, in the order written below."""
    if keep_latest < 0:
        raise ValueError(f"keep_latest must be >= 0, got {keep_latest}")
    # ties: larger N is newer; a kept-for-another-reason candidate still takes its place among the newest
    by_age = sorted(candidates, key=lambda c: (c.ctime, c.number), reverse=True)
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
        else:
            reasons[c.path] = "trashed"
    return reasons


def _stamp_of(name: str) -> float | None:
    """Seconds since the epoch from a `<name>-<UTC stamp>` trash entry name; None when not ours."""
    try:
        return calendar.timegm(time.strptime(name.rpartition("-")[2], STAMP_FORMAT))
    except ValueError:
        return None


def find_trash(trash_dir) -> list[TrashEntry]:
    """Entries of the trash we created (real folders with a stamp in the name); other things are left alone."""
    if not _is_real_dir(trash_dir):
        return []
    entries = []
    for path in Path(trash_dir).iterdir():
        stamp = _stamp_of(path.name)
        if stamp is None or not _is_real_dir(path):
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


def _log_decision(dry_run, path, size, reason, note=""):
    log.info(f"{'[dry run] ' if dry_run else ''}{path}  {human_size(size)}  {reason}{note}")


def _trash_note(c: Candidate, map_whitelist: float) -> str:
    if c.map50 is None:
        return f" (not whitelisted: {c.map_source})"
    return f" (mAP50={c.map50:.3g} < {map_whitelist:g}, from {c.map_source})"


def prune(
    runs_dir,
    keep_latest: int,
    map_whitelist: float,
    trash_hours: float,
    min_free_gb: float,
    dry_run: bool = False,
    purge_all: bool = False,
    now: float | None = None,
) -> Report:
    """Trash the `exp<N>` folders nobody needs, then purge trash entries older than `trash_hours` (all of them if
    `purge_all`), and more, oldest first, while the disk has less than `min_free_gb` free.
    A dry run reports the same and changes nothing."""
    runs_dir = Path(runs_dir)
    now = time.time() if now is None else now
    report = Report(dry_run=dry_run)
    trash_dir = runs_dir / TRASH_NAME
    if not runs_dir.is_dir():
        log.warning(f"{runs_dir}  is not a folder; nothing done")
        return report
    if os.path.lexists(trash_dir) and not _is_real_dir(trash_dir):
        # a symlinked trash could lead the purge outside the runs folder
        log.warning(f"{trash_dir}  is not a real folder; nothing done")
        return report

    trash = find_trash(trash_dir)
    candidates = find_candidates(runs_dir)
    reasons = decide(candidates, keep_latest, map_whitelist)
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

    free = free_before = _free_bytes(runs_dir)  # queried once then counted up, so a dry run computes the same
    for entry in sorted(trash, key=lambda e: e.stamp):  # oldest first
        why = why_purge(entry, now, trash_hours, free, min_free_gb, purge_all)
        if why is None:
            continue
        freed = entry.size if dry_run else _purge(entry)
        free += freed
        report.bytes_freed += freed
        if dry_run or not os.path.lexists(entry.path):
            report.purged.append((entry.path, entry.size, "purged"))
            _log_decision(dry_run, entry.path, entry.size, "purged", f" ({why})")
    if free_before < min_free_gb * GB:
        log.info(
            f"{'[dry run] ' if dry_run else ''}low disk: {human_size(free_before)} free < {min_free_gb:g} GB, "
            f"purged {human_size(report.bytes_freed)}, {human_size(free)} free now"
        )
    return report


@dataclass
class PruneCallback:
    """Ultralytics `on_fit_epoch_end` callback; a plain class so cloudpickle can ship it to DDP workers."""

    runs_dir: str
    keep_latest: int
    map_whitelist: float
    every: int
    min_free_gb: float
    trash_hours: float
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
                prune(self.runs_dir, self.keep_latest, self.map_whitelist, self.trash_hours, self.min_free_gb)
        except Exception as e:  # a failed cleanup must never cost a training
            log.warning(f"cleanup failed at epoch {getattr(trainer, 'epoch', '?')}, training goes on: {e!r}")


def make_callback(runs_dir, keep_latest, map_whitelist, every, min_free_gb, trash_hours) -> PruneCallback:
    """The `on_fit_epoch_end` callback train_dual.py registers: prune every `every` epochs or when the disk is low."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    return PruneCallback(str(runs_dir), keep_latest, map_whitelist, every, min_free_gb, trash_hours)


def _cli_defaults() -> dict:
    """train_dual.py's constants, so the command line prunes like training does."""
    import train_dual

    # a relative RUNS_DIR there means relative to train_dual.py's folder, not to the cwd
    return dict(
        runs_dir=train_dual.resolve(train_dual.RUNS_DIR),
        keep=train_dual.KEEP_LATEST,
        map=train_dual.MAP_WHITELIST,
        trash_hours=train_dual.TRASH_HOURS,
        min_free_gb=train_dual.MIN_FREE_GB,
    )


def main(argv=None) -> int:
    defaults = _cli_defaults()
    parser = argparse.ArgumentParser(description="Move old exp<N> runs to RUNS_DIR/.trash and purge old trash.")
    parser.add_argument(
        "runs_dir", nargs="?", type=Path, default=defaults["runs_dir"], metavar="RUNS_DIR", help="default: %(default)s"
    )
    parser.add_argument(
        "--keep", type=int, default=defaults["keep"], help="newest experiments kept (default %(default)s)"
    )
    parser.add_argument(
        "--map", type=float, default=defaults["map"], help="best mAP50 >= this is kept (default %(default)s)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would happen, change nothing")
    parser.add_argument("--purge-trash", action="store_true", help="also purge the whole trash now, whatever its age")
    args = parser.parse_args(argv)
    if args.keep < 0:
        parser.error("--keep must be >= 0")

    logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
    report = prune(
        args.runs_dir.absolute(),  # relative to the cwd; absolute so the log says where
        keep_latest=args.keep,
        map_whitelist=args.map,
        trash_hours=defaults["trash_hours"],
        min_free_gb=defaults["min_free_gb"],
        dry_run=args.dry_run,
        purge_all=args.purge_trash,
    )
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
