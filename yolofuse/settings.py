"""train_dual.py's settings: read from its source, resolved, and checked before the launcher changes anything.

- `read`: the constants at the top of train_dual.py, from its source text (cleanup.py uses them without importing
  the launcher, which would load torch and Ultralytics: seconds). This module imports neither at its top.
- `resolve`: a relative path setting is taken from the launcher's folder, not from the working directory.
- `check` and `check_run_folder`: every value's type, range and allowed values, that the device exists, and that the
  run folder can be written, each failure one line naming the setting, its value and what it may be.
- `resume_changes`: which settings may change when a run resumes, and what a change means.

A new constant in train_dual.py gets one line in CHECKS (a test insists), and one in ON_RESUME when it is a training
argument.
"""

import ast
import math
import os
import tempfile
from pathlib import Path

from yolofuse.fuse import FUSIONS  # yaml and the standard library only: this module stays free of torch

ROOT = Path(__file__).resolve().parents[1]  # the launcher's folder
LAUNCHER = ROOT / "train_dual.py"


class SettingsError(ValueError):
    """A setting that can't be used; the message is one line naming it, its value and what it may be."""


def resolve(path) -> Path | None:
    """A path setting of train_dual.py: a relative path is taken from the launcher's folder, not from the cwd."""
    return None if path is None else Path(path) if Path(path).is_absolute() else ROOT / path


def read(*names: str, source: Path | None = None) -> dict:
    """The constants `names` of train_dual.py (or of `source`), from its source; each must be a plain value."""
    source = source or LAUNCHER
    try:
        tree = ast.parse(source.read_text(), str(source))
    except SyntaxError as e:
        raise SettingsError(f"{source}:{e.lineno}: {e.msg}; fix that line") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            if name in names:
                try:
                    values[name] = ast.literal_eval(node.value)
                except (ValueError, TypeError):
                    raise SettingsError(
                        f"{source}:{node.lineno}: {name} = {ast.unparse(node.value)} is not a plain value; write the "
                        "value itself there (a number, a string, None, True or False), or pass it on the command line"
                    ) from None
    missing = [name for name in names if name not in values]
    if missing:
        raise SettingsError(f"{source} has no constant {missing[0]}; restore it there, or pass the option")
    return values


# ----------------------------------------------------------------------------------------------------------------------
# Value checks: each takes a value and returns it (normalized), or raises ValueError saying what the value may be.


def whole(low: int):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"must be a whole number >= {low}")
        return value

    return check


def number(low: float):
    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise ValueError(f"must be a number >= {low:g}")
        return value

    return check


def text(value):
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a path (text)")
    return value


def optional_text(value):
    return None if value is None else text(value)


def one_of(*allowed):
    def check(value):
        if not any(value == a and type(value) is type(a) for a in allowed):  # 0 is not False here
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}")
        return value

    return check


def fraction(value):
    """A number from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError("must be a number from 0.0 to 1.0")
    return float(value)


def batch(value):
    """Stock's batch: images per batch, -1 for the largest that fits the GPU, or a fraction of GPU memory to fill."""
    if isinstance(value, bool) or not (
        (isinstance(value, int) and (value >= 1 or value == -1)) or (isinstance(value, float) and 0 < value < 1)
    ):
        raise ValueError("must be a whole number >= 1, -1 (as large as fits the GPU) or a fraction of GPU memory 0..1")
    return value


def cache(value):
    """False, "ram" or "disk"; True is stock's word for "ram"."""
    return "ram" if one_of(False, True, "ram", "disk")(value) is True else value


def map_fraction(value):
    """An mAP50 threshold: a fraction from 0 to 1."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        hint = (
            f"; {value:g} looks like a percentage: use {value / 100:g}"
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 1 < value <= 100
            else ""
        )
        raise ValueError(f"mAP50 is a fraction from 0 to 1{hint}")
    return value


def device(value):
    """None (the GPU if there is one, else the CPU), "cpu", "mps", or CUDA GPU numbers: 0, "0,1", (0, 1)."""
    if value is None:
        return None
    wanted = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    wanted = wanted.replace(" ", "").lower()
    if wanted in ("cpu", "mps"):
        if wanted == "mps":
            import torch

            if not torch.backends.mps.is_available():
                raise ValueError("there is no Apple GPU (mps) here; use 'cpu', or None to pick")
        return wanted
    ids = wanted.split(",")
    if isinstance(value, bool) or not all(i.isdigit() for i in ids):
        raise ValueError("must be None (the GPU if there is one), 'cpu', or GPU numbers such as 0 or 0,1")
    if len(set(ids)) < len(ids):
        raise ValueError("names a GPU twice; give each GPU once, e.g. 0,1")
    import torch  # here, not at the top: cleanup.py reads settings without torch

    count = torch.cuda.device_count()
    absent = next((i for i in ids if int(i) >= count), None)
    if absent is not None:
        found = f"GPUs 0..{count - 1}" if count else "no CUDA GPU"
        raise ValueError(f"there is no GPU {absent} here ({found} found); use one that exists, 'cpu', or None to pick")
    return ",".join(ids)


CHECKS = {  # every constant of train_dual.py: what it may be
    "DATA": text,
    "MODEL": text,
    "FUSION": one_of(*FUSIONS),
    "WEIGHTS": optional_text,
    "FUSION_INIT": one_of("mean", "rgb", "ir"),  # pretrained.INITS
    "RUNS_DIR": text,  # and check_run_folder
    "EPOCHS": whole(1),
    "BATCH": batch,
    "NBS": whole(1),
    "IMGSZ": whole(32),
    "DEVICE": device,
    "WORKERS": whole(0),
    "SEED": whole(0),
    "PATIENCE": whole(0),
    "CLOSE_MOSAIC": whole(0),
    "CACHE": cache,
    "PLOTS": one_of(True, False),
    "MODALITY_DROPOUT": fraction,  # the fraction of training samples with one sensor blanked
    "KEEP_LATEST": whole(0),
    "MAP_WHITELIST": map_fraction,
    "CLEANUP_EVERY": whole(1),
    "TRASH_HOURS": number(0),
    "MIN_FREE_GB": number(0),
    "ARCHIVE_DIR": optional_text,
    "BACKUP_DIR": optional_text,
}


def check(values: dict) -> dict:
    """`values` ({name: value}) checked, normalized (DEVICE as a string, CACHE True as "ram"); SettingsError for the
    first bad one, naming it, its value and what it may be."""
    out = {}
    for name, value in values.items():
        try:
            out[name] = CHECKS[name](value)
        except ValueError as e:
            raise SettingsError(f"{name}={value!r}: {e}") from None
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The run folder


def writable(folder: Path) -> bool:
    """Whether files can be created in `folder`: asked of the OS, then tried (root passes the first question on a
    read-only mount, and a network filesystem may answer it wrongly)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError:
        return False
    return True


