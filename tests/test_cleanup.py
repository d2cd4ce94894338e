"""cleanup.py on real folder trees in tmp_path; the clock and free space are faked, experiments are dated by their
files' mtimes (set_made_at)."""

import copy
import errno
import hashlib
import io
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import torch
from conftest import killer_cmd, run_train_dual, set_made_at

import cleanup
import yolofuse.archive
from yolofuse.lock import CleanupLock, RunLock

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600.0
DEFAULTS = dict(keep_latest=3, map_whitelist=0.8, trash_hours=24.0, min_free_gb=5.0)  # train_dual.py's defaults


def prune(runs_dir, **settings):
    """cleanup.prune with train_dual.py's default settings, overridden by `settings`."""
    return cleanup.prune(runs_dir, **{**DEFAULTS, **settings})


T0 = 1_750_000_000.0  # a fixed "now" for the fake clock
T0_STAMP = "20250615T150640Z"  # T0 in UTC, as trash entry names carry it

# Header as Ultralytics 8.4 writes it
HEADER = (
    "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
    "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
)


def csv_row(epoch, map50):
    return f"{epoch},{12.5 * epoch:g},1.2,1.5,1.1,0.6,0.5,{map50:g},{map50 / 2:g},1.3,1.6,1.2,0.001,0.001,0.001"


def write_results(exp_dir, maps, header=HEADER, tail=""):
    """results.csv with one row per value in `maps` (the mAP50 of that epoch), then `tail` verbatim."""
    rows = [csv_row(i + 1, m) for i, m in enumerate(maps)]
    (exp_dir / "results.csv").write_text(header + "\n" + "\n".join(rows) + "\n" + tail)


def make_exp(runs, name, maps=(0.3, 0.4), payload=1000):
    """An experiment folder like Ultralytics leaves it: results.csv and weights."""
    exp = runs / name
    (exp / "weights").mkdir(parents=True)
    write_results(exp, maps)
    (exp / "weights" / "last.pt").write_bytes(b"\0" * payload)
    return exp


def date_runs(runs, made_at):
    """Date each experiment's run: {folder name: seconds since the epoch}."""
    for name, when in made_at.items():
        set_made_at(runs / name, when)


def fake_free(monkeypatch, free_bytes):
    monkeypatch.setattr(cleanup, "_free_bytes", lambda path: free_bytes)


def listing(root):
    """Every path under root (symlinks not followed) with its kind, size and mtime."""
    out = {}
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            p = Path(dirpath) / name
            st = os.lstat(p)
            out[str(p.relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns, os.path.islink(p))
    return out


def names(items):
    return sorted(Path(p).name for p, _, _ in items)


def trash_names(runs):
    return sorted(p.name for p in (runs / ".trash").iterdir())


@pytest.fixture
def runs(tmp_path, monkeypatch):
    fake_free(monkeypatch, 10**15)  # plenty, unless a test says otherwise
    runs = tmp_path / "runs"
    runs.mkdir()
    return runs


# --- what is a candidate ----------------------------------------------------------------------------------------


def test_only_real_exp_n_folders_are_candidates(runs, tmp_path):
    make_exp(runs, "exp1")
    make_exp(runs, "exp12")
    make_exp(runs, "exp5_best")
    make_exp(runs, "experiments")
    make_exp(runs, "Exp3")
    (runs / "exp7").write_text("a file, not a folder")
    (runs / ".trash").mkdir()
    outside = tmp_path / "outside"
    make_exp(tmp_path, "outside")
    (runs / "exp9").symlink_to(outside, target_is_directory=True)

    assert sorted(c.path.name for c in cleanup.find_candidates(runs)) == ["exp1", "exp12"]

    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
    assert names(report.trashed) == ["exp1", "exp12"]
    assert sorted(p.name for p in runs.iterdir()) == [
        ".cleanup.lock",
        ".trash",
        "Exp3",
        "exp5_best",
        "exp7",
        "exp9",
        "experiments",
    ]
    assert (runs / "exp9").is_symlink() and (outside / "results.csv").is_file()


def test_live_run_files_at_the_top_are_untouched(runs):
    (runs / "weights").mkdir()
    (runs / "weights" / "last.pt").write_bytes(b"live weights")
    (runs / "results.csv").write_text(HEADER + "\n" + csv_row(1, 0.1) + "\n")
    make_exp(runs, "exp1")
    with RunLock(runs):  # the live training holds the runs folder itself
        before = {k: v for k, v in listing(runs).items() if not k.startswith("exp1")}
        report = prune(runs, keep_latest=0, map_whitelist=2.0, purge_all=True, now=T0)
        after = {k: v for k, v in listing(runs).items() if not k.startswith(".trash")}

    assert names(report.purged) == ["exp1-" + T0_STAMP]
    assert after.pop(".cleanup.lock")  # the one file cleanup adds: its own lock
    assert after == before and ".train.lock" in after
    assert (runs / "weights" / "last.pt").read_bytes() == b"live weights"


# --- what is kept -----------------------------------------------------------------------------------------------


def test_newest_by_the_time_their_run_was_made_are_kept_not_highest_n(runs):
    for n in range(1, 6):
        make_exp(runs, f"exp{n}")
    # exp2 is the newest although its N is small; exp4 and exp5 tie, so the larger N (exp5) counts as newer
    date_runs(runs, {"exp1": 100, "exp2": 500, "exp3": 300, "exp4": 400, "exp5": 400})

    report = prune(runs, keep_latest=2, map_whitelist=2.0, now=T0)

    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp2", "kept: newest"), ("exp5", "kept: newest")]
    assert names(report.trashed) == ["exp1", "exp3", "exp4"]
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("exp")) == ["exp2", "exp5"]


def test_adding_touching_or_removing_a_file_in_an_old_experiment_never_makes_it_newer(runs):
    """The README says to add a .keep to an experiment to keep; notes files get added and removed. None of that is
    the run: the newest experiments stay the newest."""
    for n in range(1, 6):
        make_exp(runs, f"exp{n}")
    date_runs(runs, {f"exp{n}": T0 - (6 - n) * HOUR for n in range(1, 6)})
    (runs / "exp6").mkdir()  # made by hand, no run in it: its age can't be told, and it is left alone
    (runs / "exp6" / "notes.txt").write_text("ideas")
    time.sleep(0.05)  # what follows happens later, as it would for a user
    (runs / "exp1" / ".keep").touch()
    (runs / "exp2" / "notes.txt").write_text("lr 0.01 was too high")
    (runs / "exp3" / "notes.txt").write_text("to delete")
    (runs / "exp3" / "notes.txt").unlink()
    os.utime(runs / "exp2")  # a touch of the folder itself

    report = prune(runs, keep_latest=2, map_whitelist=2.0, now=T0)

    kept = {Path(p).name: r for p, _, r in report.kept}
    assert kept == {"exp1": "kept: .keep", "exp4": "kept: newest", "exp5": "kept: newest"}
    assert names(report.trashed) == ["exp2", "exp3"]
    assert (runs / "exp6" / "notes.txt").read_text() == "ideas"


