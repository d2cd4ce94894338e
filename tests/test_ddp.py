"""Multi-GPU training, the real DDP code path, on 2 CPU processes with gloo (YOLOFUSE_CPU_DDP=2, see yolofuse/ddp.py).

train_dual.py runs through tests/killer.py, whose KILLER_DDP_PROBE adds tests/ddp_probe.py's callbacks: Ultralytics
pickles them into its DDP workers with ours, and there they record each rank's PID, writes, prune calls and resume
state, and can pause a rank at a chosen instant. Everything else is the real code: the launcher, FuseTrainer,
Ultralytics' generate_ddp_command and its temp file, torch.distributed.run.

One run folder goes through five launches, each a module fixture that needs the one before:
  1. fresh: 3 epochs, uninterrupted, beside archived experiments;
  2. group_killed: the next launch archives it, starts fresh, and is SIGKILLed after epoch 2 (launcher, then group);
  3. sigtermed: the re-run gets SIGTERM while its workers start;
  4. worker_killed: the re-run resumes at epoch 3, and one worker is SIGKILLed mid-epoch;
  5. finished: the re-run resumes at epoch 3 and finishes.

On a machine with 2 GPUs, `YOLOFUSE_TEST_DDP_DEVICE=0,1 pytest tests/test_ddp.py` runs the same launches on them,
with stock NCCL and no CPU switch.
"""

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import psutil
import pytest
import torch
from conftest import killer_cmd, make_dataset, make_old_experiments
from test_train_dual import assert_same_optimizer_state, csv_epochs, load_ckpt, run_snapshot, snapshot

from yolofuse import checkpoint, replay
from yolofuse.lock import LOCK_NAME, is_locked

DEVICE = os.environ.get("YOLOFUSE_TEST_DDP_DEVICE", "cpu")  # "cpu": 2 CPU ranks; "0,1": two GPUs
EPOCHS = 3
POLICY = ("CLEANUP_EVERY=2", "KEEP_LATEST=1", "MAP_WHITELIST=0.9", "MIN_FREE_GB=0")  # prune due after epoch 2 only
MOSAIC = "CLOSE_MOSAIC=0"  # mosaic in every epoch: the one after a resume draws from the restored buffers
DROPOUT = 0.5  # MODALITY_DROPOUT: half the samples with one sensor blanked, on both ranks, replayed on resume
LAUNCH_TIMEOUT = 420  # s for one launch; 10 to 50 s on a 2-core CPU, depending on the other jobs
WORKERS_GONE_TIMEOUT = 30  # s
DONE = re.compile(r"^Done\. best\.pt: (\S+)  mAP50 (\S+)  mAP50-95 (\S+)$", re.MULTILINE)

_launches = []


class Probed:
    """A launch of train_dual.py (through killer.py) on 2 DDP ranks whose probes record in `folder`."""

    folder: Path

    def running(self) -> bool:
        raise NotImplementedError

    def tail(self) -> str:
        raise NotImplementedError

    def ranks(self) -> dict[int, list[dict]]:
        """rank -> the JSON lines its probe wrote (a line still being written is left out)."""
        logs = {}
        for path in sorted(self.folder.glob("rank*.jsonl")):
            lines = path.read_text().splitlines(keepends=True)
            logs[int(path.stem[4:])] = [json.loads(line) for line in lines if line.endswith("\n")]
        return logs

    def workers(self) -> list[psutil.Process]:
        """The ranks' processes, by the PIDs their probes recorded."""
        found = []
        for log in self.ranks().values():
            try:
                found.append(psutil.Process(log[0]["pid"]))
            except psutil.NoSuchProcess:
                pass
        return found

    def wait_paused(self) -> int:
        """Wait until the probe paused a rank and both ranks have started; returns the paused rank's PID."""
        paused, deadline = self.folder / "paused", time.monotonic() + LAUNCH_TIMEOUT
        while not (paused.exists() and paused.read_text() and len(self.ranks()) == 2):
            assert self.running(), f"the launch ended unpaused\n{self.tail()}"
            assert time.monotonic() < deadline, f"no pause\n{self.tail()}"
            time.sleep(0.05)
        return int(paused.read_text())


