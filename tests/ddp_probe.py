"""Callbacks that watch a multi-GPU run from inside its DDP workers; tests/killer.py registers them (KILLER_DDP_PROBE).

Ultralytics cloudpickles a model's callbacks into the DDP workers, by reference: each worker imports this module
(tests/ is on the sys.path the workers get from the launching process). Imported in a worker (RANK set) with
KILLER_DDP_PROBE=<folder>, it records; in the launching process it does nothing.

Each rank R appends JSON lines to <folder>/rank<R>.jsonl:
    {"pid": p}                                   when the worker starts
    {"epoch": e, "write": path}                  each file the worker opens for writing, renames, links or removes,
                                                 from Python's audit events (e: the 0-based epoch, -1 before training)
    {"epoch": e, "prune": runs_dir}              each call of cleanup.prune
    {"start_epoch": s, "world_size": w,          after the trainer's setup, resume included
     "modality_dropout": d}
and saves its optimizer state after setup to <folder>/rank<R>.optimizer.pt.

KILLER_DDP_PAUSE=<rank>:<epoch>:<when>: on that rank, in that 0-based epoch, at <when>, write <folder>/paused (the
worker's PID), then wait for a signal; after 300 s it goes on. <when> is an Ultralytics callback (on_train_batch_end:
mid-epoch; on_fit_epoch_end: after the epoch is saved), or "start" with epoch -1: as the worker unpickles the
callbacks, before its trainer exists.
"""

import json
import os
import sys
import time
from pathlib import Path

FOLDER = os.environ.get("KILLER_DDP_PROBE")
RANK = int(os.environ.get("RANK", -1))
WRITE_EVENTS = {"os.rename", "os.link", "os.remove", "os.rmdir", "os.truncate", "shutil.rmtree", "os.symlink"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
epoch = -1
_log = None
_paused = False


def record(**entry) -> None:
    _log.write(json.dumps(entry) + "\n")


def _path(arg):
    return os.path.abspath(os.fsdecode(arg)) if isinstance(arg, (str, bytes, os.PathLike)) else None


def _audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writes and _path(path):
            record(epoch=epoch, write=_path(path))
    elif event in WRITE_EVENTS:
        for arg in args[:2] if event in ("os.rename", "os.link", "os.symlink") else args[:1]:
            if _path(arg):
                record(epoch=epoch, write=_path(arg))


def on_train_epoch_start(trainer) -> None:
    global epoch
    epoch = trainer.epoch


def on_pretrain_routine_end(trainer) -> None:
    if _log:
        import torch

        torch.save(trainer.optimizer.state_dict(), Path(FOLDER) / f"rank{RANK}.optimizer.pt")
        dropout = trainer.train_loader.dataset.modality_dropout
        record(start_epoch=trainer.start_epoch, world_size=trainer.world_size, modality_dropout=dropout)


def _pause_here(when: str) -> None:
    global _paused
    spec = os.environ.get("KILLER_DDP_PAUSE", "")
    if not (_log and spec) or _paused:
        return
    rank, at_epoch, at_when = spec.split(":")
    if (int(rank), int(at_epoch), at_when) == (RANK, epoch, when):
        _paused = True
        (Path(FOLDER) / "paused").write_text(str(os.getpid()))
        time.sleep(300)


def on_train_batch_end(trainer) -> None:
    _pause_here("on_train_batch_end")


def on_fit_epoch_end(trainer) -> None:
    _pause_here("on_fit_epoch_end")


CALLBACKS = [on_train_epoch_start, on_pretrain_routine_end, on_train_batch_end, on_fit_epoch_end]


def _watch_prune():
    import cleanup

    original = cleanup.prune

    def prune(runs_dir, *args, **kwargs):
        record(epoch=epoch, prune=_path(runs_dir))
        return original(runs_dir, *args, **kwargs)

    cleanup.prune = prune  # PruneCallback calls it by this module-level name


if FOLDER and RANK >= 0:
    _log = open(Path(FOLDER) / f"rank{RANK}.jsonl", "a", buffering=1)  # opened before the hook: not recorded
    record(pid=os.getpid())
    sys.addaudithook(_audit)
    _watch_prune()
    _pause_here("start")