def test_whitelist_reads_best_map50_from_results_csv(runs):
    make_exp(runs, "exp1", maps=(0.5, 0.93, 0.9))  # best epoch is not the last one
    make_exp(runs, "exp2", maps=(0.5, 0.79))
    make_exp(runs, "exp3", maps=(0.8,))  # exactly the threshold counts

    report = prune(runs, keep_latest=0, map_whitelist=0.8, now=T0)

    kept = {Path(p).name: r for p, _, r in report.kept}
    assert kept == {"exp1": "kept: whitelisted mAP50=0.93", "exp3": "kept: whitelisted mAP50=0.8"}
    assert names(report.trashed) == ["exp2"]


def test_results_csv_from_old_versions_with_padded_header(tmp_path):
    padded = ",".join(f"{c:>23}" for c in HEADER.split(","))  # how old Ultralytics versions wrote it
    write_results(tmp_path, (0.4, 0.87, 0.6), header=padded)
    assert cleanup.map50_from_csv(tmp_path / "results.csv") == (0.87, "results.csv")


def test_results_csv_cut_by_a_crash(tmp_path):
    row = csv_row(4, 0.97)
    nul_padded = row[: row.index("0.97") + 2] + "\0" * 20  # power loss mid-write: the block ends in NUL bytes
    cut = csv_row(5, 0.99)[:25]  # the last line ends mid-row, before the mAP50 column
    # epoch 1's tiny mAP is written as "1.2e-05", which beats "0.85" if the column were compared as text
    write_results(tmp_path, (1.2e-05, 0.85, 0.6), tail=nul_padded + "\n" + cut)
    assert cleanup.map50_from_csv(tmp_path / "results.csv") == (0.85, "results.csv")


@pytest.fixture(scope="module")
def stripped_best(tmp_path_factory):
    """`make(map50)`: a best.pt as training leaves it (the fused model's FP16 EMA, then stock `strip_optimizer`)."""
    from ultralytics.utils.torch_utils import strip_optimizer

    import yolofuse

    model = yolofuse.YOLO(str(ROOT / "yolov8n-fuse.yaml")).model
    folder = tmp_path_factory.mktemp("best")

    def make(map50: float) -> Path:
        path = folder / f"best-{map50}.pt"
        metrics = {"metrics/mAP50(B)": map50, "metrics/mAP50-95(B)": map50 / 2, "fitness": map50 / 2}
        ema = copy.deepcopy(model).half()
        torch.save({"epoch": 1, "model": None, "ema": ema, "optimizer": {}, "train_metrics": metrics}, path)
        strip_optimizer(path)
        return path

    return make


def test_checkpoint_is_the_fallback_when_results_csv_is_broken(runs, stripped_best, tmp_path):
    from yolofuse.nn import Modality

    best = stripped_best(0.91)
    stored = torch.load(best, weights_only=False)
    assert stored["optimizer"] is None and any(isinstance(m, Modality) for m in stored["model"].modules())
    ok = make_exp(runs, "exp1")
    (ok / "results.csv").write_bytes(b"\x00\xff garbage, not a csv \x00")
    shutil.copyfile(best, ok / "weights" / "best.pt")
    no_csv = make_exp(runs, "exp2")
    (no_csv / "results.csv").unlink()
    shutil.copyfile(stripped_best(0.95), no_csv / "weights" / "best.pt")
    neither = make_exp(runs, "exp3")
    (neither / "results.csv").write_text(HEADER + "\n")  # header only: the run died before epoch 1
    alien = make_exp(runs, "exp4")  # a best.pt whose pickled classes come from a module this machine lacks
    (alien / "results.csv").unlink()
    (tmp_path / "gone_module.py").write_text("class Layer:\n    pass\n")
    code = f"import sys, torch; sys.path.insert(0, {str(tmp_path)!r}); import gone_module; "
    code += f"torch.save({{'model': gone_module.Layer()}}, {str(alien / 'weights' / 'best.pt')!r})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

    out = run_cli(runs, "--keep", "0", "--map", "0.8", "--dry-run")  # a fresh process: nothing imported by the test

    assert f"{ok}  " in out and "kept: whitelisted mAP50=0.91" in out
    assert f"{no_csv}  " in out and "kept: whitelisted mAP50=0.95" in out
    line = next(m for m in out.splitlines() if f"{neither}  " in m)
    assert "trashed" in line and "not whitelisted" in line and "no mAP50 number" in line and "best.pt missing" in line
    line = next(m for m in out.splitlines() if f"{alien}  " in m)
    assert "trashed" in line and "ModuleNotFoundError: No module named 'gone_module'" in line


def test_keep_file_is_honoured(runs):
    (make_exp(runs, "exp1") / ".keep").touch()
    make_exp(runs, "exp2")

    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)

    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp1", "kept: .keep")]
    assert names(report.trashed) == ["exp2"]


def test_an_experiment_a_live_training_runs_in_is_kept(runs, tiny_data):
    """A training launched with RUNS_DIR=runs/exp1 (paused in its first epoch) holds exp1/.train.lock: exp1 stays."""
    exp = make_exp(runs, "exp1")
    ready = runs.parent / "ready"
    env = {**os.environ, "KILLER_PAUSE_EPOCH": "0", "KILLER_READY": str(ready)}
    command = killer_cmd(f"RUNS_DIR={exp}", f"DATA={tiny_data}", "EPOCHS=2")
    training = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert training.poll() is None, training.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the training did not reach its first epoch"
            time.sleep(0.05)
        report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
        assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp1", "kept: in use")]
        assert (exp / "weights").is_dir()
    finally:
        training.kill()
        training.wait()
    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)  # the training is gone: fair game
    assert names(report.trashed) == ["exp1"]


def test_a_half_archived_experiment_is_left_for_the_launcher_to_finish(runs):
    """A launch killed while archiving leaves RUNS_DIR/.archiving naming the expN it was moving into; the next
    launch finishes the move there, so cleanup must not take that folder meanwhile."""
    make_exp(runs, "exp1")
    make_exp(runs, "exp2")
    (runs / ".archiving").write_text("exp2")
    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
    assert names(report.trashed) == ["exp1"] and (runs / "exp2").is_dir()
    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp2", "kept: in use")]


def test_decide_applies_reasons_in_order():
    def cand(n, made_at, map50=None, keep=False, in_use=False):
        return cleanup.Candidate(Path(f"exp{n}"), n, made_at, 0, map50, "test", keep, in_use)

    cands = [
        cand(1, 10, map50=0.9, keep=True, in_use=True),  # in use beats everything
        cand(2, 20, map50=0.9, keep=True),  # .keep beats newest and whitelist
        cand(3, 30, map50=0.9),  # newest beats whitelist
        cand(4, 1, map50=0.9),
        cand(5, 2, map50=0.1),
        cand(6, 3),
    ]
    assert cleanup.decide(cands, keep_latest=1, map_whitelist=0.8) == {
        Path("exp1"): "kept: in use",
        Path("exp2"): "kept: .keep",
        Path("exp3"): "kept: newest",
        Path("exp4"): "kept: whitelisted mAP50=0.9",
        Path("exp5"): "trashed",
        Path("exp6"): "trashed",
    }
    with pytest.raises(ValueError):
        cleanup.decide(cands, keep_latest=-1, map_whitelist=0.8)


