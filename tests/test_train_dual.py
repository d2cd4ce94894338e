"""train_dual.py end to end: the real script in a subprocess, on the CPU, with tiny images and a tiny dataset.

Runs are killed (SIGKILL from outside, or from inside at a chosen instant of a checkpoint write, see killer.py),
interrupted (SIGTERM / SIGINT), extended, locked, copied and fed bad input; every re-run must pick up where
the previous one stopped. A 2-epoch run takes ~10 s here, so runs are short and shared setups are copied.
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import (
    FAST,
    ROOT,
    folders_config,
    image_list_config,
    killer_cmd,
    make_dataset,
    make_old_experiments,
    run_train_dual,
    train_dual_cmd,
)

import yolofuse  # noqa: F401  (keeps Ultralytics offline)
from yolofuse import checkpoint, replay
from yolofuse.lock import LOCK_NAME, is_locked

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
CORRUPT_LAST = re.compile(r"last\.pt\b.*\bcorrupt\b")  # the probe's word (the label scan's "0 corrupt" is not it)
START_TIMEOUT = 180  # s; a launch reaches its first epochs in ~10 s on a 2-core CPU, allow a busy machine


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def run_killer(*settings: str, timeout: int = 600, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(killer_cmd(*settings), capture_output=True, text=True, timeout=timeout, env={**ENV, **env})


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as in a terminal, even when pytest itself runs in the background


_launched: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_runs():
    """A test that fails half-way leaves no background run behind (a paused one would wake up and go on training)."""
    yield
    while _launched:
        proc = _launched.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Launch:
    """A launch in the background; its output goes to files (no pipe to fill up), read at any time."""

    def __init__(self, cmd: list[str], logs: Path, name: str, **env: str):
        self.out, self.err = logs / f"{name}.stdout", logs / f"{name}.stderr"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**ENV, **env}, preexec_fn=_default_sigint)
        _launched.append(self.proc)

    @property
    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def tail(self) -> str:
        return f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"

    def wait_until(self, condition, what: str, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc.poll() is not None:
                pytest.fail(f"the run ended (rc {self.proc.returncode}) before {what}\n{self.tail()}")
            if time.monotonic() > deadline:
                self.proc.kill()
                self.proc.wait()
                pytest.fail(f"timed out waiting for {what}\n{self.tail()}")
            time.sleep(0.02)

    def signal(self, sig: int, timeout: float = 120) -> int:
        assert self.proc.poll() is None, f"the run already ended (rc {self.proc.returncode})\n{self.tail()}"
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        rc = self.signal(signal.SIGKILL)
        assert rc == -signal.SIGKILL, self.tail()


def tail(res: subprocess.CompletedProcess) -> str:
    return f"rc {res.returncode}\n--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-3000:]}"


def assert_ok(res: subprocess.CompletedProcess) -> None:
    assert res.returncode == 0, tail(res)
    assert "Traceback" not in res.stderr, tail(res)


def csv_epochs(run: Path, partial: bool = False) -> list[int]:
    """The epoch column of run/results.csv; `partial` skips a row still being written (for polling)."""
    csv = run / "results.csv"
    if not csv.exists():
        return []
    epochs = []
    for row in csv.read_text().splitlines()[1:]:
        try:
            epochs.append(int(float(row.split(",", 1)[0])))
        except ValueError:
            if not partial:
                raise
    return epochs


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(folder: Path, top_level_runs_only: bool = False) -> dict[str, str]:
    """relative path -> sha256 of every file under `folder`; optionally only a run's own files (no .hidden, no expN)."""
    files = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if top_level_runs_only and (rel.parts[0].startswith(".") or checkpoint.EXP_NAME.fullmatch(rel.parts[0])):
            continue
        if path.is_file():
            files[str(rel)] = sha(path)
    return files


def run_snapshot(exp: Path) -> dict[str, str]:
    """snapshot() of an archived experiment without the `.created` that archiving adds."""
    return {rel: digest for rel, digest in snapshot(exp).items() if rel != checkpoint.MADE_AT_NAME}


def state_files(run: Path) -> dict[str, str]:
    """snapshot() without the plots (Ultralytics draws some in background threads)."""
    return {rel: digest for rel, digest in snapshot(run).items() if not rel.endswith((".jpg", ".png"))}


def settings_of(runs: Path, data: Path, epochs: int) -> tuple[str, ...]:
    return f"RUNS_DIR={runs}", f"DATA={data}", f"EPOCHS={epochs}"


def lr_columns(run: Path) -> pd.DataFrame:
    """The epoch and lr/pg* columns of run/results.csv: the LR schedule as the run followed it."""
    df = pd.read_csv(run / "results.csv")
    return df[["epoch", *(c for c in df.columns if c.startswith("lr/"))]]


