"""A run killed and re-run ends bit-identical to the uninterrupted run (CPU), with gradient accumulation, mosaic and
modality dropout; the train loader gives the same batches for any number of workers and across a restart.
"""

import os
import random
import signal
import subprocess

import numpy as np
import pandas as pd
import torch
from conftest import ROOT, killer_cmd, make_dataset
from ultralytics.nn.tasks import load_checkpoint

from yolofuse import checkpoint, replay
from yolofuse.engine import FuseTrainer

# BATCH=4 with NBS=16: the optimizer steps every 4 batches (fewer while warm-up ramps it up), so accumulation windows
# span epoch boundaries. CLEANUP_EVERY, IMGSZ and WORKERS come from conftest's FAST settings (the CPU uses 0 workers).
ACCUMULATE = ["BATCH=4", "NBS=16"]


def run(runs_dir, data, kill_after_epoch, *settings, **env):
    """train_dual.py through tests/killer.py, SIGKILLed right after the checkpoint of `kill_after_epoch`."""
    cmd = killer_cmd(f"DATA={data}", f"RUNS_DIR={runs_dir}", *ACCUMULATE, *settings)
    env = {**os.environ, "KILLER_AFTER_SAVE": str(kill_after_epoch), **env}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def assert_killed_run_replays_straight_run(tmp_path, data, epochs, kill_after, *settings, fault=None, resume=()):
    """`fault`: KILLER_* variables for both runs' first process (not for the resumed one); `resume`: settings the
    resumed launch adds. Returns the interrupted run's output before the kill, and the last step its last.pt saved."""
    # Both runs stop right after the last epoch's checkpoint, before the final strip, to compare full FP32 state.
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run(straight, data, epochs, f"EPOCHS={epochs}", *settings, **(fault or {})).returncode == -signal.SIGKILL

    first = run(interrupted, data, kill_after, f"EPOCHS={epochs}", *settings, **(fault or {}))
    assert first.returncode == -signal.SIGKILL, first.stderr[-2000:]
    assert checkpoint.load(interrupted / "weights" / "last.pt")["epoch"] == kill_after - 1
    last_step = replay.load_state(interrupted / "weights" / "last.pt")["accumulation"]["last_step"]
    resumed = run(interrupted, data, epochs, f"EPOCHS={epochs}", *settings, *resume)
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-2000:]
    assert "Unfinished run" in resumed.stdout

    last = interrupted / "weights" / "last.pt"
    assert load_checkpoint(last)[1]["epoch"] == epochs - 1  # stock Ultralytics still loads it, extra member and all
    a, b = (replay.saved_tensors(d / "weights" / "last.pt") for d in (straight, interrupted))
    assert a.keys() == b.keys() and len(a) > 1000
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    a, b = (pd.read_csv(d / "results.csv").drop(columns="time") for d in (straight, interrupted))
    assert list(a["epoch"]) == list(range(1, epochs + 1))
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    return first.stdout + first.stderr, last_step


def test_kill_after_warmup_with_a_window_open_across_the_epoch_boundary(tmp_path):
    # 10 pairs: 3 batches per epoch (4 + 4 + 2). After warm-up the optimizer steps every 4 batches: at 10 and 14.
    # Killed after epoch 4 (batches 0-11), batch 11's gradient is in the open window; the resumed run must not step
    # at batches 12 and 13. Mosaic closes for epochs 4-5, so the resumed run starts by closing it.
    data = make_dataset(tmp_path / "data", n_train=10)
    assert_killed_run_replays_straight_run(tmp_path, data, 5, 4, "CLOSE_MOSAIC=2")


def test_an_epoch_restarted_after_out_of_memory_then_killed(tmp_path):
    # 6 pairs, BATCH=4 (2 batches): the 2nd batch of epoch 1 runs out of memory, after a step at the 1st. Stock halves
    # the batch to 2 (3 batches), restarts the epoch with its last step at -1 again, and steps at its first batch
    # (index 0). Warm-up (2 epochs of this 3-epoch run) ramps accumulation from 1 to 8 (NBS=16): the next step is at
    # batch 8. Killed after epoch 1, the run's last step is batch 0. Counting the restarted epoch on from the batches
    # before the retry would save 2, and the resumed run would miss the step at batch 8.
    data = make_dataset(tmp_path / "data", n_train=6)
    out, last_step = assert_killed_run_replays_straight_run(
        tmp_path,
        data,
        3,
        1,
        fault=dict(KILLER_OOM_AT="2"),
        resume=["BATCH=2"],  # the run's batch since the retry
    )
    assert "Reducing to batch=2" in out, out[-3000:]
    assert last_step == 0


def test_an_epoch_restarted_after_nan_then_killed(tmp_path):
    # 6 pairs, BATCH=4: 2 batches per epoch; warm-up (3 epochs of 4) ramps accumulation from 1 to 4: steps at batches
    # 0 and 2. Epoch 2's loss reads NaN: stock reloads last.pt, restarts epoch 2 (batches 2-3) with its last step at
    # -1, and steps at batch 2 again. Killed after it, the run's last step is batch 2; counting the restarted epoch on
    # (as batches 4-5) would save 4, and the resumed run would miss the step at batch 6.
    data = make_dataset(tmp_path / "data", n_train=6)
    out, last_step = assert_killed_run_replays_straight_run(tmp_path, data, 4, 2, fault=dict(KILLER_NAN_EPOCH="1"))
    assert "recovering from last.pt" in out, out[-3000:]
    assert last_step == 2