def check_run_folder(value: str) -> None:
    """RUNS_DIR (the setting) can hold the run: it is not the launcher's folder nor above it (the run's files, its
    archived experiments and the trash would mix with the repository), it is a folder or can be created, and it and
    its weights/ are writable."""
    runs_dir, name = resolve(value), f"RUNS_DIR={value!r}"
    real = runs_dir.resolve()
    if real == ROOT or real in ROOT.parents:
        raise SettingsError(
            f"{name} is {real}, which holds train_dual.py itself: the runs would mix with the repository; give them "
            "a folder of their own, e.g. RUNS_DIR=runs/fuse"
        )
    existing = next(p for p in (runs_dir, *runs_dir.parents) if os.path.lexists(p))
    if not existing.is_dir():
        where = "is a file" if existing == runs_dir else f"is inside {existing}, which is a file"
        raise SettingsError(f"{name} {where}, not a folder; set RUNS_DIR to a folder")
    for folder in (existing, runs_dir / "weights"):
        if folder.is_dir() and not writable(folder):
            raise SettingsError(f"{name}: {folder} is not writable; make it writable, or set RUNS_DIR elsewhere")


# ----------------------------------------------------------------------------------------------------------------------
# Resuming: what may change mid-run


# name: (Ultralytics argument, what a value on the command line does to a resumed run, and why)
ON_RESUME = {
    "BATCH": ("batch", "changes", "the batches differ from here on, so the run is no longer an exact replay"),
    "CACHE": ("cache", "changes", ""),
    "PLOTS": ("plots", "changes", ""),
    "PATIENCE": ("patience", "changes", ""),
    "CLOSE_MOSAIC": ("close_mosaic", "changes", ""),
    "MODALITY_DROPOUT": (
        "modality_dropout",
        "changes",
        "other samples are blanked, so the run is no longer an exact replay",
    ),
    "WORKERS": ("workers", "this machine", ""),
    "NBS": ("nbs", "fixed", "it sets how many images each optimizer step averages, which the run was tuned with"),
    "IMGSZ": ("imgsz", "fixed", "the model has learned at its size; lower BATCH instead to save memory"),
    "SEED": ("seed", "fixed", "the seed decides the run's data order and augmentation from its first epoch"),
}


def resume_changes(values: dict, given: set, run_args: dict, launcher: str = "train_dual.py") -> tuple[dict, list]:
    """(Ultralytics arguments to change, lines to print) when a run with `run_args` resumes under `values`.

    A setting given on the command line (`given`) that differs from the run's takes effect, or is refused when it
    can't change mid-run (SettingsError, one line). One edited in the launcher and differing from the run's is left
    as the run had it, with a line saying how to change it. DEVICE and WORKERS are this machine's: always as set now.
    EPOCHS may grow (extending the run: the trainer says so), not shrink.
    """
    if "EPOCHS" in given and values["EPOCHS"] < run_args.get("epochs", 0):
        raise SettingsError(
            f"EPOCHS={values['EPOCHS']}: this run trains to {run_args['epochs']} epochs, and a resumed run can be "
            f"extended, not shortened; give EPOCHS={run_args['epochs']} or more, or stop it with Ctrl+C when you like"
        )
    changes, lines = {}, []
    if "DEVICE" in given and values["DEVICE"] != run_args.get("device"):
        lines.append(f"DEVICE: the run trained on {run_args.get('device')!r}, now on {values['DEVICE']!r}")
    for name, (arg, rule, why) in ON_RESUME.items():
        value, was = values[name], run_args.get(arg)
        if value == was:
            continue
        if name in given and rule == "fixed":
            raise SettingsError(
                f"{name}={value!r}: this run has {arg} {was!r}, which can't change mid-run ({why}); leave {name} out "
                "to resume, or start a new experiment by moving RUNS_DIR/weights away"
            )
        if name in given:
            changes[arg] = value
            lines.append(f"{name}: {was!r} -> {value!r} from here on{f'; {why}' if why else ''}")
        elif rule != "this machine":
            tail = f"give {name}={value!r} on the command line to change it" if rule == "changes" else why
            lines.append(
                f"{name}={value!r} in {launcher} differs from the run's {was!r}: the run keeps {was!r} ({tail})"
            )
    return changes, lines