def assert_same_optimizer_state(saved: dict, resumed: dict, exact: bool) -> None:
    """The resumed optimizer holds the saved state. Stock checkpoints keep some moments in FP16: with `exact` False
    the resumed tensors are compared after conversion to the saved dtype (atol 0), with `exact` True as they are."""
    assert saved["state"], "the checkpoint holds no optimizer state, nothing to compare"
    assert sorted(resumed["state"]) == sorted(saved["state"])
    nonzero = 0
    for i, saved_state in saved["state"].items():
        resumed_state = resumed["state"][i]
        assert resumed_state.keys() == saved_state.keys(), i
        for key, value in saved_state.items():
            got = resumed_state[key]
            if isinstance(value, torch.Tensor):
                assert got.shape == value.shape, (i, key)
                got = got if exact else got.to(value.dtype)
                assert got.dtype == value.dtype and torch.equal(got, value), f"optimizer state[{i}][{key!r}] differs"
                nonzero += bool(value.float().abs().sum() > 0)
            else:
                assert got == value, (i, key)
    assert nonzero, "every saved optimizer tensor is zero: the comparison would prove nothing"
    assert len(resumed["param_groups"]) == len(saved["param_groups"])
    for saved_group, resumed_group in zip(saved["param_groups"], resumed["param_groups"]):
        for key in saved_group.keys() - {"params", "fused"}:  # fused: picked by the device at load time
            assert resumed_group[key] == saved_group[key], f"param group {key!r} differs"


# ----------------------------------------------------------------------------------------------------------------------
# A run killed by SIGKILL in the middle of its last epoch, shared (as a copy) by several tests


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """A 3-epoch run SIGKILLed mid-epoch 3: last.pt holds epoch index 1, last.prev.pt index 0, results.csv 1..2.

    Returns (runs_dir, data_yaml, snapshot of runs_dir right after the kill). Tests work on copies of runs_dir.
    """
    base = tmp_path_factory.mktemp("killed_run")
    data = make_dataset(base / "data")
    runs, ready = base / "runs", base / "ready"
    launch = Launch(
        killer_cmd(*settings_of(runs, data, 3)), base, "killed", KILLER_PAUSE_EPOCH="2", KILLER_READY=str(ready)
    )
    launch.wait_until(ready.exists, "the pause in the 3rd epoch")
    launch.kill()
    last = runs / "weights" / "last.pt"
    assert load_ckpt(last)["epoch"] == 1, launch.tail()
    assert load_ckpt(checkpoint.previous_of(last))["epoch"] == 0, launch.tail()
    assert csv_epochs(runs) == [1, 2], launch.tail()
    return runs, data, snapshot(runs)


@pytest.fixture(scope="module")
def uninterrupted_lr(tmp_path_factory) -> pd.DataFrame:
    """lr_columns of a 5-epoch run trained straight through, on the same-size dataset as the other runs here.

    The LR depends only on the schedule (epochs, batches per epoch, warm-up), not on the weights. With 2 batches per
    epoch, warm-up ends in epoch 4: epoch 5's LR is the scheduler's alone, so it shows where the scheduler stands.
    """
    base = tmp_path_factory.mktemp("uninterrupted")
    data = make_dataset(base / "data")
    assert_ok(run_train_dual(*settings_of(base / "runs", data, 5)))
    return lr_columns(base / "runs")


def copy_of(killed_run, dst: Path) -> tuple[Path, Path]:
    runs, data, _ = killed_run
    shutil.copytree(runs, dst, symlinks=True)
    return dst, data


# ----------------------------------------------------------------------------------------------------------------------
# 1. SIGKILL mid-epoch, re-run: next epoch, same optimizer state; 6b. the dead process's lock file never blocks


def test_sigkill_mid_epoch_then_rerun_continues_with_saved_optimizer_state(tmp_path, tiny_data, uninterrupted_lr):
    runs = tmp_path / "runs"
    settings = settings_of(runs, tiny_data, 5)
    launch = Launch(train_dual_cmd(*settings), tmp_path, "first")
    launch.wait_until(lambda: len(csv_epochs(runs, partial=True)) >= 2, "2 epochs in results.csv")
    launch.kill()

    lock = runs / LOCK_NAME
    assert lock.is_file(), "the killed run left no lock file: the stale-lock case below would prove nothing"
    assert lock.read_text().strip() == str(launch.proc.pid)
    assert not is_locked(runs), "the lock of a SIGKILLed process is still held"

    last = runs / "weights" / "last.pt"
    saved = load_ckpt(last)
    assert saved["optimizer"] is not None and 0 <= saved["epoch"] < 4, saved["epoch"]
    exact = replay.load_state(last)
    assert exact is not None, "last.pt holds no exact-resume state"

    record = tmp_path / "resumed.pt"
    res = run_killer(*settings, KILLER_RECORD=str(record))
    assert_ok(res)
    assert "Unfinished run" in res.stdout, tail(res)
    assert "in use by another training" not in res.stdout + res.stderr, tail(res)
    resumed = torch.load(record, weights_only=False)
    assert resumed["start_epoch"] == saved["epoch"] + 1
    assert_same_optimizer_state(saved["optimizer"], resumed["optimizer"], exact=False)  # the stock FP16 copy
    assert_same_optimizer_state(exact["optimizer"], resumed["optimizer"], exact=True)  # the launcher's FP32 copy
    # The rest of the training state: best fitness, early stopping, EMA, and the LR schedule the run followed.
    assert resumed["best_fitness"] == saved["best_fitness"] and resumed["stopper"] == saved["stopper"]
    assert resumed["ema_updates"] == saved["updates"] > 0
    assert csv_epochs(runs) == [1, 2, 3, 4, 5]
    pd.testing.assert_frame_equal(lr_columns(runs), uninterrupted_lr, check_exact=True)
    assert load_ckpt(last)["train_args"]["epochs"] == 5