class Launch(Probed):
    """killer.py in the background as 2 DDP ranks, in a session of its own; probe records in `folder`."""

    def __init__(self, story, name: str, pause: str = ""):
        self.folder = story.base / name
        self.folder.mkdir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_DDP_PROBE": str(self.folder), "KILLER_DDP_PAUSE": pause}
        env["YOLOFUSE_CPU_DDP"] = "2" if DEVICE == "cpu" else ""
        env["YOLO_CONFIG_DIR"] = str(story.base / "config")  # the DDP temp files of killed launches stay in here
        settings = (
            f"RUNS_DIR={story.runs}",
            f"DATA={story.data}",
            f"EPOCHS={EPOCHS}",
            f"DEVICE={DEVICE}",
            MOSAIC,
            f"MODALITY_DROPOUT={DROPOUT}",
            "PLOTS=True",  # rank 0 draws them
            *POLICY,
        )
        with open(self.folder / "stdout", "w") as out, open(self.folder / "stderr", "w") as err:
            self.proc = subprocess.Popen(killer_cmd(*settings), stdout=out, stderr=err, env=env, start_new_session=True)
        _launches.append(self)

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout").read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return (self.folder / "stderr").read_text(errors="replace")

    def tail(self) -> str:
        return f"--- stdout ---\n{self.stdout[-3000:]}\n--- stderr ---\n{self.stderr[-3000:]}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> int:
        return self.proc.wait(timeout=LAUNCH_TIMEOUT)


def alive(processes) -> list[psutil.Process]:
    """The processes still running (a zombie has exited: only its status is left for its parent to read)."""
    running = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            pass
    return running


def wait_gone(processes, timeout: float) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while alive(processes) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(processes)


def written(launch: Launch, rank: int, runs: Path) -> list[tuple[int, str]]:
    """(epoch, path relative to runs) of every write of `rank` inside the run folder."""
    return [
        (entry["epoch"], os.path.relpath(entry["write"], runs))
        for entry in launch.ranks().get(rank, [])
        if "write" in entry and Path(entry["write"]).is_relative_to(runs)
    ]


def run_files(runs: Path) -> dict[str, str]:
    """snapshot() of what archiving moves (checkpoint.run_files): weights/ and the plain files at the top."""
    return {
        rel: digest
        for rel, digest in snapshot(runs).items()
        if rel.startswith("weights/") or ("/" not in rel and not rel.startswith("."))
    }


def final_state(runs: Path) -> tuple[dict, pd.DataFrame]:
    """A finished run's weights (the stripped last.pt keeps the EMA as `model`) and results.csv without times."""
    model = load_ckpt(runs / "weights" / "last.pt")["model"].state_dict()
    return model, pd.read_csv(runs / "results.csv").drop(columns="time")


def setup_of(launch: Launch) -> dict[int, dict]:
    """rank -> its record after the trainer's setup (start_epoch, world_size, modality_dropout)."""
    return {rank: next(e for e in log if "start_epoch" in e) for rank, log in launch.ranks().items()}


def assert_resumed_at_epoch_3(launch: Launch, saved: dict, exact: dict) -> None:
    """Both ranks started at epoch index 2 with the optimizer state of last.pt after epoch 2: `saved` is stock's
    dict, `exact` its exact-resume state (`replay.load_state`)."""
    assert sorted(setup_of(launch)) == [0, 1], launch.tail()
    for rank, setup in setup_of(launch).items():
        assert setup == {"start_epoch": 2, "world_size": 2, "modality_dropout": DROPOUT}, (rank, setup)
        resumed = load_ckpt(launch.folder / f"rank{rank}.optimizer.pt")
        assert_same_optimizer_state(exact["optimizer"], resumed, exact=True)  # stock's, with what it rounds in FP32
        assert_same_optimizer_state(saved["optimizer"], resumed, exact=False)  # the stock FP16 one


