"""A run killed after epoch 2 and re-run ends bit-identical to the uninterrupted run (CPU, deterministic)."""

import os
import signal
import subprocess

import pandas as pd
import torch
from conftest import killer_cmd

SETTINGS = ["EPOCHS=4", "CLOSE_MOSAIC=1", "WORKERS=0"]  # mosaic on for epochs 1-3, closed for epoch 4


def run(runs_dir, data, kill_after_epoch):
    """train_dual.py through tests/killer.py, SIGKILLed right after the checkpoint of `kill_after_epoch`."""
    cmd = killer_cmd(f"DATA={data}", f"RUNS_DIR={runs_dir}", *SETTINGS)
    env = {**os.environ, "KILLER_AFTER_SAVE": str(kill_after_epoch)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def tensors(ckpt):
    """Every tensor the next epoch would depend on, by name: stock FP16 EMA and the FP32 exact-resume state."""
    state = ckpt["resume_state"]
    out = {f"ema_fp16.{k}": v for k, v in ckpt["ema"].state_dict().items()}
    out.update({f"model.{k}": v for k, v in state["model"].items()})
    out.update({f"ema.{k}": v for k, v in state["ema"].items()})
    for i, moments in state["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in moments.items() if torch.is_tensor(v)})
    return out


def load(path):
    import yolofuse  # noqa: F401  (registers the fusion layer for unpickling)

    return torch.load(path, map_location="cpu", weights_only=False)


def test_killed_and_resumed_run_is_bit_identical(tmp_path, tiny_data):
    # Both runs stop right after the last epoch's checkpoint, before the final strip, to compare full FP32 state.
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run(straight, tiny_data, kill_after_epoch=4).returncode == -signal.SIGKILL

    assert run(interrupted, tiny_data, kill_after_epoch=2).returncode == -signal.SIGKILL
    assert load(interrupted / "weights" / "last.pt")["epoch"] == 1  # two epochs saved, then the kill
    resumed = run(interrupted, tiny_data, kill_after_epoch=4)
    assert resumed.returncode == -signal.SIGKILL, resumed.stderr[-2000:]
    assert "Unfinished run" in resumed.stdout

    a, b = (load(d / "weights" / "last.pt") for d in (straight, interrupted))
    assert a["epoch"] == b["epoch"] == 3
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys() and len(a) > 1000
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"

    a, b = (pd.read_csv(d / "results.csv").drop(columns="time") for d in (straight, interrupted))
    assert list(a["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