# --- how it deletes ---------------------------------------------------------------------------------------------


def test_symlinks_are_never_followed_nor_deleted_through(runs, tmp_path, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "dataset.txt").write_text("precious")
    (outside / "big.bin").write_bytes(b"\0" * 100_000)
    (runs / "exp9").symlink_to(outside, target_is_directory=True)
    exp1 = make_exp(runs, "exp1")
    (exp1 / "data").symlink_to(outside, target_is_directory=True)
    (exp1 / "labels.txt").symlink_to(outside / "dataset.txt")

    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
    assert names(report.trashed) == ["exp1"]
    assert 1000 < report.trashed[0][1] < 2000  # the 1000-byte last.pt and results.csv, not the link targets
    fake_entry = runs / ".trash" / "exp4-20000101T000000Z"  # a link that looks like an old trash entry
    fake_entry.symlink_to(outside, target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=0, map_whitelist=2.0, trash_hours=24, now=T0 + 25 * HOUR)
    assert names(report.purged) == ["exp1-" + T0_STAMP] and trash_names(runs) == [fake_entry.name]
    assert any(f"{fake_entry}  left alone" in m for m in caplog.messages)

    assert (outside / "dataset.txt").read_text() == "precious" and (outside / "big.bin").stat().st_size == 100_000
    assert (runs / "exp9").is_symlink() and os.readlink(runs / "exp9") == str(outside)


def test_a_symlinked_runs_folder_is_fine_its_exp_links_are_not(tmp_path, monkeypatch):
    fake_free(monkeypatch, 10**15)
    real = tmp_path / "scratch" / "runs"
    real.mkdir(parents=True)
    make_exp(real, "exp1")
    (tmp_path / "runs").symlink_to(real, target_is_directory=True)  # runs on a bigger disk, linked in: common

    report = prune(tmp_path / "runs", keep_latest=0, map_whitelist=2.0, now=T0)

    assert names(report.trashed) == ["exp1"] and trash_names(real) == ["exp1-" + T0_STAMP]


def test_a_symlinked_trash_is_never_used(runs, tmp_path):
    outside = tmp_path / "outside"
    make_exp(tmp_path, "outside")
    (outside / "exp1-20000101T000000Z").mkdir()  # looks like an old trash entry
    (runs / ".trash").symlink_to(outside, target_is_directory=True)
    make_exp(runs, "exp1")

    report = prune(runs, keep_latest=0, map_whitelist=2.0, purge_all=True, now=T0)

    assert report.trashed == report.purged == []
    assert (runs / "exp1").is_dir() and (outside / "exp1-20000101T000000Z").is_dir()


@pytest.fixture
def local_time_not_utc(monkeypatch):
    """Trash ages must not shift with the local time zone (stamps are UTC)."""
    monkeypatch.setenv("TZ", "IST-5:30")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_trash_is_purged_only_after_trash_hours(runs, local_time_not_utc):
    make_exp(runs, "exp1", payload=5000)
    report = prune(runs, keep_latest=0, map_whitelist=2.0, trash_hours=24, now=T0)
    size = report.trashed[0][1]
    assert not (runs / "exp1").exists() and trash_names(runs) == ["exp1-" + T0_STAMP]
    assert report.purged == [] and report.bytes_freed == 0

    report = prune(runs, trash_hours=24, now=T0 + 23.9 * HOUR)
    assert report.purged == [] and trash_names(runs) == ["exp1-" + T0_STAMP]

    report = prune(runs, trash_hours=24, now=T0 + 24 * HOUR)
    assert [(Path(p).name, s, r) for p, s, r in report.purged] == [("exp1-" + T0_STAMP, size, "purged")]
    assert report.bytes_freed == size > 5000 and trash_names(runs) == []


def test_low_disk_purges_the_trash_oldest_first_at_once(runs, monkeypatch, caplog):
    for i, n in enumerate((3, 1, 2)):  # trashed in this order, an hour apart: exp3 is the oldest entry
        make_exp(runs, f"exp{n}", payload=1000)
        prune(runs, keep_latest=0, map_whitelist=2.0, now=T0 + i * HOUR)
    sizes = {p.name[:4]: cleanup.dir_size(p) for p in (runs / ".trash").iterdir()}
    free = 10_000
    fake_free(monkeypatch, free)
    min_free_gb = (free + sizes["exp3"] + 1) / 1e9  # one entry is not enough, two are

    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, min_free_gb=min_free_gb, trash_hours=24, now=T0 + 3 * HOUR)

    assert [Path(p).name[:4] for p, _, _ in report.purged] == ["exp3", "exp1"]
    assert report.bytes_freed == sizes["exp3"] + sizes["exp1"]
    assert [n[:4] for n in trash_names(runs)] == ["exp2"]
    assert any("low disk" in m and cleanup.human_size(report.bytes_freed) in m for m in caplog.messages)


def test_low_disk_with_the_archive_unavailable_keeps_the_trash_and_says_so(runs, archive_dir, monkeypatch, caplog):
    """With ARCHIVE_DIR set, the trash is never deleted unarchived, not even for a full disk: one warning per pass
    says how much is kept, why, and what to do."""
    entry = trash_one(runs)
    size = cleanup.dir_size(entry)
    fake_free(monkeypatch, 1000)  # 1 kB free, on the runs disk and in the archive folder
    for archive in (archive_dir / "nas", archive_dir):  # not mounted; then mounted, but full
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="cleanup"):
            report = prune(runs, now=T0 + HOUR, archive_dir=archive)
        assert report.archived == report.purged == [] and entry.is_dir()
        [line] = [r for r in caplog.records if "low disk" in r.getMessage()]
        assert line.levelno == logging.WARNING
        for text in ("1.0 kB free < 5 GB", f"{cleanup.human_size(size)} of trash kept", str(archive), "ARCHIVE_DIR"):
            assert text in line.getMessage(), line.getMessage()


def test_deletion_errors_are_logged_and_skipped(runs, monkeypatch, caplog):
    make_exp(runs, "exp1")
    make_exp(runs, "exp2")
    prune(runs, keep_latest=1, map_whitelist=2.0, now=T0)  # exp1 or exp2 into the trash

    def busy_rmtree(path, onerror):
        onerror(os.unlink, str(path), (PermissionError, PermissionError("file in use"), None))

    def busy_rename(src, dst):
        raise PermissionError("file in use")

    monkeypatch.setattr(cleanup.shutil, "rmtree", busy_rmtree)
    monkeypatch.setattr(cleanup.os, "rename", busy_rename)
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=0, map_whitelist=2.0, purge_all=True, now=T0)

    assert report.trashed == report.purged == [] and report.bytes_freed == 0
    assert [r for _, _, r in report.kept] == ["kept: could not trash"]
    assert len(trash_names(runs)) == 1
    assert sum("could not be trashed" in m for m in caplog.messages) == 1
    assert sum("could not be purged" in m for m in caplog.messages) == 1


# --- dry run ----------------------------------------------------------------------------------------------------


