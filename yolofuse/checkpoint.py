"""Checkpoints that survive a kill at any instant, and the probe that tells what a run folder holds.

Files in `<run>/weights/`: `last.pt` (newest), `last.prev.pt` (the one before, kept until the next is whole),
`best.pt`. Every write goes to `<stem>.tmp<suffix>`, is fsynced, then renamed over the old file.

torch is imported only where a checkpoint is read or written: tools that only move run folders (cleanup.py) start
without it.
"""

import io
import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

PREVIOUS_SUFFIX = ".prev.pt"
ARCHIVE_MARKER = ".archiving"  # names the expN a half-done archive is moving into
EXP_NAME = re.compile(r"exp(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint exists but cannot be used; the message says which file and what to do."""


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
        reason = (str(e).splitlines() or [""])[0][:80]
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {reason})") from None
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
        reason = (str(e).splitlines() or [""])[0][:80]
        raise CheckpointError(f"{path} is corrupt ({type(e).__name__}: {reason}) in its member {name}") from None


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


def run_files(runs_dir: Path) -> list[Path]:
    """What a training run writes at the top of its folder: `weights/` and the plain files (csv, yaml, plots)."""
    return sorted(
        p
        for p in runs_dir.iterdir()
        if not p.name.startswith(".") and ((p.is_file() and not p.is_symlink()) or p.name == "weights")
    )


def next_experiment(runs_dir: Path) -> Path:
    numbers = [int(m[1]) for p in runs_dir.iterdir() if (m := EXP_NAME.fullmatch(p.name)) and p.is_dir()]
    return runs_dir / f"exp{max(numbers, default=0) + 1}"


def archive_pending(runs_dir: Path) -> bool:
    return (runs_dir / ARCHIVE_MARKER).exists()


def archive_run(runs_dir: Path) -> Path | None:
    """Move the run at the top of `runs_dir` into the next `expN`; a crash half-way is finished by the next call.

    The marker file names the target before anything moves, so a resumed archive goes on into the same folder.
    """
    marker = runs_dir / ARCHIVE_MARKER
    if marker.exists():
        target = runs_dir / marker.read_text().strip()
    elif run_files(runs_dir):
        target = next_experiment(runs_dir)
        write_durably(marker, target.name.encode())
    else:
        return None
    target.mkdir(exist_ok=True)
    for item in run_files(runs_dir):
        os.replace(item, target / item.name)
    _fsync_dir(runs_dir)
    marker.unlink()
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
