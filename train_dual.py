"""Train a dual-stream RGB+IR YOLO detector; re-run after any crash and it continues where it stopped.

    python train_dual.py                      # fresh run, or resume the unfinished one in RUNS_DIR
    python train_dual.py EPOCHS=3 IMGSZ=320   # override any constant below for this run
    torchrun --nnodes 2 ... train_dual.py     # on every node of a cluster (docs/multi-gpu.md)

What it finds in RUNS_DIR/weights/last.pt decides what happens (see README, "Re-run to resume").
"""

import ast
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
import yaml

import cleanup  # imports yolofuse first, which keeps Ultralytics offline
from yolofuse import YOLO, checkpoint, ddp, fuse, pretrained, sensors, settings
from yolofuse.checkpoint import CheckpointError
from yolofuse.data import DatasetError, check_dataset, read_config
from yolofuse.fuse import FuseError
from yolofuse.lock import RunLockedError
from yolofuse.settings import SettingsError, resolve  # relative path settings are taken from this folder

# ----------------------------------------------------------------------------------------------------------------------
# Settings: edit here, or override one run with NAME=value on the command line. Relative paths are from this folder.
DATA = "data_config.yaml"  # paired RGB+IR dataset config (its comments show how to point it at LLVIP)
MODEL = "yolov8n-fuse.yaml"  # fresh runs: an RGB+IR yaml, a stock yaml (yolo11s.yaml) or stock weights (yolo26n.pt)
FUSION = "mid"  # how a stock MODEL is made RGB+IR: "mid" (two backbones), "p3" (two up to stride 8) or "early"
WEIGHTS = None  # a fresh run starts from this Ultralytics detection checkpoint (e.g. "yolov8n.pt"); None: random
FUSION_INIT = "mean"  # from weights: the fusion starts as the "mean" of both streams, or as the "rgb" or "ir" one alone
RUNS_DIR = "runs/fuse"  # the live run trains here; finished runs are archived to RUNS_DIR/expN
EPOCHS = 100  # total epochs; raise it and re-run to extend an unfinished run
BATCH = 16  # images per batch
NBS = 64  # nominal batch: gradients accumulate over this many images per optimizer step (use BATCH for tiny sets)
IMGSZ = 640  # training and validation image size, pixels
DEVICE = None  # None: the GPU if there is one, else the CPU; or "cpu", "0", "0,1" (multi-GPU)
WORKERS = 8  # dataloader worker processes (Ultralytics uses 0 on the CPU)
SEED = 0  # random seed, for repeatable runs
PATIENCE = 100  # early stopping: epochs without improvement before stopping
CLOSE_MOSAIC = 10  # the last this many epochs train without mosaic augmentation
CACHE = False  # cache decoded image pairs: False, "ram" or "disk"
PLOTS = True  # draw label, batch (RGB | IR), curve and confusion plots into the run folder; False: seconds faster
MODALITY_DROPOUT = 0.0  # fraction of training samples with one sensor (RGB or IR, at random) blanked; 0.0: off
KEEP_LATEST = 3  # cleanup keeps this many newest experiments in RUNS_DIR...
MAP_WHITELIST = 0.8  # ...and every experiment whose best mAP50 is at least this
CLEANUP_EVERY = 10  # prune old experiments every this many epochs (and at once when the disk is nearly full)
TRASH_HOURS = 24.0  # pruned experiments wait in RUNS_DIR/.trash this long before they are deleted
MIN_FREE_GB = 5.0  # below this much free disk, the trash is emptied at once (only into ARCHIVE_DIR, when that is set)
ARCHIVE_DIR = None  # a folder (e.g. on a NAS): trash entries are packed there as .tar instead of deleted
BACKUP_DIR = None  # a folder: best.pt, results.csv, args.yaml of experiments kept for mAP or .keep are copied there
# ----------------------------------------------------------------------------------------------------------------------

SETTINGS = list(settings.CHECKS)  # the constants above, each with its check in yolofuse/settings.py
ROOT = Path(__file__).resolve().parent