# ----------------------------------------------------------------------------------------------------------------------
# 2. A kill in the middle of writing last.pt leaves a resumable run


def test_kill_inside_checkpoint_write_leaves_resumable_run(tmp_path, tiny_data):
    """Two kills inside the commit of last.pt for epoch 2, each followed by a re-run that resumes from epoch 1's:
    first the staged file torn half-way, nothing renamed yet (a fresh run, on its 2nd commit of last.pt); then, in
    the resumed run, last.prev.pt already hard-linked to the old last.pt but the os.replace of the new one never done.
    """
    runs = tmp_path / "runs"
    settings = settings_of(runs, tiny_data, 3)
    last = runs / "weights" / "last.pt"

    torn = run_killer(*settings, KILLER_COMMIT="truncated:2")
    assert torn.returncode == -signal.SIGKILL, tail(torn)
    assert load_ckpt(last)["epoch"] == 0  # the whole old checkpoint, untouched by the torn write
    staged = checkpoint.staged(last)  # the epoch-2 file, torn: half as long as a whole one
    assert staged.is_file() and staged.stat().st_size < 0.6 * last.stat().st_size
    with pytest.raises(checkpoint.CheckpointError, match="corrupt"):
        checkpoint.load(staged)
    assert csv_epochs(runs, partial=True) == [1, 2]  # epoch 2's row is written before its checkpoint

    linked = run_killer(*settings, KILLER_COMMIT="linked:1")
    assert linked.returncode == -signal.SIGKILL, tail(linked)
    assert "Unfinished run" in linked.stdout and "1/3 epochs done" in linked.stdout, tail(linked)
    assert os.path.samefile(last, checkpoint.previous_of(last))  # killed right after the link...
    assert load_ckpt(last)["epoch"] == 0
    assert load_ckpt(checkpoint.staged(last))["epoch"] == 1  # ...with the new checkpoint whole but not renamed

    res = run_train_dual(*settings)
    assert_ok(res)
    assert "Unfinished run" in res.stdout and "1/3 epochs done" in res.stdout, tail(res)
    assert not CORRUPT_LAST.search(res.stdout), tail(res)
    assert csv_epochs(runs) == [1, 2, 3]
    assert load_ckpt(last)["train_args"]["epochs"] == 3


# ----------------------------------------------------------------------------------------------------------------------
# 3. A truncated last.pt falls back to last.prev.pt