@pytest.fixture(scope="module", autouse=True)
def _no_leftover_processes():
    """A failed test leaves no launcher, torch.distributed.run or worker behind."""
    yield
    for launch in _launches:
        if launch.proc.poll() is None:
            os.killpg(launch.proc.pid, signal.SIGKILL)
            launch.proc.wait()
        for worker in alive(launch.workers()):
            worker.kill()


# ----------------------------------------------------------------------------------------------------------------------
# The five launches


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    """A run folder holding archived experiments (conftest.make_old_experiments)."""
    base = tmp_path_factory.mktemp("ddp")
    runs = base / "runs"
    make_old_experiments(runs)
    (runs / "exp5_best" / "notes.txt").write_text("mine")
    return SimpleNamespace(base=base, runs=runs, data=make_dataset(base / "data"), archives=snapshot(runs))


@pytest.fixture(scope="module")
def fresh(story):
    launch = Launch(story, "1-fresh")
    rc = launch.wait()
    last, best = story.runs / "weights" / "last.pt", story.runs / "weights" / "best.pt"
    return SimpleNamespace(
        launch=launch,
        rc=rc,
        csv=csv_epochs(story.runs),
        state=checkpoint.probe(last, EPOCHS).state,
        best_metrics=load_ckpt(best)["train_metrics"] if best.exists() else None,
        final=final_state(story.runs) if rc == 0 else None,
        run=run_files(story.runs),
        archives=snapshot(story.runs),
    )


@pytest.fixture(scope="module")
def group_killed(story, fresh):
    """SIGKILL of the launcher alone, then of its whole process group. The workers must end with the launcher: the
    group kill would miss them (torch.distributed.run starts them in sessions of their own), and torch.distributed.run
    outlives a SIGKILL of the launcher."""
    launch = Launch(story, "2-group-killed", pause="0:1:on_fit_epoch_end")
    launch.wait_paused()
    workers = launch.workers()
    os.kill(launch.proc.pid, signal.SIGKILL)
    rc = launch.wait()
    survivors = wait_gone(workers, WORKERS_GONE_TIMEOUT)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(launch.proc.pid, signal.SIGKILL)  # torch.distributed.run, if it is still there
    return SimpleNamespace(
        launch=launch,
        rc=rc,
        survivors=survivors,
        saved=load_ckpt(story.runs / "weights" / "last.pt"),
        exact=replay.load_state(story.runs / "weights" / "last.pt"),
        csv=csv_epochs(story.runs),
        exp6=run_snapshot(story.runs / "exp6") if (story.runs / "exp6").is_dir() else {},
    )


@pytest.fixture(scope="module")
def sigtermed(story, group_killed):
    launch = Launch(story, "3-sigtermed", pause="0:-1:start")  # rank 0 starting, before _setup_ddp
    launch.wait_paused()
    workers = launch.workers()
    launch.proc.send_signal(signal.SIGTERM)  # to the launcher only, as a job scheduler or `kill` does
    rc = launch.wait()
    return SimpleNamespace(
        launch=launch,
        rc=rc,
        survivors=alive(workers),  # at the instant the launcher is gone
        locked=is_locked(story.runs),
        last_epoch=load_ckpt(story.runs / "weights" / "last.pt")["epoch"],
    )


@pytest.fixture(scope="module")
def worker_killed(story, sigtermed):
    csv = story.runs / "results.csv"
    rows = csv.read_text().splitlines(keepends=True)
    csv.write_text("".join(rows) + "3" + rows[-1][rows[-1].index(",") :])  # epoch 3's row, as if killed before its save
    launch = Launch(story, "4-worker-killed", pause="1:2:on_train_batch_end")
    pid = launch.wait_paused()
    workers = launch.workers()
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    rc = launch.wait()
    return SimpleNamespace(
        launch=launch,
        rc=rc,
        seconds=time.monotonic() - t0,
        survivors=alive(workers),
        locked=is_locked(story.runs),
        last_epoch=load_ckpt(story.runs / "weights" / "last.pt")["epoch"],
        csv=csv_epochs(story.runs),
    )