def test_dry_run_reports_the_same_and_changes_nothing(runs, monkeypatch):
    for n in range(1, 5):
        make_exp(runs, f"exp{n}")
    date_runs(runs, {f"exp{n}": n for n in range(1, 5)})
    prune(runs, keep_latest=3, map_whitelist=2.0, now=T0)  # exp1 into the trash, old by T0 + 48 h
    fake_free(monkeypatch, 0)  # low disk too: the dry run must not purge for it either
    before = listing(runs)

    dry = prune(runs, keep_latest=1, map_whitelist=2.0, trash_hours=24, dry_run=True, now=T0 + 48 * HOUR)

    assert listing(runs) == before
    assert names(dry.kept) == ["exp4"] and names(dry.trashed) == ["exp2", "exp3"]
    assert len(dry.purged) == 3 and dry.bytes_freed > 0  # the old entry and, for the low disk, the two new ones
    real = prune(runs, keep_latest=1, map_whitelist=2.0, trash_hours=24, now=T0 + 48 * HOUR)
    assert (names(real.kept), names(real.trashed), names(real.purged)) == (
        names(dry.kept),
        names(dry.trashed),
        names(dry.purged),
    )
    assert real.bytes_freed == dry.bytes_freed
    assert dry.table().replace(" (dry run, nothing changed)", "") == real.table()


def test_dry_run_creates_no_trash_folder(runs):
    make_exp(runs, "exp1")
    report = prune(runs, keep_latest=0, map_whitelist=2.0, dry_run=True, now=T0)
    assert names(report.trashed) == ["exp1"]
    assert not (runs / ".trash").exists() and (runs / "exp1").is_dir()


# --- in training ------------------------------------------------------------------------------------------------


@pytest.fixture
def prune_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(cleanup, "prune", lambda *args, **kwargs: calls.append(args))
    return calls


def run_training(callback, epochs, stop_at=None):
    """Fire the callback like Ultralytics does: once per epoch, then once more from final_eval with epoch + 1."""
    last = epochs - 1 if stop_at is None else stop_at
    trainer = SimpleNamespace(epochs=epochs, stop=False)
    for epoch in range(last + 1):
        trainer.epoch, trainer.stop = epoch, epoch == last
        callback(trainer)
    trainer.epoch = last + 1
    callback(trainer)


def test_callback_runs_every_n_epochs(runs, prune_calls):
    callback = cleanup.make_callback(runs, 3, 0.8, every=5, min_free_gb=5.0, trash_hours=24.0)
    ran_at = []

    def tracking(trainer):
        before = len(prune_calls)
        callback(trainer)
        if len(prune_calls) > before:
            ran_at.append(trainer.epoch)

    run_training(tracking, epochs=10)
    assert ran_at == [4, 9]
    assert prune_calls[0] == (str(runs), 3, 0.8, 24.0, 5.0)


def test_callback_skips_the_extra_call_from_final_eval(runs, prune_calls):
    run_training(cleanup.make_callback(runs, 3, 0.8, every=1, min_free_gb=5.0, trash_hours=24.0), epochs=3)
    assert len(prune_calls) == 3  # not 4: the final_eval call is skipped

    prune_calls.clear()
    run_training(cleanup.make_callback(runs, 3, 0.8, every=1, min_free_gb=5.0, trash_hours=24.0), 100, stop_at=6)
    assert len(prune_calls) == 7  # early stop after epoch 6: epochs 0..6, not final_eval's epoch 7


def test_callback_runs_at_once_when_the_disk_is_low(runs, prune_calls, monkeypatch):
    callback = cleanup.make_callback(runs, 3, 0.8, every=10, min_free_gb=5.0, trash_hours=24.0)
    callback(SimpleNamespace(epoch=0, epochs=100))
    assert prune_calls == []
    fake_free(monkeypatch, 4 * 10**9)
    callback(SimpleNamespace(epoch=1, epochs=100))
    assert len(prune_calls) == 1


def test_callback_runs_only_on_rank_0(runs, prune_calls, monkeypatch):
    import ultralytics.utils

    callback = cleanup.make_callback(runs, 3, 0.8, every=1, min_free_gb=5.0, trash_hours=24.0)
    monkeypatch.setattr(ultralytics.utils, "RANK", 1)
    callback(SimpleNamespace(epoch=0, epochs=100))
    assert prune_calls == []
    monkeypatch.setattr(ultralytics.utils, "RANK", 0)
    callback(SimpleNamespace(epoch=1, epochs=100))
    assert len(prune_calls) == 1


