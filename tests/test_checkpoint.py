"""FuseTrainer.save_model on a trainer trained in this process: what it commits, and what it never commits. Then the
run folder's files: results.csv as a resume finds it, and archiving a finished run into expN."""

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import ROOT, make_dataset
from ultralytics.nn.tasks import load_checkpoint
from ultralytics.utils import LOGGER

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


# --- results.csv as a resume finds it ---------------------------------------------------------------------------

HEADER = b"epoch,time,metrics/mAP50(B),lr/pg0\n"


def row(epoch: int) -> bytes:
    return f"{epoch},{12.5 * epoch:g},0.{epoch},0.001\n".encode()


def append_like_stock(csv: Path, epoch: int) -> None:
    """What Ultralytics' save_metrics does after each epoch: the header only when the file does not exist yet."""
    header = b"" if csv.exists() else HEADER
    with open(csv, "ab") as f:
        f.write(header + row(epoch))


@pytest.fixture
def said():
    """The lines Ultralytics' LOGGER prints (it does not propagate to pytest's log capture)."""
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    yield lines
    LOGGER.removeHandler(handler)


def trimmed(tmp_path, content: bytes, epochs_done: int) -> Path:
    csv = tmp_path / "results.csv"
    csv.write_bytes(content)
    checkpoint.trim_results(csv, epochs_done)
    return csv


def test_rows_of_epochs_after_the_checkpoint_are_dropped_quietly(tmp_path, said):
    csv = trimmed(tmp_path, HEADER + row(1) + row(2) + row(3), epochs_done=2)  # epoch 3 is redone on resume
    assert csv.read_bytes() == HEADER + row(1) + row(2) and said == []
    csv = trimmed(tmp_path, HEADER, epochs_done=2)  # killed before epoch 1's row
    assert csv.read_bytes() == HEADER and said == []


def test_a_last_row_cut_by_the_crash_is_dropped_and_the_next_row_starts_its_own_line(tmp_path, said):
    """The checkpoint is fsynced, results.csv is not: a power cut can leave the saved epoch's row cut short."""
    csv = trimmed(tmp_path, HEADER + row(1) + row(2) + row(3)[:9], epochs_done=3)
    append_like_stock(csv, 3)  # the resumed run redoes epoch 3
    assert csv.read_bytes() == HEADER + row(1) + row(2) + row(3)
    assert pd.read_csv(csv)["epoch"].tolist() == [1, 2, 3]
    [line] = said
    assert str(csv) in line and "1 row" in line and "cut short" in line


def test_unreadable_rows_are_dropped_the_rest_kept(tmp_path, said):
    """Bytes that are not UTF-8 (or NUL bytes) in a row, and a row glued onto a cut one (too many fields, as a resume
    with an older launcher left it), are dropped; the readable rows stay, and one line says so."""
    glued = row(3)[:9] + row(4)
    content = HEADER + row(1) + b"2,25,\xff\xfe\x9c,0.001\n" + glued + b"\0\0\0\0\n" + row(5) + row(6)
    csv = trimmed(tmp_path, content, epochs_done=5)
    assert csv.read_bytes() == HEADER + row(1) + row(5)
    [line] = said
    assert str(csv) in line and "3 unreadable rows" in line


@pytest.mark.parametrize(
    "content",
    [b"", b"\0" * 4096, b"epoch,time,metr", b"\xff\xfeepoch\n" + row(1)],
    ids=["empty", "nul-bytes", "header-cut", "header-not-utf8"],
)
def test_a_results_csv_without_a_whole_header_is_started_again(tmp_path, said, content):
    """Empty, all NUL bytes (a power cut after the size grew, before the data), a header cut short, or unreadable:
    the resume goes on, Ultralytics writes a new header, and what was there is kept aside (unless it was empty)."""
    csv = trimmed(tmp_path, content, epochs_done=2)
    append_like_stock(csv, 3)
    assert csv.read_bytes() == HEADER + row(3)
    aside = tmp_path / "results.csv.corrupt"
    assert (aside.read_bytes() == content) if content else not aside.exists()
    [line] = said
    assert str(csv) in line


# --- archiving a finished run -----------------------------------------------------------------------------------

# One of each file stock Ultralytics (detection training, plots on) writes into its save_dir
RUN_TOP = [
    "args.yaml",
    "results.csv",
    "results.png",
    "labels.jpg",
    "train_batch0.jpg",
    "train_batch1.jpg",
    "val_batch0_labels.jpg",
    "val_batch0_pred.jpg",
    "confusion_matrix.png",
    "confusion_matrix_normalized.png",
    "BoxPR_curve.png",
    "BoxF1_curve.png",
    "BoxP_curve.png",
    "BoxR_curve.png",
]
# What a user keeps beside the run: notes, a model of their own, and (RUNS_DIR=.) the repository itself
USERS = {
    "notes.txt": b"lr 0.01 was too high",
    "baseline_model.pt": b"the model I compare against",
    "train_dual.py": b"# the launcher",
    "cleanup.py": b"# the pruning policy",
    "README.md": b"# readme",
    "data_config.yaml": b"path: datasets/demo_night",
    "requirements.txt": b"ultralytics==8.4.190",
    "yolofuse/checkpoint.py": b"# a module",
    "datasets/demo_night/labels/train/a.txt": b"0 0.5 0.5 0.1 0.1",
    "results_old.csv": b"epoch\n1\n",
    "weights_backup/best.pt": b"older weights",
}