@pytest.fixture(scope="module")
def finished(story, worker_killed):
    launch = Launch(story, "5-finished")
    rc = launch.wait()
    return SimpleNamespace(
        launch=launch,
        rc=rc,
        csv=csv_epochs(story.runs),
        state=checkpoint.probe(story.runs / "weights" / "last.pt", EPOCHS).state,
        final=final_state(story.runs) if rc == 0 else None,
    )


# ----------------------------------------------------------------------------------------------------------------------
# 1. A fresh run reaches its last epoch; only rank 0 writes checkpoints, plots and results.csv


def test_fresh_run_trains_every_epoch_and_only_rank_0_writes(story, fresh):
    launch = fresh.launch
    assert fresh.rc == 0, launch.tail()
    assert DEVICE != "cpu" or "2 CPU processes" in launch.stdout, launch.tail()
    setup = {"start_epoch": 0, "world_size": 2, "modality_dropout": DROPOUT}
    assert setup_of(launch) == {r: setup for r in (0, 1)}, launch.tail()
    assert fresh.csv == [1, 2, 3]
    assert fresh.state == "finished", "the final strip did not happen"
    assert written(launch, 1, story.runs) == [], "rank 1 wrote into the run folder"
    files = {path for _, path in written(launch, 0, story.runs)}
    assert {"weights/last.pt", "weights/best.pt", "results.csv", "train_batch0.jpg", "results.png"} <= files, files


def test_done_line_after_ddp_prints_the_metrics_of_best_pt(story, fresh):
    """Issue 15.6: the launching process never validates under DDP; "Done." printed mAP nan."""
    assert fresh.rc == 0, fresh.launch.tail()
    done = DONE.search(fresh.launch.stdout)
    assert done, fresh.launch.tail()
    assert done[1] == str(story.runs / "weights" / "best.pt")
    assert done[2] == f"{fresh.best_metrics['metrics/mAP50(B)']:.3f}"
    assert done[3] == f"{fresh.best_metrics['metrics/mAP50-95(B)']:.3f}"


# ----------------------------------------------------------------------------------------------------------------------
# 2. Cleanup: on rank 0 only, exactly on the due epochs; archives and the lock survive the fresh DDP start


def test_prune_runs_on_rank_0_only_on_due_epochs_and_the_archives_survive(story, fresh):
    assert fresh.rc == 0, fresh.launch.tail()
    prunes = {rank: [e["epoch"] for e in log if "prune" in e] for rank, log in fresh.launch.ranks().items()}
    assert prunes == {0: [1], 1: []}, prunes  # CLEANUP_EVERY=2 of 3 epochs; not after final_eval's extra callback
    newest = [line for line in fresh.launch.stdout.splitlines() if line.endswith("exp5  29 B  kept: newest")]
    assert len(newest) == 2, newest  # every decision on one line: before training (launcher), after epoch 2 (rank 0)
    assert (story.runs / LOCK_NAME).is_file(), "the run lock was deleted"
    exps = sorted(p.name for p in story.runs.iterdir() if p.name.startswith("exp"))
    assert exps == ["exp2", "exp3", "exp5", "exp5_best"]  # kept: whitelisted, .keep, newest, renamed
    kept = {rel: digest for rel, digest in story.archives.items() if rel.split("/")[0] in exps}
    assert {rel: fresh.archives[rel] for rel in kept} == kept, "a kept experiment changed"
    trashed = sorted(p.name.rpartition("-")[0] for p in (story.runs / ".trash").iterdir())
    assert trashed == ["exp1", "exp4"]


# ----------------------------------------------------------------------------------------------------------------------
# 5. The next launch archives a finished DDP run like a single-process one


def test_finished_ddp_run_is_archived_by_the_next_launch(story, fresh, group_killed):
    assert fresh.rc == 0, fresh.launch.tail()
    assert "Finished run" in group_killed.launch.stdout and "exp6" in group_killed.launch.stdout
    assert group_killed.exp6 == fresh.run, "the archive is not the finished run, file for file"