def test_an_error_inside_cleanup_never_reaches_training(runs, monkeypatch, caplog):
    def broken_prune(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(cleanup, "prune", broken_prune)
    callback = cleanup.make_callback(runs, 3, 0.8, every=10, min_free_gb=5.0, trash_hours=24.0)
    with caplog.at_level(logging.WARNING, logger="cleanup"):
        callback(SimpleNamespace(epoch=9, epochs=100))  # must not raise
    assert any("disk on fire" in m for m in caplog.messages)  # proves prune did run and fail


def test_callback_survives_cloudpickle(runs, prune_calls):
    callback = cleanup.make_callback(runs, 2, 0.7, every=3, min_free_gb=1.0, trash_hours=12.0)
    clone = cloudpickle.loads(cloudpickle.dumps(callback))
    assert clone == callback
    clone(SimpleNamespace(epoch=2, epochs=100))
    assert prune_calls == [(str(runs), 2, 0.7, 12.0, 1.0)]


# --- command line -----------------------------------------------------------------------------------------------


def run_cli(*args):
    result = subprocess.run(
        [sys.executable, str(ROOT / "cleanup.py"), *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_counts(stdout):
    rows = [line.split() for line in stdout.splitlines()]
    return {row[0]: row[1] for row in rows if row[:1] in (["kept"], ["trashed"], ["purged"])}


def test_cli_defaults_come_from_train_dual_relative_to_its_folder(tmp_path, monkeypatch):
    import train_dual

    monkeypatch.chdir(tmp_path)  # the default runs folder is the repository's, wherever the command runs
    assert cleanup._cli_defaults() == dict(
        runs_dir=ROOT / "runs" / "fuse",
        keep=train_dual.KEEP_LATEST,
        map=train_dual.MAP_WHITELIST,
        trash_hours=train_dual.TRASH_HOURS,
        min_free_gb=train_dual.MIN_FREE_GB,
        archive_to=train_dual.ARCHIVE_DIR,  # None unless set there
        backup_to=train_dual.BACKUP_DIR,
    )


def test_cli_reads_train_dual_without_importing_it(tmp_path):
    """The command line reads train_dual.py's constants from its source: importing it loads train_dual's imports."""
    code = "import sys, cleanup; cleanup._cli_defaults(); print('train_dual' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["False"], result.stderr
    source = tmp_path / "train_dual.py"
    source.write_text("import torch\nRUNS_DIR = 'elsewhere/runs'  # a comment\nKEEP_LATEST = 7\n")
    assert cleanup.train_dual_settings("RUNS_DIR", "KEEP_LATEST", source=source) == dict(
        RUNS_DIR="elsewhere/runs", KEEP_LATEST=7
    )
    with pytest.raises(SystemExit, match=f"{source} has no constant ARCHIVE_DIR"):
        cleanup.train_dual_settings("RUNS_DIR", "ARCHIVE_DIR", source=source)


def test_cli_on_a_missing_folder_fails_in_one_line(tmp_path):
    """A cron job notices: exit status 1, one line on stderr naming the folder."""
    missing = tmp_path / "no" / "such"
    result = subprocess.run(
        [sys.executable, str(ROOT / "cleanup.py"), str(missing), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr and not missing.exists()


def test_cli_dry_run_then_real_run(runs):
    make_exp(runs, "exp1", maps=(0.95,))
    make_exp(runs, "exp2", maps=(0.2,))
    make_exp(runs, "exp3", maps=(0.2,))
    (runs / "exp3" / ".keep").touch()
    before = listing(runs)

    out = run_cli(runs, "--keep", "0", "--map", "0.9", "--dry-run")
    assert listing(runs) == before
    assert "dry run, nothing changed" in out and "space freed" in out
    counts = table_counts(out)  # purged is left out: it depends on this disk's free space
    assert (counts["kept"], counts["trashed"]) == ("2", "1")
    assert "kept: whitelisted mAP50=0.95" in out and "kept: .keep" in out

    out = run_cli(runs, "--keep", "0", "--map", "0.9", "--purge-trash")
    assert "dry run" not in out
    assert table_counts(out) == {"kept": "2", "trashed": "1", "purged": "1"}
    assert sorted(p.name for p in runs.iterdir()) == [".cleanup.lock", ".trash", "exp1", "exp3"]
    assert trash_names(runs) == []


# --- archive ----------------------------------------------------------------------------------------------------


def make_run_tree(exp: Path) -> Path:
    """An experiment as Ultralytics leaves it, with the odd cases an archive must carry: a nested and an empty folder,
    a symlink, and a hard link (last.prev.pt is one while a checkpoint write is in flight)."""
    make_exp(exp.parent, exp.name, payload=0)
    (exp / "args.yaml").write_text("task: detect\nepochs: 2\n")
    (exp / "weights" / "last.pt").write_bytes(os.urandom(300_000))
    (exp / "weights" / "best.pt").write_bytes(os.urandom(100_000))
    os.link(exp / "weights" / "last.pt", exp / "weights" / "last.prev.pt")
    (exp / "labels.jpg").write_bytes(os.urandom(5000))
    (exp / "plots" / "empty").mkdir(parents=True)
    (exp / "plots" / "labels.jpg").symlink_to("../labels.jpg")
    return exp


def snapshot(root: Path) -> dict:
    """Every path under root: a file's content hash, mode and mtime (in seconds, as tar keeps it); a link's target;
    a folder as such."""
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if path.is_symlink():
            out[str(path.relative_to(root))] = ("link", os.readlink(path))
        elif path.is_dir():
            out[str(path.relative_to(root))] = ("dir",)
        else:
            out[str(path.relative_to(root))] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                st.st_mode,
                int(st.st_mtime),
            )
    return out


@pytest.fixture
def archive_dir(tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    return archive


def trash_one(runs, name="exp1") -> Path:
    """Build `name` as a real run and put it in the trash at T0; returns the trash entry."""
    make_run_tree(runs / name)
    prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
    return runs / ".trash" / f"{name}-{T0_STAMP}"


def test_archive_round_trip_is_byte_identical(runs, archive_dir, caplog):
    exp1 = make_run_tree(runs / "exp1")
    before = snapshot(exp1)
    make_exp(runs, "exp2")

    prune(runs, keep_latest=1, map_whitelist=2.0, now=T0, archive_dir=archive_dir)  # exp1 into the trash
    assert sorted(p.name for p in archive_dir.iterdir()) == []  # in the trash for TRASH_HOURS first
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=1, map_whitelist=2.0, now=T0 + 25 * HOUR, archive_dir=archive_dir)

    archive = archive_dir / f"exp1-{T0_STAMP}.tar"
    assert names(report.archived) == [f"exp1-{T0_STAMP}"] and report.purged == []
    assert sorted(p.name for p in archive_dir.iterdir()) == [archive.name]  # no temp file left
    assert trash_names(runs) == [] and report.bytes_freed == report.archived[0][1] > 400_000
    assert any(f"archived to {archive}" in m for m in caplog.messages)
    with tarfile.open(archive) as tar:  # unpacks by hand like `tar -cf exp1.tar exp1` would
        assert tar.getnames()[0] == "exp1"

    out = run_cli("--restore", archive, runs)

    assert f"Restored {archive} to {runs / 'exp3'}" in out
    assert snapshot(runs / "exp3") == before
    assert os.stat(runs / "exp3" / "weights" / "last.pt").st_ino == os.stat(runs / "exp3/weights/last.prev.pt").st_ino
    assert sorted(p.name for p in runs.iterdir()) == [".cleanup.lock", ".trash", "exp2", "exp3"]


class DiskFillsUp(io.FileIO):
    """A new file on a disk with `room` bytes left: a write past them raises ENOSPC, as a full disk does."""

    room = 200_000

    def write(self, data):
        left = max(self.room - self.tell(), 0)
        if len(data) > left:
            super().write(bytes(data)[:left])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


class LosesTheTail(DiskFillsUp):
    """A disk (or NFS server) that acknowledges writes past `room` but drops them: the file is silently short."""

    def write(self, data):
        super().write(bytes(data)[: max(self.room - self.tell(), 0)])
        return len(data)


class GarblesAHeader(io.FileIO):
    """A writer that damages the member header of weights/last.pt, as a bad sector would."""

    def write(self, data):
        at = bytes(data).find(b"exp1/weights/last.pt\0")  # the header's name field; the payload is random bytes
        if at >= 0:
            data = bytes(data[:at]) + bytes(b ^ 0x5A for b in data[at : at + 512]) + bytes(data[at + 512 :])
        return super().write(data)


def test_a_full_disk_while_archiving_keeps_the_folder(runs, archive_dir, monkeypatch, caplog):
    entry = trash_one(runs)
    before = snapshot(entry)
    monkeypatch.setattr(yolofuse.archive, "_create", lambda path: DiskFillsUp(path, "wb"))

    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, now=T0 + 25 * HOUR, archive_dir=archive_dir)

    assert report.archived == report.purged == [] and report.bytes_freed == 0
    assert snapshot(entry) == before  # the folder is where it was, whole
    assert list(archive_dir.iterdir()) == []  # no archive under the final name, no partial temp file either
    [line] = [m for m in caplog.messages if "not archived" in m]
    assert f"{entry}  not archived, kept in the trash" in line and "No space left on device" in line

    monkeypatch.undo()  # space again: the next cleanup archives it
    fake_free(monkeypatch, 10**15)
    report = prune(runs, now=T0 + 26 * HOUR, archive_dir=archive_dir)
    assert names(report.archived) == [entry.name] and not entry.exists()


def test_an_archive_dir_without_room_or_not_mounted_is_not_written_to(runs, archive_dir, monkeypatch, caplog):
    entry = trash_one(runs)
    fake_free(monkeypatch, 1000)  # the archive folder has 1 kB free: don't even start
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, min_free_gb=0, now=T0 + 25 * HOUR, archive_dir=archive_dir)
    assert report.archived == [] and entry.is_dir() and list(archive_dir.iterdir()) == []
    assert any("not archived" in m and f"1.0 kB free in {archive_dir}" in m for m in caplog.messages)

    caplog.clear()
    unmounted = archive_dir / "nas"  # not there: never created, it may be an unmounted NAS's mount point
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, min_free_gb=0, now=T0 + 25 * HOUR, archive_dir=unmounted)
    assert report.archived == report.purged == [] and entry.is_dir() and not unmounted.exists()
    [line] = [m for m in caplog.messages if str(unmounted) in m]
    assert "not a folder (not mounted?): nothing archived this time" in line


@pytest.mark.parametrize("writer", [LosesTheTail, GarblesAHeader])
def test_a_corrupt_archive_is_caught_before_the_folder_is_removed(runs, archive_dir, monkeypatch, caplog, writer):
    entry = trash_one(runs)
    before = snapshot(entry)
    monkeypatch.setattr(yolofuse.archive, "_create", lambda path: writer(path, "wb"))

    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, now=T0 + 25 * HOUR, archive_dir=archive_dir)

    assert report.archived == [] and snapshot(entry) == before
    assert list(archive_dir.iterdir()) == []
    [line] = [m for m in caplog.messages if "not archived" in m]
    assert f"{entry}  not archived, kept in the trash" in line


