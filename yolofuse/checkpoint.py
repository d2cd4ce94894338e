"""Checkpoints that survive a kill at any instant, the probe that tells what a run folder holds, and the run folder's
other files: results.csv as a resume finds it, and archiving a finished run into `expN`.

Files in `<run>/weights/`: `last.pt` (newest), `last.prev.pt` (the one before, kept until the next is whole),
`best.pt`. Every write goes to `<stem>.tmp<suffix>`, is fsynced, then renamed over the old file.

torch and Ultralytics are imported only where a checkpoint is read or written or training logs: tools that only move
run folders (cleanup.py) start without them.
"""

import fnmatch
import io
import os
import pickle
import re
import stat
import zipfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from yolofuse.lock import CleanupLock, LockedError

PREVIOUS_SUFFIX = ".prev.pt"
ARCHIVE_MARKER = ".archiving"  # names the expN a half-done archive is moving into
EXP_NAME = re.compile(r"exp(\d+)")  # an experiment is exactly `exp<N>`; a name that begins so carries N (exp5_best)
TRASH_NAME = ".trash"  # cleanup's trash in the runs folder: `exp3-<UTC time>` entries
MADE_AT_NAME = ".created"  # in an expN: when its run was made (ISO 8601, UTC), written when the run is archived
ARCHIVE_LOCK_WAIT_S = 60.0  # archiving waits this long for a cleanup of the runs folder to end, then refuses

# What a training run writes at the top of its folder (stock Ultralytics detection training, and this project): the
# names archiving moves into expN and an experiment's age is read from; nothing else there is the run's. Shell
# patterns, one a line. `weights` is a folder, the rest are files.
RUN_FILES = (
    "weights",  # last.pt, last.prev.pt, best.pt, epochN.pt (save_period), last.pt.corrupt
    "args.yaml",
    "model-*.yaml",  # the architecture the run trains (yolofuse.fuse.write)
    "results.csv",
    "sensors.csv",  # best.pt validated per sensor (yolofuse.sensors)
    "results.png",
    "labels.jpg",
    "train_batch*.jpg",
    "val_batch*_labels.jpg",
    "val_batch*_pred.jpg",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "Box*_curve.png",  # BoxPR, BoxF1, BoxP, BoxR
    "predictions.json",  # validation with save_json
    "events.out.tfevents.*",  # TensorBoard, when it is installed
)


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says which file and what to do."""


def error_line(e: BaseException) -> str:
    """`ErrorType: first line of its message` (80 characters at most), for a one-line message about `e`."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:80]}"


def previous_of(path: Path) -> Path:
    return path.with_name(path.stem + PREVIOUS_SUFFIX)


def staged(path: Path) -> Path:
    return path.with_name(path.stem + ".tmp" + path.suffix)  # keeps the suffix: Ultralytics loads only known ones


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def flush(*paths: Path) -> None:
    """Wait until the files' bytes are on the disk (fsync). Only the bytes not yet flushed cost time."""
    for path in paths:
        with open(path, "rb+") as f:
            os.fsync(f.fileno())


def commit(tmp: Path, path: Path, keep_previous: bool = False) -> None:
    """Make the finished file `tmp` durable and rename it over `path`.

    With `keep_previous`, the old `path` is first hard-linked as `<stem>.prev.pt`, so at every instant `path`
    exists whole (old or new) and the previous version survives until the new one is on disk.
    """
    flush(tmp)
    if keep_previous and path.exists():
        previous = previous_of(path)
        previous.unlink(missing_ok=True)
        os.link(path, previous)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_durably(path: Path, data: bytes) -> None:
    tmp = staged(path)
    tmp.write_bytes(data)
    commit(tmp, path)


def load(path: Path) -> dict:
    """The checkpoint dict, or CheckpointError naming the file when it is truncated or not a checkpoint."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated zip, pickling garbage, missing class...
        raise CheckpointError(f"{path} is corrupt ({error_line(e)})") from None
    if not isinstance(ckpt, dict) or ("ema" not in ckpt and "model" not in ckpt):
        raise CheckpointError(f"{path} is corrupt (not an Ultralytics checkpoint)")
    return ckpt


def add_member(path: Path, name: str, obj) -> None:
    """Append `obj` to the zip of the torch checkpoint at `path`, as the members under `<name>/`: each tensor's bytes
    as they lie in memory, one member per tensor, and the rest pickled as `<name>/data.pkl`.

    torch.save into one member would nest a second zip inside the first and copy and checksum every byte twice more
    (on the demo model, about 90 ms against 32 ms for the 54 MB). The checkpoint's own bytes stay as they are,
    nothing is read back, and torch.load ignores the extra members.
    """
    import torch

    tensors = []

    def tensor_apart(o):
        if not isinstance(o, torch.Tensor):
            return None
        tensors.append(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8))
        return len(tensors) - 1, o.dtype, tuple(o.shape)

    pickled = io.BytesIO()
    pickler = pickle.Pickler(pickled, pickle.HIGHEST_PROTOCOL)
    pickler.persistent_id = tensor_apart
    pickler.dump(obj)
    with zipfile.ZipFile(path, "a") as archive:
        folder = f"{archive.namelist()[0].split('/')[0]}/{name}"  # torch keeps every record under one folder
        for i, t in enumerate(tensors):
            with archive.open(f"{folder}/{i}", "w", force_zip64=True) as member:
                member.write(t.numpy())
        archive.writestr(f"{folder}/data.pkl", pickled.getvalue())


def read_member(path: Path, name: str):
    """What `add_member` stored as `name` in `path`, or None when it holds no such member."""
    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            members = {n.split("/", 1)[-1]: n for n in archive.namelist()}
            if f"{name}/data.pkl" not in members:
                return None

            def tensor_back(pid):
                i, dtype, shape = pid
                data = bytearray(archive.read(members[f"{name}/{i}"]))  # writable: torch shares it, no copy
                flat = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
                return flat.view(dtype).reshape(shape)

            unpickler = pickle.Unpickler(io.BytesIO(archive.read(members[f"{name}/data.pkl"])))
            unpickler.persistent_load = tensor_back
            return unpickler.load()
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({error_line(e)}) in its member {name}") from None


def target_epochs(ckpt: dict, epochs: int) -> int:
    """A run trains to the larger of its checkpoint's `epochs` and the requested ones (raising EPOCHS extends it)."""
    return max(epochs, ckpt.get("train_args", {}).get("epochs", 0))