def test_truncated_last_falls_back_to_previous(tmp_path, killed_run):
    runs, data = copy_of(killed_run, tmp_path / "runs")
    last = runs / "weights" / "last.pt"
    torn = last.read_bytes()[: last.stat().st_size // 2]
    last.write_bytes(torn)

    record = tmp_path / "resumed.pt"
    res = run_killer(*settings_of(runs, data, 3), KILLER_RECORD=str(record))
    assert_ok(res)
    assert CORRUPT_LAST.search(res.stdout) and "not found" not in res.stdout.lower(), tail(res)
    assert "last.prev.pt" in res.stdout and "1/3 epochs done" in res.stdout, tail(res)
    assert torch.load(record, weights_only=False)["start_epoch"] == 1  # last.prev.pt's epoch index 0, plus one
    assert csv_epochs(runs) == [1, 2, 3]  # the row of the lost epoch 2 dropped, then redone once
    kept = last.with_name(last.name + ".corrupt")
    assert kept.read_bytes() == torn, "the unreadable last.pt was not kept aside"


def test_unreadable_bytes_in_results_csv_are_dropped_and_the_resume_goes_on(tmp_path, killed_run):
    """A crash can leave bytes that are not UTF-8 in results.csv, and its last row cut short: the resume says so in one
    line and goes on, and each epoch's row is whole on its own line."""
    runs, data = copy_of(killed_run, tmp_path / "runs")
    csv = runs / "results.csv"
    header, row1, row2 = csv.read_bytes().splitlines(keepends=True)
    csv.write_bytes(header + row1 + b"\xff\xfe\x00\x9c garbage\n" + row2 + row2[:20])

    res = run_train_dual(*settings_of(runs, data, 3))
    assert_ok(res)
    assert "Unfinished run" in res.stdout, tail(res)
    [line] = [line for line in (res.stdout + res.stderr).splitlines() if str(csv) in line]
    assert "1 row cut short" in line and "1 unreadable row" in line, line
    assert csv.read_bytes().startswith(header + row1 + row2) and csv_epochs(runs) == [1, 2, 3]
    assert pd.read_csv(csv).shape == (3, header.count(b",") + 1)


# ----------------------------------------------------------------------------------------------------------------------
# 4. A finished run is archived to exp1, a fresh run starts; a crash mid-archive is completed on the next launch


def test_finished_run_is_archived_and_an_interrupted_archive_is_completed(tmp_path, tiny_data):
    runs = tmp_path / "runs"
    assert_ok(run_train_dual(*settings_of(runs, tiny_data, 2), "PLOTS=True"))  # the plots are the run's files too
    finished = snapshot(runs, top_level_runs_only=True)
    assert {"results.png", "labels.jpg", "train_batch0.jpg"} <= finished.keys()
    assert "weights/last.pt" in finished and "results.csv" in finished
    users = {"notes.txt": "lr 0.01 was too high", "baseline_model.pt": "the model I compare against"}
    for name, text in users.items():  # the user's files beside the run (RUNS_DIR=experiments, say)
        (runs / name).write_text(text)

    res = run_train_dual(*settings_of(runs, tiny_data, 2))
    assert_ok(res)
    assert "Finished run" in res.stdout and "exp1" in res.stdout, tail(res)
    exp1 = runs / "exp1"
    assert (exp1 / "weights" / "best.pt").is_file() and (exp1 / "results.csv").is_file()
    assert run_snapshot(exp1) == finished, "the archive is not the finished run, file for file"
    assert all((runs / name).read_text() == text for name, text in users.items()), "the user's files were moved"
    assert csv_epochs(exp1) == [1, 2]
    assert csv_epochs(runs) == [1, 2]  # the new run's own results, from epoch 1
    assert sha(runs / "weights" / "last.pt") != finished["weights/last.pt"]

    # Now a launch dies while archiving this second run into exp2: the marker is written, half the files moved.
    second = snapshot(runs, top_level_runs_only=True)
    items = checkpoint.run_files(runs)
    exp2 = runs / "exp2"
    (runs / checkpoint.ARCHIVE_MARKER).write_text("exp2")
    exp2.mkdir()
    moved = items[: len(items) // 2]
    assert moved and runs / "weights" not in moved  # weights/ still at the top: it would be archived again
    for item in moved:
        os.replace(item, exp2 / item.name)

    res = run_train_dual(*settings_of(runs, tiny_data, 1))
    assert_ok(res)
    assert "Finished archiving" in res.stdout and "exp2" in res.stdout, tail(res)
    second = {rel: digest for rel, digest in second.items() if rel not in users}
    assert run_snapshot(exp2) == second, "files of the half-archived run are missing from exp2"
    assert run_snapshot(exp1) == finished
    assert not (runs / checkpoint.ARCHIVE_MARKER).exists()
    assert not (runs / "exp3").exists(), "the rest of the half-archived run went to a new expN"
    assert csv_epochs(runs) == [1]  # then a fresh run


# ----------------------------------------------------------------------------------------------------------------------
# 5. Raising EPOCHS extends an unfinished run


def test_raising_epochs_extends_the_run(tmp_path, killed_run, uninterrupted_lr):
    runs, data = copy_of(killed_run, tmp_path / "runs")
    res = run_train_dual(*settings_of(runs, data, 5))
    assert_ok(res)
    assert "Unfinished run" in res.stdout, tail(res)
    assert "Extending the run from 3 to 5 epochs" in res.stdout + res.stderr, tail(res)
    assert "Resume ignores" not in res.stdout + res.stderr, tail(res)  # stock's line, which said the opposite
    assert csv_epochs(runs) == [1, 2, 3, 4, 5]
    assert load_ckpt(runs / "weights" / "last.pt")["train_args"]["epochs"] == 5
    # Epochs 1-2 followed the 3-epoch schedule; from epoch 3 on, the LR is that of a run planned for 5 epochs.
    extended = lr_columns(runs)
    assert not extended[:2].equals(uninterrupted_lr[:2])
    pd.testing.assert_frame_equal(extended[2:], uninterrupted_lr[2:], check_exact=True)


# ----------------------------------------------------------------------------------------------------------------------
# 6. A second launch on a run folder in use is refused at once


def test_second_launch_is_refused_while_first_runs(tmp_path, tiny_data):
    runs, ready, go = tmp_path / "runs", tmp_path / "ready", tmp_path / "go"
    settings = settings_of(runs, tiny_data, 2)
    pause = dict(KILLER_PAUSE_EPOCH="0", KILLER_READY=str(ready), KILLER_GO=str(go))
    first = Launch(killer_cmd(*settings), tmp_path, "first", **pause)
    first.wait_until(ready.exists, "the first run's first epoch")
    assert is_locked(runs)
    before = state_files(runs)

    t0 = time.monotonic()
    second = run_train_dual(*settings, timeout=60)
    assert time.monotonic() - t0 < 30
    assert second.returncode != 0, tail(second)
    assert "Traceback" not in second.stderr, tail(second)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), tail(second)
    assert re.search(rf"\b{first.proc.pid}\b", lines[0]), f"the message does not name PID {first.proc.pid}: {lines[0]}"
    assert "Unfinished" not in second.stdout and "archiv" not in second.stdout.lower(), tail(second)

    assert first.proc.poll() is None and is_locked(runs)
    assert state_files(runs) == before, "the refused launch changed the run folder"
    go.touch()
    assert first.proc.wait(timeout=300) == 0, first.tail()
    assert "Traceback" not in first.stderr
    assert csv_epochs(runs) == [1, 2]
    assert not is_locked(runs)


# ----------------------------------------------------------------------------------------------------------------------
# 7. A copied run folder resumes where it is, leaving the original alone


def test_copied_run_folder_resumes_in_the_copy(tmp_path, killed_run):
    original, data, original_files = killed_run
    copy = tmp_path / "elsewhere" / "runs"
    shutil.copytree(original, copy, symlinks=True)

    res = run_train_dual(*settings_of(copy, data, 3))
    assert_ok(res)
    assert "Unfinished run" in res.stdout and str(copy) in res.stdout, tail(res)
    assert csv_epochs(copy) == [1, 2, 3]
    assert yaml.safe_load((copy / "args.yaml").read_text())["save_dir"] == str(copy)
    assert snapshot(original) == original_files, "the resumed copy wrote into the original run folder"
    assert csv_epochs(original) == [1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# 8. SIGTERM and SIGINT stop cleanly with exit code 130 and a resumable last.pt


def test_sigterm_and_sigint_end_cleanly_and_resumably(tmp_path, tiny_data):
    runs, ready = tmp_path / "runs", tmp_path / "ready"
    settings = settings_of(runs, tiny_data, 4)
    last = runs / "weights" / "last.pt"

    # SIGTERM in the middle of epoch 2 (after its first optimizer step): last.pt holds epoch 1, the last completed.
    term = Launch(killer_cmd(*settings), tmp_path, "term", KILLER_PAUSE_EPOCH="1", KILLER_READY=str(ready))
    term.wait_until(ready.exists, "the pause in the 2nd epoch")
    assert term.signal(signal.SIGTERM) == 130, term.tail()
    assert "Traceback" not in term.stderr, term.tail()
    assert re.search(r"python train_dual\.py.* again", term.stderr), term.tail()
    assert load_ckpt(last)["epoch"] == 0 and csv_epochs(runs) == [1]
    assert load_ckpt(last)["optimizer"] is not None
    assert checkpoint.probe(last, 4).state == "unfinished"

    interrupt = Launch(train_dual_cmd(*settings), tmp_path, "int")
    interrupt.wait_until(lambda: "Resuming training" in interrupt.stdout, "the resumed training to start")
    assert interrupt.signal(signal.SIGINT) == 130, interrupt.tail()
    assert "Unfinished run" in interrupt.stdout, interrupt.tail()
    assert "Traceback" not in interrupt.stderr, interrupt.tail()
    assert re.search(r"python train_dual\.py.* again", interrupt.stderr), interrupt.tail()
    assert checkpoint.probe(last, 4).state == "unfinished"
    assert not is_locked(runs)


# ----------------------------------------------------------------------------------------------------------------------
# 9. Bad input: one-line errors through the script; a corrupt last.pt with no previous is archived, not an error


def _missing_ir(data: Path):
    ir = sorted((data.parent / "imagesIR" / "train").iterdir())[0]
    ir.unlink()
    return (), [str(ir.parent / ir.stem)]  # the expected path, named with the RGB image's suffix


def _junk_label(data: Path):
    label = sorted((data.parent / "labels" / "train").iterdir())[0]
    label.write_text("abc def\n")
    return (), [str(label)]


def _missing_config(data: Path):
    missing = data.parent / "nope.yaml"
    return (f"DATA={missing}",), [str(missing)]


def _missing_dataset_folder(data: Path):
    nowhere = data.parent / "nowhere"
    data.write_text(data.read_text().replace(f"path: {data.parent}", f"path: {nowhere}"))
    return (), [str(data), str(nowhere)]


def _unreadable_ir_mid_set(data: Path):
    ir = sorted((data.parent / "imagesIR" / "train").iterdir())[5]  # not the first pair: every pair is checked
    ir.write_bytes(b"not an image")
    return (), [str(ir), "unreadable"]


def _unknown_setting(data: Path):
    return ("EPOCH=3",), ["EPOCH=3", "EPOCHS", "RUNS_DIR", "DATA"]


@pytest.mark.parametrize(
    "breaks",
    [_missing_ir, _junk_label, _missing_config, _missing_dataset_folder, _unreadable_ir_mid_set, _unknown_setting],
    ids=lambda f: f.__name__.strip("_"),
)
def test_bad_input_is_a_one_line_error(tmp_path, tiny_data, breaks):
    runs = tmp_path / "runs"
    extra, expected = breaks(tiny_data)
    res = run_train_dual(*settings_of(runs, tiny_data, 1), *extra)
    assert res.returncode != 0, tail(res)
    assert "Traceback" not in res.stderr, tail(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error:"), tail(res)
    for text in expected:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"
    assert not (runs / "weights" / "last.pt").exists(), "it trained anyway"


def test_corrupt_last_without_previous_is_archived_untouched(tmp_path, tiny_data):
    runs = tmp_path / "runs"
    broken = runs / "weights" / "last.pt"
    broken.parent.mkdir(parents=True)
    garbage = b"\x00garbage, not a checkpoint\xff" * 1000
    broken.write_bytes(garbage)

    res = run_train_dual(*settings_of(runs, tiny_data, 1))
    assert_ok(res)
    assert CORRUPT_LAST.search(res.stdout) and "exp1" in res.stdout, tail(res)
    assert (runs / "exp1" / "weights" / "last.pt").read_bytes() == garbage
    assert load_ckpt(broken)["train_args"]["epochs"] == 1  # a fresh run's real checkpoint
    assert csv_epochs(runs) == [1]


def test_cleanup_prunes_during_training_and_keeps_what_it_must(tmp_path, tiny_data):
    """Cleanup runs before training and from the callback after each epoch (not on final_eval's extra call)."""
    runs = tmp_path / "runs"
    make_old_experiments(runs)
    res = run_train_dual(*settings_of(runs, tiny_data, 2), "CLEANUP_EVERY=1", "KEEP_LATEST=1", "MAP_WHITELIST=0.9")
    assert_ok(res)
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("exp")) == ["exp2", "exp3", "exp5", "exp5_best"]
    trashed = sorted(p.name.rpartition("-")[0] for p in (runs / ".trash").iterdir())
    assert trashed == ["exp1", "exp4"]
    assert (runs / "weights" / "best.pt").is_file() and csv_epochs(runs) == [1, 2]  # the live run is whole
    assert "whitelisted mAP50=0.95" in res.stdout and ".keep" in res.stdout
    newest = [line for line in res.stdout.splitlines() if "exp5" in line and "kept: newest" in line]
    assert len(newest) == 3, newest  # before epoch 1, after epoch 1, after epoch 2


# ----------------------------------------------------------------------------------------------------------------------
# 10. Changed settings on resume: what the checkpoint decides is a note; what it can't take is refused, changing nothing


def trained_model(ckpt: dict):
    return ckpt.get("ema") or ckpt.get("model")  # a finished run's stripped checkpoint keeps it under "model"


@pytest.mark.parametrize("model", ["models/yolov8n-fuse-early.yaml", "renamed-away.yaml"], ids=["other", "missing"])
def test_changed_or_missing_model_is_a_note_and_the_run_keeps_its_architecture(tmp_path, killed_run, model):
    runs, data = copy_of(killed_run, tmp_path / "runs")
    res = run_train_dual(*settings_of(runs, data, 3), f"MODEL={model}")
    assert_ok(res)
    assert "Unfinished run" in res.stdout and model in res.stdout, tail(res)
    assert "resuming with the checkpoint's" in res.stdout, tail(res)
    assert csv_epochs(runs) == [1, 2, 3]
    layers = {type(m).__name__ for m in trained_model(load_ckpt(runs / "weights" / "last.pt")).modules()}
    assert "Modality" in layers, "the resumed run did not keep the checkpoint's mid-fusion architecture"


def test_moved_dataset_is_a_note_and_the_run_trains_on_the_new_path(tmp_path, killed_run):
    runs, _ = copy_of(killed_run, tmp_path / "runs")
    moved = make_dataset(tmp_path / "moved")
    res = run_train_dual(*settings_of(runs, moved, 3))
    assert_ok(res)
    assert f"DATA is now {moved}" in res.stdout, tail(res)
    assert csv_epochs(runs) == [1, 2, 3]
    assert load_ckpt(runs / "weights" / "last.pt")["train_args"]["data"] == str(moved)
    assert (moved.parent / "labels" / "train.cache").is_file(), "the resumed run did not read the moved dataset"


def without_lock(files: dict[str, str]) -> dict[str, str]:
    return {rel: digest for rel, digest in files.items() if rel != LOCK_NAME}  # a launch writes its PID there


def _other_class_names(tmp_path: Path) -> Path:
    data = make_dataset(tmp_path / "renamed")
    data.write_text(data.read_text().replace("0: person", "0: pedestrian"))
    return data


def _three_channel_ir(tmp_path: Path) -> Path:
    import cv2

    data = make_dataset(tmp_path / "rgb_ir3", channels=6)
    for ir in (data.parent / "imagesIR").rglob("*.png"):
        cv2.imwrite(str(ir), cv2.cvtColor(cv2.imread(str(ir), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR))
    return data


@pytest.mark.parametrize(
    "new_data, conflict, torn_last",
    [(_other_class_names, "classes", True), (_three_channel_ir, "channels: 6", False)],
    ids=["classes-with-corrupt-last", "channels"],
)
def test_class_or_channel_change_is_refused_before_any_change(tmp_path, killed_run, new_data, conflict, torn_last):
    """The refusal comes before any change: a torn last.pt is not yet swapped for last.prev.pt, nothing is pruned."""
    runs, _ = copy_of(killed_run, tmp_path / "runs")
    if torn_last:
        last = runs / "weights" / "last.pt"
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    (runs / "exp1").mkdir()  # an old experiment that KEEP_LATEST=0 would prune
    before = without_lock(snapshot(runs))
    data = new_data(tmp_path)
    res = run_train_dual(*settings_of(runs, data, 3), "KEEP_LATEST=0")
    assert res.returncode != 0 and "Traceback" not in res.stderr, tail(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), tail(res)
    assert conflict in lines[0] and "checkpoint" in lines[0] and "moving" in lines[0], lines[0]
    after = without_lock(snapshot(runs))
    assert after == before, f"the refused launch changed the run folder: {sorted(after.items() ^ before.items())}"


def assert_refused(res: subprocess.CompletedProcess, *expected: str) -> None:
    """The launch stopped with one line on stderr, `error: ...`, holding each of `expected`."""
    assert res.returncode != 0 and "Traceback" not in res.stderr, tail(res)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), tail(res)
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def test_device_list_on_the_command_line_reaches_ultralytics_as_one_string(tmp_path, tiny_data):
    """DEVICE=0,1 (which Python reads as the tuple (0, 1)) reaches stock's select_device in the trainer as '0,1'.

    This machine has no GPU: the launch sees two (torch.cuda.device_count), and stops in select_device."""
    code = (
        "import runpy, sys, torch, yolofuse\n"
        "torch.cuda.device_count = lambda: 2\n"
        "import ultralytics.engine.trainer as trainer\n"
        "def select_device(device, *args, **kwargs):\n"
        "    print('select_device got', repr(device), flush=True)\n"
        "    sys.exit(3)\n"
        "trainer.select_device = select_device\n"
        f"sys.argv = ['train_dual.py', *sys.argv[1:]]\n"
        f"runpy.run_path({str(ROOT / 'train_dual.py')!r}, run_name='__main__')\n"
    )
    cmd = [sys.executable, "-c", code, *FAST, *settings_of(tmp_path / "runs", tiny_data, 1), "DEVICE=0,1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert res.returncode == 3 and "select_device got '0,1'" in res.stdout, tail(res)


# ----------------------------------------------------------------------------------------------------------------------
# 11. Every setting is checked before anything changes: a bad one is one line, and a finished run is not archived


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-epoch run: a launch in its folder would archive it to exp1 first."""
    base = tmp_path_factory.mktemp("finished")
    data = make_dataset(base / "data")
    assert_ok(run_train_dual(*settings_of(base / "runs", data, 1)))
    return base / "runs", data


@pytest.mark.parametrize(
    "bad, expected",
    [
        ("EPOCHS=0", "EPOCHS=0: must be a whole number >= 1"),
        ("EPOCHS=ten", "EPOCHS='ten': must be a whole number >= 1"),
        ("DEVICE=7", "DEVICE=7: there is no GPU 7 here (no CUDA GPU found)"),
        ("DEVICE=gpu", "DEVICE='gpu': must be None (the GPU if there is one), 'cpu', or GPU numbers"),
        ("CLEANUP_EVERY=0", "CLEANUP_EVERY=0: must be a whole number >= 1"),
        ("CACHE=yes", "CACHE='yes': must be one of False, True, 'ram', 'disk'"),
        ("MAP_WHITELIST=80", "MAP_WHITELIST=80: mAP50 is a fraction from 0 to 1; 80 looks like a percentage: use 0.8"),
    ],
)
def test_a_bad_setting_is_one_line_and_the_finished_run_stays(tmp_path, finished_run, bad, expected):
    runs = tmp_path / "runs"
    shutil.copytree(finished_run[0], runs, symlinks=True)
    before = snapshot(runs)
    res = run_train_dual(*settings_of(runs, finished_run[1], 1), bad)
    assert_refused(res, expected)
    assert snapshot(runs) == before, "the refused launch changed the run folder (archived the finished run?)"


def _runs_dir_is_a_file(tmp_path: Path):
    file = tmp_path / "runs"
    file.write_text("a file")
    return file, [f"RUNS_DIR={str(file)!r} is a file, not a folder"]


def _runs_dir_read_only(tmp_path: Path):
    if os.geteuid() != 0:
        runs = tmp_path / "runs"
        runs.mkdir()
        runs.chmod(0o555)
        return runs, [f"{runs} is not writable"]
    return Path("/proc/yolofuse-runs"), ["/proc is not writable"]  # root writes through any mode; /proc takes nothing


def _runs_dir_holds_the_launcher(tmp_path: Path):
    return ".", ["RUNS_DIR='.'", "holds train_dual.py", "RUNS_DIR=runs/fuse"]


@pytest.mark.parametrize(
    "runs_dir", [_runs_dir_is_a_file, _runs_dir_read_only, _runs_dir_holds_the_launcher], ids=lambda f: f.__name__[1:]
)
def test_a_runs_dir_that_cannot_hold_the_run_is_one_line(tmp_path, tiny_data, runs_dir):
    runs, expected = runs_dir(tmp_path)
    before = sorted(p.name for p in ROOT.iterdir())
    res = run_train_dual(f"RUNS_DIR={runs}", f"DATA={tiny_data}", "EPOCHS=1")
    assert_refused(res, *expected)
    assert sorted(p.name for p in ROOT.iterdir()) == before, "the launcher's folder changed"


# ----------------------------------------------------------------------------------------------------------------------
# 12. Settings given on the command line on resume: they take effect with a line, or are refused in one


def test_batch_patience_cache_close_mosaic_and_plots_change_on_resume_each_with_a_line(tmp_path, killed_run):
    """The run was killed at BATCH=4 (2 batches of 8 pairs), without plots: it resumes at BATCH=2, 4 batches an epoch,
    and draws them."""
    runs, data = copy_of(killed_run, tmp_path / "runs")
    record = tmp_path / "resumed.pt"
    changed = ("BATCH=2", "PATIENCE=7", "CACHE=ram", "CLOSE_MOSAIC=2", "PLOTS=True")
    res = run_killer(*settings_of(runs, data, 3), *changed, KILLER_RECORD=str(record))
    assert_ok(res)
    for line in (
        "BATCH: 4 -> 2 from here on; the batches differ",
        "PATIENCE: 100 -> 7 from here on",
        "CACHE: False -> 'ram' from here on",
        "CLOSE_MOSAIC: 10 -> 2 from here on",
        "PLOTS: False -> True from here on",
    ):
        assert line in res.stdout, tail(res)
    assert "Resume ignores" not in res.stdout + res.stderr, tail(res)
    resumed = torch.load(record, weights_only=False)
    assert (resumed["batch_size"], resumed["batches"], resumed["patience"]) == (2, 4, 7)
    args = load_ckpt(runs / "weights" / "last.pt")["train_args"]
    changed_args = ("batch", "patience", "cache", "close_mosaic", "plots")
    assert tuple(args[k] for k in changed_args) == (2, 7, "ram", 2, True)
    assert csv_epochs(runs) == [1, 2, 3] and (runs / "results.png").exists()


@pytest.mark.parametrize("change", ["IMGSZ=32", "EPOCHS=2"])
def test_a_change_that_cannot_happen_mid_run_is_refused_before_any_change(tmp_path, killed_run, change):
    runs, data = copy_of(killed_run, tmp_path / "runs")
    before = without_lock(snapshot(runs))
    res = run_train_dual(*settings_of(runs, data, 3), change)
    assert_refused(res, change, "this run")
    assert without_lock(snapshot(runs)) == before


# ----------------------------------------------------------------------------------------------------------------------
# 13. Data configs Ultralytics takes: a list of folders, image lists


@pytest.mark.parametrize("config", [folders_config, image_list_config], ids=["list-of-folders", "image-lists"])
def test_a_list_of_folders_or_image_lists_train(tmp_path, tiny_data, config):
    runs = tmp_path / "runs"
    res = run_train_dual(*settings_of(runs, config(tiny_data), 1))
    assert_ok(res)
    assert "Using 8 train, 4 val images" in res.stdout + res.stderr, tail(res)
    assert csv_epochs(runs) == [1]