def test_archiving_killed_half_way_is_redone_or_completed(runs, archive_dir, caplog):
    entry = trash_one(runs)
    final = archive_dir / f"{entry.name}.tar"
    yolofuse.archive.staged(final).write_bytes(b"half an archive, the run was killed")  # killed while writing
    report = prune(runs, now=T0 + 25 * HOUR, archive_dir=archive_dir)
    assert names(report.archived) == [entry.name] and sorted(archive_dir.iterdir()) == [final]
    archived = final.read_bytes()

    # killed after the rename, before the folder was removed: the archive was checked before it got its name
    trash_one(runs, "exp2")
    entry2 = runs / ".trash" / f"exp2-{T0_STAMP}"
    yolofuse.archive.write_archive(entry2, archive_dir / f"{entry2.name}.tar", "exp2")
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, now=T0 + 25 * HOUR, archive_dir=archive_dir)
    assert names(report.archived) == [entry2.name] and not entry2.exists()
    assert any(f"{entry2}  already archived" in m for m in caplog.messages)
    assert final.read_bytes() == archived


def test_an_archive_missing_an_entry_is_refused(runs, archive_dir, monkeypatch, caplog):
    """tar skips a socket without an error: the check against the folder's listing catches the silent gap."""
    entry = trash_one(runs)
    server = socket.socket(socket.AF_UNIX)
    monkeypatch.chdir(entry / "weights")  # a socket's path must be short
    server.bind("tensorboard.sock")
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, now=T0 + 25 * HOUR, archive_dir=archive_dir)
    server.close()
    assert report.archived == [] and (entry / "weights" / "last.pt").is_file() and list(archive_dir.iterdir()) == []
    [line] = [m for m in caplog.messages if "not archived" in m]
    assert "first to differ: weights/tensorboard.sock" in line


# --- backup -----------------------------------------------------------------------------------------------------


@pytest.fixture
def backup_dir(tmp_path):
    backup = tmp_path / "backup"
    backup.mkdir()
    return backup


def kept_runs(runs):
    """exp1 whitelisted, exp2 with .keep, exp3 and exp4 neither: only exp1 and exp2 are worth a backup."""
    for n, maps in ((1, (0.5, 0.92)), (2, (0.1,)), (3, (0.2,)), (4, (0.3,))):
        exp = make_run_tree(runs / f"exp{n}")
        write_results(exp, maps)
    (runs / "exp2" / ".keep").touch()


def copies(backup):
    return sorted(str(p.relative_to(backup)) for p in backup.rglob("*") if p.is_file())


def test_backup_copies_the_kept_models_once(runs, backup_dir, monkeypatch, caplog):
    kept_runs(runs)
    date_runs(runs, {f"exp{n}": n for n in range(1, 5)})

    report = prune(runs, keep_latest=1, map_whitelist=0.9, now=T0, backup_dir=backup_dir)

    wanted = [f"{e}/{f}" for e in ("exp1", "exp2") for f in ("args.yaml", "results.csv", "weights/best.pt")]
    assert copies(backup_dir) == wanted and len(report.backed_up) == 6
    for name in wanted:
        assert (backup_dir / name).read_bytes() == (runs / name).read_bytes()
    assert names(report.trashed) == ["exp3"]  # exp4 is kept as the newest, but not backed up

    again = prune(runs, keep_latest=1, map_whitelist=0.9, now=T0, backup_dir=backup_dir)
    assert again.backed_up == []  # identical copies are there

    (runs / "exp1" / "results.csv").touch()  # a new mtime, same content: still identical
    os.utime(backup_dir / "exp2" / "args.yaml", (0, 0))
    assert prune(runs, keep_latest=1, map_whitelist=0.9, now=T0, backup_dir=backup_dir).backed_up == []

    write_results(runs / "exp1", (0.5, 0.92, 0.95))  # the run has changed: its copy is replaced
    (backup_dir / "exp2" / "weights" / "best.pt").write_bytes(b"same name, other content")
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=1, map_whitelist=0.9, now=T0, backup_dir=backup_dir)
    assert sorted(str(Path(p).relative_to(backup_dir)) for p, _, _ in report.backed_up) == [
        "exp1/results.csv",
        "exp2/weights/best.pt",
    ]
    for name in wanted:
        assert (backup_dir / name).read_bytes() == (runs / name).read_bytes()
    assert not any(".tmp" in name for name in copies(backup_dir))
    assert any(f"{runs / 'exp1' / 'results.csv'}  " in m and f"backed up to {backup_dir}" in m for m in caplog.messages)


def test_backup_failures_are_logged_not_raised(runs, tmp_path, monkeypatch, caplog):
    kept_runs(runs)
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=0, map_whitelist=0.9, now=T0, backup_dir=tmp_path / "not-mounted")
    assert report.backed_up == [] and names(report.trashed) == ["exp3", "exp4"]  # pruning goes on
    assert not (tmp_path / "not-mounted").exists()  # never created: it may be an unmounted NAS's mount point
    [line] = [m for m in caplog.messages if "not-mounted" in m]
    assert "no backups this time" in line

    def broken_copy(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    backup = tmp_path / "nas"
    backup.mkdir()
    monkeypatch.setattr(yolofuse.archive.shutil, "copyfile", broken_copy)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=0, map_whitelist=0.9, now=T0, backup_dir=backup)
    assert report.backed_up == []
    failed = [m for m in caplog.messages if "backup to" in m and "failed" in m]
    assert len(failed) == 2 and all("Input/output error" in m for m in failed)  # one line per experiment
    assert copies(backup) == []