def is_unfinished(ckpt: dict, epochs: int) -> bool:
    """Resumable: optimizer state kept (not stripped), and fewer epochs done than the target."""
    return ckpt.get("optimizer") is not None and 0 <= ckpt.get("epoch", -1) < target_epochs(ckpt, epochs) - 1


@dataclass
class Probe:
    state: str  # "absent", "unfinished", "finished" or "corrupt"
    message: str  # one line for the user
    checkpoint: Path | None = None  # the readable checkpoint to use (last.pt or its previous)
    ckpt: dict | None = None


def probe(last: Path, epochs: int) -> Probe:
    """Say what `last` (and its previous version) holds; a corrupt newest file falls back to the previous one."""
    previous = previous_of(last)
    if not last.exists() and not previous.exists():
        return Probe("absent", f"No checkpoint at {last}: starting a fresh run.")
    problems = []
    for path in (last, previous):
        if not path.exists():
            continue
        try:
            ckpt = load(path)
        except CheckpointError as e:
            problems.append(str(e))
            continue
        note = f"{'; '.join(problems)}; using the previous checkpoint {path.name}. " if problems else ""
        done = ckpt.get("epoch", -1) + 1
        if is_unfinished(ckpt, epochs):
            message = f"{note}Unfinished run at {path}: {done}/{target_epochs(ckpt, epochs)} epochs done, resuming."
            return Probe("unfinished", message, path, ckpt)
        return Probe("finished", f"{note}Finished run at {path}: archiving it, then starting a fresh run.", path, ckpt)
    return Probe("corrupt", f"{'; '.join(problems)}; no usable checkpoint: archiving the run, starting fresh.")


def restore_previous(last: Path) -> None:
    """Make `last.prev.pt` the live checkpoint again; the unreadable `last.pt` is kept aside as `last.pt.corrupt`."""
    if last.exists():
        os.replace(last, last.with_name(last.name + ".corrupt"))
    os.link(previous_of(last), last)
    _fsync_dir(last.parent)


# --- the run folder ----------------------------------------------------------------------------------------------


def run_files(folder: Path) -> list[Path]:
    """The run's own entries at the top of `folder` (RUN_FILES); the user's files beside them are not."""

    def is_run_file(path: Path) -> bool:
        kind = stat.S_ISDIR if path.name == "weights" else stat.S_ISREG  # lstat: a symlink is neither
        return any(fnmatch.fnmatchcase(path.name, p) for p in RUN_FILES) and kind(os.lstat(path).st_mode)

    return sorted(p for p in Path(folder).iterdir() if is_run_file(p))


def made_at(folder: Path) -> float | None:
    """When the run in `folder` was made (seconds since the epoch), or None when it holds no run.

    The time `.created` records (written when the run was archived), else the oldest mtime among the run's own files
    (RUN_FILES and the files in weights/): a time within the run's life, and runs in one folder follow each other.
    Nothing else in the folder counts, so adding, touching or removing a `.keep` or a notes file never changes it;
    neither does a copy that resets mtimes, once `.created` is there. The folder's own times change with any of that.
    """
    folder = Path(folder)
    try:
        return datetime.fromisoformat((folder / MADE_AT_NAME).read_text().strip()).timestamp()
    except (OSError, ValueError):
        pass  # none (made by another tool or an older launcher), or unreadable: the files tell
    own = run_files(folder)
    if folder / "weights" in own:
        own += (folder / "weights").iterdir()
    return min((os.lstat(p).st_mtime for p in own), default=None)