# ----------------------------------------------------------------------------------------------------------------------
# 3. SIGKILL after epoch 2 (launcher, then its group): no worker survives; the re-run resumes at epoch 3 on both ranks


def test_sigkill_after_epoch_2_leaves_no_worker_running(group_killed):
    assert group_killed.rc == -signal.SIGKILL, group_killed.launch.tail()
    assert group_killed.survivors == [], "DDP workers outlived their SIGKILLed launcher"
    assert group_killed.saved["epoch"] == 1 and group_killed.csv == [1, 2]


def test_rerun_after_group_sigkill_resumes_at_epoch_3_on_both_ranks(group_killed, worker_killed, finished):
    # (the launch before it, SIGTERMed while starting, never trained)
    assert_resumed_at_epoch_3(worker_killed.launch, group_killed.saved, group_killed.exact)
    assert worker_killed.csv == [1, 2], "the row of the unsaved epoch 3 was not dropped on resume"
    assert finished.rc == 0, finished.launch.tail()
    assert finished.csv == [1, 2, 3], "an epoch is missing or repeated"
    assert finished.state == "finished"


def test_killed_and_resumed_run_ends_bit_identical_to_the_uninterrupted_one(fresh, finished):
    """Both are fresh 3-epoch runs with the same settings; the second was killed after epoch 2 and resumed."""
    assert fresh.rc == 0 and finished.rc == 0, finished.launch.tail()
    (straight, straight_csv), (resumed, resumed_csv) = fresh.final, finished.final
    assert straight.keys() == resumed.keys()
    different = [k for k in straight if not torch.equal(straight[k], resumed[k])]
    assert not different, f"{len(different)} of {len(straight)} tensors differ, e.g. {different[:3]}"
    pd.testing.assert_frame_equal(straight_csv, resumed_csv, check_exact=True)


def test_rank_1_never_writes_into_the_run_folder_on_resume_or_kill(story, group_killed, worker_killed, finished):
    for launch in (group_killed.launch, worker_killed.launch, finished.launch):
        assert written(launch, 1, story.runs) == [], f"rank 1 wrote into the run folder in {launch.folder.name}"


# ----------------------------------------------------------------------------------------------------------------------
# Issue 15.7: SIGTERM to the launcher ends the workers before the run lock is released, even workers still starting


def test_sigterm_ends_the_workers_before_the_lock_is_released(story, sigtermed):
    launch = sigtermed.launch
    assert sigtermed.rc == 130, launch.tail()
    assert re.search(r"python train_dual\.py.* again", launch.stderr), launch.tail()
    assert sigtermed.survivors == [], "workers still ran after the launcher released the lock"
    assert not sigtermed.locked
    assert sigtermed.last_epoch == 1


# ----------------------------------------------------------------------------------------------------------------------
# 4. SIGKILL of one worker mid-epoch: the launcher ends soon with a line saying to re-run; the re-run resumes


def test_one_worker_sigkill_ends_the_launch_with_a_line_to_rerun(story, worker_killed):
    launch = worker_killed.launch
    assert worker_killed.rc == 1, launch.tail()
    assert worker_killed.seconds < 60, f"the launcher took {worker_killed.seconds:.0f} s to end"
    last_line = launch.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: multi-GPU training stopped"), last_line
    assert "train_dual.py` again to resume" in last_line, last_line
    assert worker_killed.survivors == [] and not worker_killed.locked
    assert worker_killed.last_epoch == 1


def test_rerun_after_a_worker_died_resumes_at_epoch_3(group_killed, worker_killed, finished):
    assert "Unfinished run" in finished.launch.stdout, finished.launch.tail()
    assert_resumed_at_epoch_3(finished.launch, group_killed.saved, group_killed.exact)
    assert finished.rc == 0 and finished.csv == [1, 2, 3], finished.launch.tail()