def test_a_hung_backup_folder_holds_training_no_longer_than_the_budget(runs, backup_dir, monkeypatch, caplog):
    kept_runs(runs)
    mounted = threading.Event()
    real_copy = shutil.copyfile

    def hung_nas_copy(src, dst):
        mounted.wait(60)  # a hard NFS mount that went away: the call blocks until it is back
        return real_copy(src, dst)

    monkeypatch.setattr(yolofuse.archive.shutil, "copyfile", hung_nas_copy)
    callback = cleanup.make_callback(runs, 0, 0.9, every=1, min_free_gb=0, trash_hours=24.0, backup_dir=backup_dir)
    callback.budget_s = 0.3
    try:
        with caplog.at_level(logging.INFO, logger="cleanup"):
            t = time.monotonic()
            callback(SimpleNamespace(epoch=0, epochs=100))
            held = time.monotonic() - t
            callback(SimpleNamespace(epoch=1, epochs=100))  # the next pass finds the first one still busy
        assert held < 0.3 + 2.0, f"the callback held training {held:.1f} s"
        assert any("still busy after 0.3 s" in m for m in caplog.messages)
        assert any("cleanup skipped, another cleanup is running" in m for m in caplog.messages)
    finally:
        mounted.set()  # the NAS is back: the first pass finishes its copies
    deadline = time.monotonic() + 30
    while len(copies(backup_dir)) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(copies(backup_dir)) == 6


# --- the cleanup lock -------------------------------------------------------------------------------------------


def test_cleanup_lock_makes_the_second_cleanup_wait_or_skip(runs, caplog):
    make_exp(runs, "exp1")
    with caplog.at_level(logging.INFO, logger="cleanup"):
        with CleanupLock(runs):  # another cleanup holds it (flock: another open file)
            report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)  # the callback's way: no wait
            assert report.skipped and report.trashed == [] and (runs / "exp1").is_dir()
            assert any("cleanup skipped, another cleanup is running" in m for m in caplog.messages)

        holder = CleanupLock(runs).acquire()
        threading.Timer(0.3, holder.release).start()  # the other cleanup ends soon
        report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0, lock_wait=10)
    assert not report.skipped and names(report.trashed) == ["exp1"]
    assert any("waiting up to 10 s" in m for m in caplog.messages)


# Both real processes import first, then wait for the same go file, so that their cleanups start together.
CRON_RUN = """
import sys, time
from pathlib import Path
import cleanup
Path(sys.argv[2]).touch()
while not Path(sys.argv[1]).exists():
    time.sleep(0.005)
sys.exit(cleanup.main(sys.argv[3:]))
"""
TRAINING_RUN = """
import logging, sys, time
from pathlib import Path
from types import SimpleNamespace
import cleanup
import ultralytics.utils  # loaded in a real training process before its first callback
logging.basicConfig(stream=sys.stdout, level=logging.INFO, format="%(message)s")
runs, archive, backup = sys.argv[3:]
callback = cleanup.make_callback(runs, 0, 0.9, 1, 0.0, 24.0, archive, backup)  # prune after every epoch
Path(sys.argv[2]).touch()
while not Path(sys.argv[1]).exists():
    time.sleep(0.005)
for epoch in range(8):
    callback(SimpleNamespace(epoch=epoch, epochs=8))
    time.sleep(0.1)
callback.budget_s = 120
callback.start_pass()  # and wait for it: the process must not end while its pass runs
"""