def next_experiment(runs_dir: Path, *elsewhere) -> Path:
    """`runs_dir/exp<N>` with N above every number still in use: any name that begins with `exp<N>` in `runs_dir`
    (exp5_best too) or its trash (`exp3-<time>`), and in the folders `elsewhere` (ARCHIVE_DIR's `exp3-<time>.tar`,
    BACKUP_DIR's `exp3`). A number is never reused while a trace of its experiment is left, so nothing made for
    the new experiment lands on the old one's (a backup copy, say). A folder that can't be read adds nothing."""
    numbers = [0]
    for folder in (runs_dir, runs_dir / TRASH_NAME, *elsewhere):
        try:
            numbers += [int(m[1]) for name in os.listdir(folder) if (m := EXP_NAME.match(name))]
        except OSError:
            pass  # absent, or not mounted
    return runs_dir / f"exp{max(numbers) + 1}"


def archive_pending(runs_dir: Path) -> Path | None:
    """The expN a half-done archive is moving into (the launch that started it died), or None."""
    marker = runs_dir / ARCHIVE_MARKER
    return runs_dir / marker.read_text().strip() if marker.exists() else None


def archive_run(
    runs_dir: Path, archive_dir=None, backup_dir=None, lock_wait: float = ARCHIVE_LOCK_WAIT_S
) -> Path | None:
    """Move the run at the top of `runs_dir` (its RUN_FILES, nothing else) into a new `expN` and record there when
    it was made; a crash half-way is finished by the next call. N skips the numbers left in `archive_dir` and
    `backup_dir` too (see `next_experiment`).

    The marker file names the target before anything moves, so a resumed archive goes on into the same folder. The
    runs folder's cleanup lock is held meanwhile, so that no cleanup prunes the expN being filled; when a cleanup
    keeps it longer than `lock_wait` seconds, CheckpointError says so and nothing has moved.
    """
    if not archive_pending(runs_dir) and not run_files(runs_dir):
        return None
    try:
        lock = CleanupLock(runs_dir).acquire(wait=lock_wait)
    except LockedError as e:
        raise CheckpointError(
            f"{runs_dir} is being cleaned up ({e}); the finished run is not archived yet: run again when that ends"
        ) from None
    try:
        target = archive_pending(runs_dir)
        if target is None:
            if not run_files(runs_dir):  # another launch archived it while this one waited
                return None
            target = next_experiment(runs_dir, *(d for d in (archive_dir, backup_dir) if d is not None))
            write_durably(runs_dir / ARCHIVE_MARKER, target.name.encode())
        target.mkdir(exist_ok=True)
        for item in run_files(runs_dir):
            os.replace(item, target / item.name)
        when = made_at(target)
        if when is not None and not (target / MADE_AT_NAME).exists():
            write_durably(target / MADE_AT_NAME, datetime.fromtimestamp(when, timezone.utc).isoformat().encode())
        _fsync_dir(runs_dir)
        (runs_dir / ARCHIVE_MARKER).unlink()
    finally:
        lock.release()
    return target


def trim_results(csv: Path, epochs_done: int) -> None:
    """Make results.csv hold whole, readable rows of the epochs the checkpoint holds, each ending in a newline, so the
    resumed run appends its next row on a line of its own. Rows of later epochs (written before a kill, redone on
    resume) go quietly. The last row without its newline (a crash cut it short) and rows that can't be read (bytes
    that are not UTF-8, NUL bytes, another number of fields than the header's: a row glued onto a cut one) go too,
    and one line says so. A file without a whole, readable header is kept aside as `results.csv.corrupt` (an empty
    one is removed), and Ultralytics writes a new one."""
    from ultralytics.utils import LOGGER  # training has it loaded; cleanup.py, which imports this module, does not

    if not csv.exists():
        return
    *lines, cut = csv.read_bytes().split(b"\n")  # `cut` is what follows the last newline: b"" when none is cut
    header = _readable(lines[0]) if lines else None
    if header is None:
        if lines or cut:
            os.replace(csv, csv.with_name(csv.name + ".corrupt"))
            LOGGER.warning(f"{csv} has no readable header: kept aside as {csv.name}.corrupt; a new one is started")
        else:
            csv.unlink()
            LOGGER.warning(f"{csv} was empty: removed, a new one is started")
        return
    kept, unreadable = [], 0
    for line in lines[1:]:
        row = _readable(line)
        epoch = _epoch_of(row) if row is not None and row.count(",") == header.count(",") else None
        if epoch is None:
            unreadable += 1
        elif epoch <= epochs_done:
            kept.append(row)
    if len(kept) == len(lines) - 1 and not cut:
        return
    write_durably(csv, "".join(f"{line}\n" for line in [header, *kept]).encode())
    dropped = ["1 row cut short"] if cut else []
    dropped += [f"{unreadable} unreadable row{'s' * (unreadable > 1)}"] if unreadable else []
    if dropped:
        LOGGER.warning(f"{csv}: dropped {' and '.join(dropped)}; resuming")


def _readable(line: bytes) -> str | None:
    """A line of results.csv as text, or None when a crash garbled it (not UTF-8, NUL bytes, or empty)."""
    try:
        text = line.decode()
    except UnicodeDecodeError:
        return None
    return text if text and "\0" not in text else None


def _epoch_of(row: str) -> float | None:
    try:
        return float(row.split(",", 1)[0])
    except ValueError:
        return None
