"""FuseTrainer.save_model on a trainer trained in this process: what it commits, and what it never commits."""

import hashlib
import shutil
import zipfile

import pytest
import torch
from conftest import ROOT, make_dataset
from ultralytics.nn.tasks import load_checkpoint

from yolofuse import checkpoint, replay
from yolofuse.engine import FuseTrainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    """A FuseTrainer after a finished 2-epoch run (its model, optimizer and EMA still in memory)."""
    base = tmp_path_factory.mktemp("trained")
    data = make_dataset(base / "data")
    settings = dict(model=str(ROOT / "yolov8n-fuse.yaml"), data=str(data), epochs=2, imgsz=64, batch=4, nbs=16)
    trainer = FuseTrainer(overrides={**settings, "device": "cpu", "plots": False, "save_dir": str(base / "run")})
    trainer.train()
    weights = trainer.wdir
    trainer.finished_files = {p.name: (checkpoint.load(p), replay.load_state(p)) for p in weights.glob("*.pt")}
    return trainer


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finished_run_is_stripped_as_stock_strips_it(trainer):
    """After the last epoch, last.pt and best.pt are stock's stripped files: no optimizer, no exact-resume member."""
    files = trainer.finished_files
    assert sorted(files) == ["best.pt", "last.pt"]  # no staged file left, no last.prev.pt
    for name, (ckpt, exact) in files.items():
        assert ckpt["optimizer"] is None and ckpt["epoch"] == -1 and exact is None, name
    assert trainer.metrics["metrics/mAP50(B)"] is not None  # final_eval validated best.pt


def test_stale_staged_best_never_becomes_best(trainer):
    """A kill after stock wrote best.tmp.pt, before its commit, leaves it behind; a later save that is not a new best
    must not commit it."""
    trainer.save_model()
    stale = checkpoint.staged(trainer.best)
    shutil.copyfile(trainer.last, stale)  # a whole checkpoint of an epoch the resumed run discards
    best = sha(trainer.best)
    trainer.fitness = trainer.best_fitness - 1  # this epoch is no new best: stock writes no best.tmp.pt
    trainer.save_model()
    assert sha(trainer.best) == best, "the stale best.tmp.pt became best.pt"
    assert not stale.exists()


def test_last_is_stock_checkpoint_plus_one_member(trainer):
    trainer.save_model()
    last = trainer.last
    with zipfile.ZipFile(last) as archive:
        extra = [n for n in archive.namelist() if n.split("/")[1] == replay.RESUME_MEMBER]
    assert f"{replay.RESUME_MEMBER}/data.pkl" in {n.split("/", 1)[1] for n in extra}
    _, ckpt = load_checkpoint(last)  # stock Ultralytics loads it as its own
    assert ckpt["optimizer"] is not None and replay.RESUME_MEMBER not in ckpt
    state = replay.load_state(last)
    live = trainer.model.state_dict()
    assert all(torch.equal(state["model"][k], v) for k, v in live.items())
    assert all(v.dtype != torch.float16 for v in state["model"].values())  # FP32: not stock's FP16 copy again
    # 2 batches per epoch; warm-up (1 epoch here) ramps accumulation to 4: steps at batch 0 only, so batches 1-3 are
    # an open window at the end, and their gradients are kept.
    assert state["accumulation"]["last_step"] == 0 and state["accumulation"]["grads"]


def test_optimizer_state_stock_rounds_is_kept_exact(trainer):
    """Stock keeps Adam's moments in FP32 but rounds SGD's momentum (and MuSGD's, which `optimizer=auto` picks for
    long runs) to FP16: the exact-resume member carries those, and only those."""
    adamw = trainer.optimizer
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=0.01, momentum=0.9)
    try:
        trainer.optimizer.step()  # the open window's gradients: every momentum buffer gets values
        trainer.save_model()
        live = trainer.optimizer.state_dict()["state"]
    finally:
        trainer.optimizer = adamw
    stock = checkpoint.load(trainer.last)["optimizer"]["state"]
    assert all(s["momentum_buffer"].dtype == torch.float16 for s in stock.values())  # what stock alone would resume
    saved = replay.load_state(trainer.last)["optimizer"]["state"]
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[i]["momentum_buffer"], s["momentum_buffer"]) for i, s in live.items())


def test_adam_moments_are_not_saved_twice(trainer):
    trainer.save_model()
    member = checkpoint.read_member(trainer.last, replay.RESUME_MEMBER)
    assert member["optimizer"]["layout"] == []  # stock's last.pt already holds AdamW's moments in FP32
    state = replay.load_state(trainer.last)["optimizer"]["state"]
    live = trainer.optimizer.state_dict()["state"]
    assert live and all(
        torch.equal(state[i][k], v) for i, s in live.items() for k, v in s.items() if torch.is_tensor(v)
    )