def test_a_cron_run_and_a_training_callback_at_once(runs, archive_dir, backup_dir, tmp_path):
    """Real processes, started at the same instant on the same runs folder: each trash entry is archived exactly
    once, each backup copied once, nothing is lost, and one of them met the other's lock."""
    payload = {}
    for n in range(1, 31):  # old trash entries, due for both
        entry = runs / ".trash" / f"exp{n}-20000101T000000Z"
        (entry / "weights").mkdir(parents=True)
        payload[entry.name] = os.urandom(1_000_000)
        (entry / "weights" / "last.pt").write_bytes(payload[entry.name])
    kept_runs(runs)  # exp1 and exp2 to back up; exp3 and exp4 to trash (they wait in the trash: not due yet)
    go = tmp_path / "go"
    procs = []
    for code, args in (
        (CRON_RUN, [runs, "--keep", "0", "--map", "0.9", "--archive-to", archive_dir, "--backup-to", backup_dir]),
        (TRAINING_RUN, [runs, archive_dir, backup_dir]),
    ):
        command = [sys.executable, "-c", code, go, tmp_path / f"ready{len(procs)}", *args]
        procs.append(subprocess.Popen(list(map(str, command)), cwd=ROOT, stdout=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready*"))) < 2:
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a process died while starting"
        time.sleep(0.01)
    go.touch()
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    print(*outs, sep="\n--- training ---\n")
    log_lines = "\n".join(outs).splitlines()

    assert not [line for line in log_lines if "not archived" in line or "could not" in line or "failed" in line]
    assert any("cleanup skipped, another cleanup is running" in m or "waiting up to" in m for m in log_lines), outs
    archived = sorted(p.name for p in archive_dir.iterdir())
    assert archived == sorted(f"{name}.tar" for name in payload)  # each once, no temp files
    assert sum(" archived to " in line for line in log_lines) == len(payload)  # by one process each
    for name, data in payload.items():
        with tarfile.open(archive_dir / f"{name}.tar") as tar:
            assert tar.extractfile(f"{name.partition('-')[0]}/weights/last.pt").read() == data
    assert sorted(p.name.partition("-")[0] for p in (runs / ".trash").iterdir()) == ["exp3", "exp4"]
    assert sorted(p.name for p in runs.glob("exp*")) == ["exp1", "exp2"]
    assert len(copies(backup_dir)) == 6 and sum(" backed up to " in line for line in log_lines) == 6


# --- restore ----------------------------------------------------------------------------------------------------


def write_tar(path: Path, members) -> Path:
    """A tar with the given (name, kind, content or link target) members, written member by member as an attacker
    (or a careless `tar -P`) could."""
    with tarfile.open(path, "w") as tar:
        for name, kind, value in members:
            info = tarfile.TarInfo(name)
            if kind == "file":
                info.size = len(value)
                tar.addfile(info, io.BytesIO(value))
            else:
                info.type, info.linkname = tarfile.SYMTYPE, value
                tar.addfile(info)
    return path


@pytest.mark.parametrize(
    "bad",
    [
        ("exp1/../../escaped.txt", "file", b"owned"),
        ("/tmp/yolofuse-restore-test-absolute.txt", "file", b"owned"),
        ("exp1/weights/escaped", "link", "../../../outside"),
        ("exp1/weights/absolute", "link", "/etc/passwd"),
    ],
    ids=["dotdot", "absolute", "link-outside", "absolute-link"],
)
def test_restore_refuses_members_that_escape(runs, tmp_path, bad):
    make_exp(runs, "exp1")
    archive = write_tar(tmp_path / "evil.tar", [("exp1/results.csv", "file", b"epoch\n"), bad])
    before = listing(tmp_path)

    with pytest.raises(yolofuse.archive.RestoreError, match=f"member '{re.escape(bad[0])}' refused.*nothing restored"):
        yolofuse.archive.restore(archive, runs)

    assert listing(tmp_path) == before  # no expN, no half-unpacked folder, nothing outside
    assert not Path("/tmp/yolofuse-restore-test-absolute.txt").exists()


def test_restore_from_the_command_line_says_one_line_and_fails(runs, tmp_path):
    archive = write_tar(tmp_path / "evil.tar.gz", [("../escaped.txt", "file", b"owned")])
    result = subprocess.run(
        [sys.executable, str(ROOT / "cleanup.py"), "--restore", str(archive), str(runs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "member '../escaped.txt' refused" in result.stderr
    assert list(runs.iterdir()) == [] and not (tmp_path / "escaped.txt").exists()


def test_restore_skips_the_numbers_of_archived_and_backed_up_experiments(runs, tmp_path, archive_dir, backup_dir):
    make_exp(runs, "exp1")
    (archive_dir / "exp7-20250101T000000Z.tar").write_bytes(b"")
    (backup_dir / "exp9").mkdir()
    make_run_tree(tmp_path / "exp2")
    subprocess.run(["tar", "-cf", str(tmp_path / "exp2.tar"), "-C", str(tmp_path), "exp2"], check=True)
    out = run_cli("--restore", tmp_path / "exp2.tar", runs, "--archive-to", archive_dir, "--backup-to", backup_dir)
    assert f"to {runs / 'exp10'}" in out and (runs / "exp10" / "weights" / "best.pt").is_file()


def test_restore_waits_for_a_cleanup_then_refuses_in_one_line(runs, tmp_path):
    make_run_tree(tmp_path / "exp2")
    subprocess.run(["tar", "-cf", str(tmp_path / "exp2.tar"), "-C", str(tmp_path), "exp2"], check=True)
    with CleanupLock(runs):  # a cleanup is pruning this runs folder
        with pytest.raises(yolofuse.archive.RestoreError) as refused:
            yolofuse.archive.restore(tmp_path / "exp2.tar", runs, lock_wait=0.3)
    assert "\n" not in str(refused.value) and "run it again" in str(refused.value)
    assert sorted(p.name for p in runs.iterdir()) == [".cleanup.lock"]  # nothing restored, nothing left half-done


def test_restore_takes_a_hand_made_tar_gz_to_the_next_free_exp(runs, tmp_path):
    make_exp(runs, "exp4")
    (runs / "exp9_best").mkdir()
    source = make_run_tree(tmp_path / "exp2")
    subprocess.run(["tar", "-czf", str(tmp_path / "exp2.tar.gz"), "-C", str(tmp_path), "exp2"], check=True)
    # exp9_best is exp9 renamed: its number is still in use
    assert yolofuse.archive.restore(tmp_path / "exp2.tar.gz", runs) == runs / "exp10"
    assert snapshot(runs / "exp10") == snapshot(source)
    assert sorted(p.name for p in runs.iterdir()) == [".cleanup.lock", "exp10", "exp4", "exp9_best"]


# --- dry run and age, from the command line ---------------------------------------------------------------------


def test_cli_dry_run_shows_archives_and_backups_and_changes_nothing(runs, archive_dir, backup_dir):
    trash_one(runs, "exp5")
    kept_runs(runs)
    before = listing(runs.parent)

    out = run_cli(runs, "--keep", "0", "--map", "0.9", "--archive-to", archive_dir, "--backup-to", backup_dir,
                  "--purge-trash", "--dry-run")  # fmt: skip

    assert listing(runs.parent) == before  # no lock file, no archive, no backup folder
    entry = runs / ".trash" / f"exp5-{T0_STAMP}"
    assert f"[dry run] {entry}  " in out and f"archived to {archive_dir / entry.name}.tar (--purge-trash)" in out
    for exp in ("exp1", "exp2"):
        assert f"[dry run] {runs / exp / 'weights' / 'best.pt'}  " in out
        assert f"backed up to {backup_dir / exp / 'weights' / 'best.pt'}" in out
    assert sum("[dry run]" in line and "backed up to" in line for line in out.splitlines()) == 6
    # exp3 and exp4 would be trashed, then archived by --purge-trash with exp5
    assert re.search(r"^archived +3 ", out, re.M) and re.search(r"^backed up +6 ", out, re.M)


def test_older_than_spares_young_experiments(runs, monkeypatch):
    for n in range(1, 4):
        make_exp(runs, f"exp{n}")
    day = 86400
    date_runs(runs, {"exp1": T0 - 20 * day, "exp2": T0 - 15 * day, "exp3": T0 - 3 * day})

    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0, min_age=cleanup.parse_age("14d"))

    assert names(report.trashed) == ["exp1", "exp2"]
    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp3", "kept: younger than 14d")]
    assert [cleanup.parse_age(a) for a in ("36h", "2w", "0.5d")] == [36 * 3600, 14 * day, day / 2]
    with pytest.raises(ValueError, match="14 days"):
        cleanup.parse_age("14 days")


def test_cli_older_than(runs, capsys):
    make_exp(runs, "exp1")  # made just now
    out = run_cli(runs, "--keep", "0", "--map", "2", "--older-than", "14d")
    assert "kept: younger than 14d" in out and (runs / "exp1").is_dir()
    with pytest.raises(SystemExit) as exit:
        cleanup.main([str(runs), "--older-than", "2 weeks"])
    assert exit.value.code == 2 and "--older-than" in capsys.readouterr().err


# --- with train_dual.py -----------------------------------------------------------------------------------------


def test_train_dual_archives_and_backs_up_with_its_constants(tmp_path, tiny_data, archive_dir, backup_dir):
    runs = tmp_path / "runs"
    old = runs / ".trash" / "exp1-20000101T000000Z"  # due long ago
    (old / "weights").mkdir(parents=True)
    (old / "weights" / "last.pt").write_bytes(b"old weights")
    best = make_exp(runs, "exp2", maps=(0.95,))
    (best / "weights" / "best.pt").write_bytes(b"the good model")
    (backup_dir / "exp3" / "weights").mkdir(parents=True)  # the backup of an exp3 gone from RUNS_DIR and its trash
    (backup_dir / "exp3" / "weights" / "best.pt").write_bytes(b"exp3's model")
    (runs / "weights").mkdir()
    (runs / "weights" / "last.pt").write_bytes(b"a broken run, archived before the fresh one starts")

    res = run_train_dual(
        f"RUNS_DIR={runs}", f"DATA={tiny_data}", "EPOCHS=1", f"ARCHIVE_DIR={archive_dir}", f"BACKUP_DIR={backup_dir}"
    )

    assert res.returncode == 0, res.stderr[-3000:]
    assert f"archived to {archive_dir / old.name}.tar" in res.stdout and not old.exists()
    with tarfile.open(archive_dir / f"{old.name}.tar") as tar:
        assert tar.extractfile("exp1/weights/last.pt").read() == b"old weights"
    assert (backup_dir / "exp2" / "weights" / "best.pt").read_bytes() == b"the good model"
    assert (backup_dir / "exp2" / "results.csv").read_bytes() == (best / "results.csv").read_bytes()
    assert f"Archived the previous run as {runs / 'exp4'}" in res.stdout  # not exp3: its backup would be overwritten
    assert (backup_dir / "exp3" / "weights" / "best.pt").read_bytes() == b"exp3's model"
