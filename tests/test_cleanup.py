"""cleanup.py on real folder trees in tmp_path; clock, ctime and free space are faked, nothing sleeps."""

import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cloudpickle
import pytest
import torch

import cleanup
from yolofuse.lock import RunLock

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


def fake_ctimes(monkeypatch, ctimes):
    """ctime by folder name (it can't be set on disk, and sleeping between mkdirs is slow and flaky)."""
    monkeypatch.setattr(cleanup, "_ctime", lambda path: ctimes[Path(path).name])


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
    assert sorted(p.name for p in runs.iterdir()) == [".trash", "Exp3", "exp5_best", "exp7", "exp9", "experiments"]
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
    assert after == before and ".train.lock" in after
    assert (runs / "weights" / "last.pt").read_bytes() == b"live weights"


# --- what is kept -----------------------------------------------------------------------------------------------


def test_newest_by_ctime_are_kept_not_highest_n(runs, monkeypatch):
    for n in range(1, 6):
        make_exp(runs, f"exp{n}")
    # exp2 is the newest although its N is small; exp4 and exp5 tie, so the larger N (exp5) counts as newer
    fake_ctimes(monkeypatch, {"exp1": 100, "exp2": 500, "exp3": 300, "exp4": 400, "exp5": 400})

    report = prune(runs, keep_latest=2, map_whitelist=2.0, now=T0)

    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp2", "kept: newest"), ("exp5", "kept: newest")]
    assert names(report.trashed) == ["exp1", "exp3", "exp4"]
    assert sorted(p.name for p in runs.iterdir() if p.name.startswith("exp")) == ["exp2", "exp5"]


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


def test_checkpoint_is_the_fallback_when_results_csv_is_broken(runs, caplog):
    ok = make_exp(runs, "exp1")
    (ok / "results.csv").write_bytes(b"\x00\xff garbage, not a csv \x00")
    torch.save({"train_metrics": {"metrics/mAP50(B)": 0.91}}, ok / "weights" / "best.pt")
    no_csv = make_exp(runs, "exp2")
    (no_csv / "results.csv").unlink()
    torch.save({"train_metrics": {"metrics/mAP50(B)": 0.95}}, no_csv / "weights" / "best.pt")
    neither = make_exp(runs, "exp3")
    (neither / "results.csv").write_text(HEADER + "\n")  # header only: the run died before epoch 1

    with caplog.at_level(logging.INFO, logger="cleanup"):
        report = prune(runs, keep_latest=0, map_whitelist=0.8, now=T0)

    kept = {Path(p).name: r for p, _, r in report.kept}
    assert kept == {"exp1": "kept: whitelisted mAP50=0.91", "exp2": "kept: whitelisted mAP50=0.95"}
    assert names(report.trashed) == ["exp3"]
    line = next(m for m in caplog.messages if "exp3" in m and "trashed" in m)
    assert "not whitelisted" in line and "no mAP50 number" in line and "best.pt missing" in line


def test_keep_file_is_honoured(runs):
    (make_exp(runs, "exp1") / ".keep").touch()
    make_exp(runs, "exp2")

    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)

    assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp1", "kept: .keep")]
    assert names(report.trashed) == ["exp2"]


def test_a_run_locked_by_a_live_training_is_kept(runs):
    exp = make_exp(runs, "exp1")
    with RunLock(exp):
        report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)
        assert [(Path(p).name, r) for p, _, r in report.kept] == [("exp1", "kept: in use")]
        assert exp.is_dir()
    report = prune(runs, keep_latest=0, map_whitelist=2.0, now=T0)  # lock released: fair game
    assert names(report.trashed) == ["exp1"]


def test_decide_applies_reasons_in_order():
    def cand(n, ctime, map50=None, keep=False, in_use=False):
        return cleanup.Candidate(Path(f"exp{n}"), n, ctime, 0, map50, "test", keep, in_use)

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
    fake_ctimes(monkeypatch, {f"exp{n}": n for n in range(1, 5)})
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
    )


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
    assert sorted(p.name for p in runs.iterdir()) == [".trash", "exp1", "exp3"]
    assert trash_names(runs) == []
