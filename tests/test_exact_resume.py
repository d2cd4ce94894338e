"""A run killed after epoch 2 and re-run ends bit-identical to the uninterrupted run (CPU, deterministic)."""

import os
import signal
import subprocess
import sys

import pandas as pd
import torch

from conftest import ROOT, train_dual_cmd

# Runs train_dual.py in-process and SIGKILLs itself right after the checkpoint of epoch $KILL_AFTER_EPOCH is saved.
KILL_AFTER_SAVE = """
import os, runpy, signal, sys
from yolofuse.engine import FuseTrainer
save = FuseTrainer.save_model
def save_then_die(self):
    saved = save(self)
    if self.epoch + 1 == int(os.environ["KILL_AFTER_EPOCH"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
FuseTrainer.save_model = save_then_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SETTINGS = ["EPOCHS=4", "CLOSE_MOSAIC=1", "WORKERS=0"]  # mosaic on for epochs 1-3, closed for epoch 4


def run(runs_dir, data, kill_after_epoch=None):
    cmd = train_dual_cmd(f"DATA={data}", f"RUNS_DIR={runs_dir}", *SETTINGS)
    env = dict(os.environ)
    if kill_after_epoch:
        cmd[1:1] = ["-c", KILL_AFTER_SAVE]
        env["KILL_AFTER_EPOCH"] = str(kill_after_epoch)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def tensors(ckpt):
    """Every tensor a resumed run depends on, by name (the final, stripped last.pt has only the FP16 model)."""
    out = {f"model.{k}": v for k, v in ckpt["model"].state_dict().items()}
    state = ckpt.get("resume_state")
    if state:
        out.update({f"fp32_model.{k}": v for k, v in state["model"].items()})
        out.update({f"fp32_ema.{k}": v for k, v in state["ema"].items()})
    return out


def load(path):
    import yolofuse  # noqa: F401  (registers the fusion layer for unpickling)

    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if ckpt.get("model") is None:
        ckpt["model"] = ckpt["ema"]
    return ckpt


def test_killed_and_resumed_run_is_bit_identical(tmp_path, tiny_data):
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run(straight, tiny_data).returncode == 0

    killed = run(interrupted, tiny_data, kill_after_epoch=2)
    assert killed.returncode == -signal.SIGKILL
    assert load(interrupted / "weights" / "last.pt")["epoch"] == 1  # two epochs saved, then the kill
    resumed = run(interrupted, tiny_data)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Unfinished run" in resumed.stdout

    # Epoch 3 (unstripped, with FP32 model, EMA) and the final stripped last.pt: every tensor identical.
    for name in ("last.prev.pt", "last.pt"):
        a, b = tensors(load(straight / "weights" / name)), tensors(load(interrupted / "weights" / name))
        assert a.keys() == b.keys() and len(a) > 100
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} tensors differ, e.g. {different[:3]}"

    a, b = (pd.read_csv(d / "results.csv").drop(columns="time") for d in (straight, interrupted))
    assert list(a["epoch"]) == [1, 2, 3, 4]
    pd.testing.assert_frame_equal(a, b, check_exact=True)