def test_kill_in_warmup_with_a_window_open_fused_yolo26_musgd_and_dropout(tmp_path):
    """YOLO26 (end-to-end head, one-to-one and one-to-many branches) fused from the stock yaml, trained with MuSGD,
    which optimizer=auto picks for real-size runs: stock rounds both of its momentum buffers to FP16 in last.pt.

    6 pairs: 2 batches per epoch (4 + 2). Warm-up (3 epochs in Ultralytics 8.4) ramps accumulation from 1 to 4: the
    optimizer steps at batches 0, 2 and 6. Killed after epoch 2 (batches 0-3), batch 3's gradient is in the open
    window; stock would step at batch 4 on batch 4 alone, the uninterrupted run steps at 6 on batches 3-6. Mosaic is
    on for epochs 1-3 and closed for epoch 4. Half the samples have one sensor blanked (modality dropout)."""
    data = make_dataset(tmp_path / "data", n_train=6)
    assert_killed_run_replays_straight_run(
        tmp_path,
        data,
        4,
        2,
        "CLOSE_MOSAIC=1",
        "MODALITY_DROPOUT=0.5",
        "MODEL=yolo26n.yaml",
        fault=dict(KILLER_TRAIN="optimizer=MuSGD"),
    )
    last = tmp_path / "interrupted" / "weights" / "last.pt"
    ckpt = checkpoint.load(last)
    assert ckpt["train_args"]["optimizer"] == "MuSGD" and ckpt["ema"].yaml["end2end"] is True
    assert "Modality" in {type(m).__name__ for m in ckpt["ema"].modules()}, "not the RGB+IR model"
    kept = replay.rounded_by_stock(replay.load_state(last, ckpt)["optimizer"])
    assert {k for _, k in kept} == {"momentum_buffer", "momentum_buffer_SGD"}, "MuSGD's buffers are the exact state"


# ----------------------------------------------------------------------------------------------------------------------
# The train loader: same batches for 0 and 2 workers, and after a restart


def trainer_with_loader(data, workers):
    """A trainer and its own train loader over the paired dataset (mosaic on), with `workers` worker processes."""
    trainer = FuseTrainer(
        overrides=dict(model=str(ROOT / "yolov8n-fuse.yaml"), data=str(data), imgsz=64, batch=4, device="cpu")
    )
    trainer.args.workers = workers  # stock forces 0 on the CPU; the loader itself runs workers anywhere
    trainer.setup_model()
    trainer.train_loader = trainer.get_dataloader(trainer.data["train"], batch_size=4, rank=-1, mode="train")
    assert trainer.train_loader.num_workers == workers and trainer.args.mosaic == 1.0
    return trainer


def train_loader(data, workers):
    return trainer_with_loader(data, workers).train_loader


def epochs_of(loader, n, close=True):
    """`n` epochs of batches: each batch as its images and labels; `close` ends the loader's workers after."""
    keys = ("img", "cls", "bboxes", "batch_idx")
    out = []
    for _ in range(n):
        out.append([{k: batch[k].clone() for k in keys} | {"im_file": batch["im_file"]} for batch in loader])
    if close:
        loader.close()
    return out


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for epoch, (batches_a, batches_b) in enumerate(zip(a, b)):
        assert len(batches_a) == len(batches_b) == 3
        for i, (x, y) in enumerate(zip(batches_a, batches_b)):
            assert x["im_file"] == y["im_file"], f"epoch {epoch} batch {i}: other images"
            for k in ("img", "cls", "bboxes", "batch_idx"):
                assert torch.equal(x[k], y[k]), f"epoch {epoch} batch {i}: {k} differs"


def test_loader_batches_do_not_depend_on_workers_or_restarts(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=10)  # 3 batches of 4, 4 and 2
    loader = train_loader(data, 0)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    no_workers = epochs_of(loader, 3)
    # With no workers the samples are made in this process, which still sees its own random streams untouched.
    assert random.getstate() == states[0] and np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])
    assert not torch.equal(no_workers[0][0]["img"], no_workers[1][0]["img"]), "epochs repeat: nothing is random"

    assert_same_batches(epochs_of(train_loader(data, 2), 3), no_workers)

    # A restart before epoch 3 (index 2): a fresh loader, told its next epoch as a resume tells it.
    for workers in (2, 0):
        restarted = train_loader(data, workers)
        replay.set_next_epoch(restarted, 2)
        assert_same_batches(epochs_of(restarted, 1), no_workers[2:])


def test_closing_mosaic_replays_the_epoch_the_workers_had_begun(tmp_path):
    """Stock closes mosaic at an epoch start and resets the loader; its workers had already begun that epoch."""
    data = make_dataset(tmp_path / "data", n_train=10)
    trainer = trainer_with_loader(data, 2)
    epochs_of(trainer.train_loader, 1, close=False)
    next(iter(trainer.train_loader))  # the workers now hold the start of epoch 2 (index 1)
    trainer.epoch = 1
    trainer._close_dataloader_mosaic()
    trainer.train_loader.reset()
    closed = epochs_of(trainer.train_loader, 1)

    reference = trainer_with_loader(data, 0)  # a loader that starts at epoch index 1, as after a resume
    reference.epoch = reference.start_epoch = 1
    reference._close_dataloader_mosaic()
    replay.set_next_epoch(reference.train_loader, 1)
    assert_same_batches(closed, epochs_of(reference.train_loader, 1))