def make_finished_run(runs: Path) -> dict[str, bytes]:
    """A finished run at the top of `runs` (its files, a weights/ folder) and the user's files beside it; returns
    {relative path: bytes} of the run's files."""
    files = {name: os.urandom(64) for name in RUN_TOP}
    files |= {"weights/last.pt": os.urandom(3000), "weights/best.pt": os.urandom(2000)}
    for rel, data in (files | USERS).items():
        (runs / rel).parent.mkdir(parents=True, exist_ok=True)
        (runs / rel).write_bytes(data)
    return files


def contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_archiving_takes_the_runs_files_and_leaves_the_users_where_they_are(tmp_path):
    runs = tmp_path / "experiments"
    run = make_finished_run(runs)
    made = min(os.stat(runs / name).st_mtime for name in [*run, "weights"])

    target = checkpoint.archive_run(runs)

    assert target == runs / "exp1"
    archived = contents(target)
    assert archived.pop(checkpoint.MADE_AT_NAME)  # when the run was made, recorded for cleanup
    assert archived == run
    left = {rel: data for rel, data in contents(runs).items() if not rel.startswith(("exp1/", "."))}
    assert left == USERS
    assert checkpoint.made_at(target) == pytest.approx(made, abs=1e-3)
    shutil.copytree(target, tmp_path / "copy", copy_function=shutil.copyfile)  # a copy without its times
    assert checkpoint.made_at(tmp_path / "copy") == pytest.approx(made, abs=1e-3)


def test_experiment_numbers_are_never_reused_while_a_trace_is_left(tmp_path):
    runs, archive, backup = tmp_path / "runs", tmp_path / "archive", tmp_path / "backup"
    (runs / "exp2").mkdir(parents=True)
    (runs / "exp4_best").mkdir()  # a renamed experiment keeps its number
    (runs / ".trash" / "exp6-20250615T150640Z").mkdir(parents=True)  # the highest number is in the trash
    assert checkpoint.next_experiment(runs) == runs / "exp7"
    archive.mkdir()
    (archive / "exp9-20250101T000000Z.tar").write_bytes(b"")
    (backup / "exp11" / "weights").mkdir(parents=True)
    assert checkpoint.next_experiment(runs, archive, backup) == runs / "exp12"
    assert checkpoint.next_experiment(runs, tmp_path / "not-mounted") == runs / "exp7"

    make_finished_run(runs)
    assert checkpoint.archive_run(runs, archive_dir=archive, backup_dir=backup) == runs / "exp12"


HOLD_CLEANUP_LOCK = """
import sys, time
from pathlib import Path
from yolofuse.lock import CleanupLock
with CleanupLock(sys.argv[1]):  # what a cron `cleanup.py` holds while it prunes
    Path(sys.argv[2]).touch()
    time.sleep(float(sys.argv[3]))
"""


def hold_cleanup_lock(runs: Path, seconds: float) -> subprocess.Popen:
    """Another process that holds the runs folder's cleanup lock for `seconds`; returns once it holds it."""
    ready = runs.parent / f"lock-held-{time.monotonic_ns()}"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_CLEANUP_LOCK, str(runs), str(ready), str(seconds)], cwd=ROOT)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert holder.poll() is None and time.monotonic() < deadline, "the lock holder did not start"
        time.sleep(0.01)
    return holder


def test_archiving_waits_for_a_cleanup_then_refuses_in_one_line(tmp_path):
    runs = tmp_path / "runs"
    run = make_finished_run(runs)
    before = contents(runs)
    holder = hold_cleanup_lock(runs, 600)
    try:
        with pytest.raises(checkpoint.CheckpointError) as refused:
            checkpoint.archive_run(runs, lock_wait=0.5)
    finally:
        holder.kill()
        holder.wait()
    message = str(refused.value)
    assert "\n" not in message and f"PID {holder.pid}" in message and "run again" in message
    assert {rel: data for rel, data in contents(runs).items() if rel != ".cleanup.lock"} == before  # nothing moved

    holder = hold_cleanup_lock(runs, 1.0)  # a cleanup that ends soon: archiving waits for it
    assert checkpoint.archive_run(runs, lock_wait=60) == runs / "exp1"
    assert holder.wait(timeout=60) == 0
    assert set(run) <= set(contents(runs / "exp1"))