def apply_overrides(args: list[str]) -> set[str]:
    """`NAME=value` arguments replace the constants above; values are Python literals or plain strings.
    Returns the names given (on resume they may change the run; see settings.resume_changes)."""
    for arg in args:
        name, sep, value = arg.partition("=")
        if not sep or name not in SETTINGS:
            sys.exit(f"error: unknown setting {arg!r}; use NAME=value with NAME one of: {', '.join(SETTINGS)}")
        try:
            globals()[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            globals()[name] = value
    return {arg.partition("=")[0] for arg in args}


def current_settings() -> dict:
    return {name: globals()[name] for name in SETTINGS}


def check_settings() -> None:
    """Every setting's type, range and allowed values, that DEVICE exists and that RUNS_DIR can hold the run; the
    first bad one stops the launch in one line. DEVICE becomes a string (DEVICE=0,1 arrives as the tuple (0, 1))."""
    globals().update(settings.check(current_settings()))
    if not ddp.FOLLOWER:  # under torchrun, rank 0 alone touches the run folder
        settings.check_run_folder(RUNS_DIR)


def pick_device():
    if DEVICE is not None:
        device = DEVICE
    elif torch.cuda.is_available():
        gpu = max(ddp.LOCAL_RANK, 0)  # under torchrun, each rank trains on the GPU of its local rank
        print(f"Training on the GPU: cuda:{gpu} ({torch.cuda.get_device_name(gpu)}).")
        return str(gpu)
    else:
        print("No CUDA GPU found: training on the CPU, which is much slower.")
        device = "cpu"
    if device == "cpu" and ddp.CPU_PROCESSES > 1:
        print(f"YOLOFUSE_CPU_DDP={ddp.CPU_PROCESSES}: the multi-GPU code path, on {ddp.CPU_PROCESSES} CPU processes.")
    return device


def compare_with_checkpoint(ckpt: dict, data: Path) -> tuple[list[str], list[str]]:
    """(notes, conflicts) between the checkpoint and the current MODEL / DATA.

    A changed architecture is a note: the run goes on with the checkpoint's. Other classes or channels are conflicts:
    the trained model cannot take them, so the launcher refuses rather than guess.
    """
    notes, conflicts = [], []
    trained = ckpt.get("ema") or ckpt.get("model")
    try:
        wanted = architecture().cfg
    except (OSError, yaml.YAMLError, FuseError, CheckpointError) as e:  # resuming needs only the checkpoint's own
        notes.append(f"MODEL {MODEL} can't be read ({type(e).__name__}); resuming with the checkpoint's architecture")
        wanted = {k: trained.yaml.get(k) for k in ("backbone", "head")}
    if any(trained.yaml.get(k) != wanted.get(k) for k in ("backbone", "head")):
        notes.append(f"MODEL {MODEL} differs from the checkpoint's architecture; resuming with the checkpoint's")
    config = read_config(data)
    names = config.get("names")
    names = list(names.values()) if isinstance(names, dict) else names
    trained_names = list(trained.names.values())
    if names != trained_names:
        conflicts.append(f"classes {names} in {data.name} differ from the checkpoint's {trained_names}")
    channels, trained_channels = config.get("channels"), trained.yaml.get("channels")
    if channels != trained_channels:
        conflicts.append(f"channels: {channels} in {data.name} differ from the checkpoint's {trained_channels}")
    trained_on = ckpt.get("train_args", {}).get("data")
    if trained_on != str(data):
        notes.append(f"DATA is now {data} (the checkpoint trained on {trained_on}); same classes and channels")
    return notes, conflicts


def architecture() -> fuse.Architecture:
    """The RGB+IR model MODEL and FUSION describe, and the weights a fresh run starts from (MODEL=*.pt or WEIGHTS)."""
    return fuse.resolve(resolve(MODEL), FUSION, resolve(WEIGHTS) if WEIGHTS else None)


def main() -> int:
    given = apply_overrides(sys.argv[1:])
    os.chdir(ROOT)  # the data config's relative dataset path, like every path here, is taken from this folder
    ddp.check_torchrun(DEVICE)  # torchrun gives each rank its device: this comes before "no such GPU here"
    check_settings()  # before the run folder is locked, created or touched
    cleanup.log.addHandler(logging.StreamHandler(sys.stdout))  # each pruning decision, one line
    cleanup.log.setLevel(logging.INFO)
    runs_dir, data = resolve(RUNS_DIR), resolve(DATA)
    archive_dir, backup_dir = (resolve(d) if d else None for d in (ARCHIVE_DIR, BACKUP_DIR))
    last = runs_dir / "weights" / "last.pt"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a pre-empted node stops like Ctrl+C
    if ddp.FOLLOWER:  # a torchrun rank other than 0: it trains as rank 0 decides below, and writes nothing
        return ddp.follow(runs_dir, DEVICE)
    with ddp.lead(runs_dir, DEVICE):  # the run lock; under torchrun the other ranks wait for what is decided here
        if checkpoint.archive_pending(runs_dir):  # a previous launch died while archiving: finish that first
            target = checkpoint.archive_run(runs_dir, archive_dir, backup_dir)
            print(f"Finished archiving the previous run into {target}.")
        found = checkpoint.probe(last, EPOCHS)
        print(found.message)
        # Decide everything before changing anything: a refusal below leaves the run folder as it was.
        check_dataset(data)
        if found.state == "unfinished":
            notes, conflicts = compare_with_checkpoint(found.ckpt, data)
            if conflicts:
                fix = f"restore DATA, or start a new experiment by moving {runs_dir / 'weights'} away"
                raise CheckpointError(f"{found.checkpoint}: {conflicts[0]}; {fix}")
            run_args = {sensors.DROPOUT_ARG: 0.0, **found.ckpt.get("train_args", {})}  # older runs: no dropout
            changes, lines = settings.resume_changes(current_settings(), given, run_args)
            for note in notes + lines:
                print(f"  {note}")
            if WEIGHTS:
                print(f"  WEIGHTS={WEIGHTS} ignored: a resumed run goes on from its own checkpoint's weights")
        else:
            fresh = architecture()
            for note in fresh.notes:
                print(f"  {note}")
            if fresh.weights:  # refuses, in one line, a checkpoint that does not fit the model
                pretrained.check(fresh.weights, fresh.cfg)
            elif FUSION_INIT != "mean":
                print(f"  FUSION_INIT={FUSION_INIT} ignored: there are no weights to start from")
        if found.state in ("finished", "corrupt"):
            print(f"Archived the previous run as {checkpoint.archive_run(runs_dir, archive_dir, backup_dir)}.")
        elif found.state == "unfinished" and found.checkpoint != last:
            checkpoint.restore_previous(last)
        pruning = cleanup.make_callback(
            runs_dir, KEEP_LATEST, MAP_WHITELIST, CLEANUP_EVERY, MIN_FREE_GB, TRASH_HOURS, archive_dir, backup_dir
        )
        pruning.start_pass()  # before training too; what outlasts its time budget goes on in the background
        args = dict(data=str(data), epochs=EPOCHS, device=pick_device(), workers=WORKERS, save_dir=str(runs_dir))
        if found.state == "unfinished":
            model = YOLO(str(last))  # after restore_previous: last.pt is the checkpoint resumed from
            args.update(resume=str(last), **changes)
        else:  # the model's yaml is written into the run folder and built from there (a resume: from last.pt)
            model = YOLO(str(fuse.write(fresh, runs_dir)))
            if fresh.weights:
                print(pretrained.start_from(model, fresh.weights, data, FUSION_INIT))
            args.update(batch=BATCH, nbs=NBS, imgsz=IMGSZ, seed=SEED, patience=PATIENCE, cache=CACHE, plots=PLOTS)
            args.update(close_mosaic=CLOSE_MOSAIC, modality_dropout=MODALITY_DROPOUT, exist_ok=True)
        model.add_callback("on_fit_epoch_end", pruning)
        ddp.send(model, args)  # torchrun: the other ranks train this model with these settings
        model.train(**args)
        # After multi-GPU training only the workers validated; Ultralytics then loads best.pt here, with its metrics
        metrics = model.trainer.metrics or model.ckpt.get("train_metrics") or {}
        print(
            f"Done. best.pt: {model.trainer.best}  mAP50 {metrics.get('metrics/mAP50(B)', float('nan')):.3f}  "
            f"mAP50-95 {metrics.get('metrics/mAP50-95(B)', float('nan')):.3f}"
        )
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(
            f"\nInterrupted: every completed epoch is saved in {resolve(RUNS_DIR) / 'weights' / 'last.pt'}. "
            f"Run {ddp.RERUN} again to resume.",
            file=sys.stderr,
        )
        sys.exit(130)
    except subprocess.CalledProcessError as e:  # multi-GPU: torch.distributed.run failed; the workers said why above
        sys.exit(
            f"error: multi-GPU training stopped (torch.distributed.run exit status {e.returncode}, cause above). "
            f"Every completed epoch is saved in {resolve(RUNS_DIR) / 'weights' / 'last.pt'}: "
            "run `python train_dual.py` again to resume."
        )
    except (SettingsError, DatasetError, CheckpointError, FuseError, RunLockedError, ddp.TorchrunError) as e:
        sys.exit(f"error: {e}")
    except Exception as e:  # torchrun: a collective broke because another rank is gone (killed, its node lost)
        if not (cause := ddp.lost_rank(e)):
            raise
        sys.exit(
            f"error: training stopped: another rank is gone ({cause}). Every completed epoch is saved in "
            f"{resolve(RUNS_DIR) / 'weights' / 'last.pt'}: run {ddp.RERUN} again to resume."
        )
