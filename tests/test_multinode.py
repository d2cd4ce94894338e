"""Multi-node training under torchrun, on CPU: two "nodes" on this machine, one gloo rank each.

Each node is `python -m torch.distributed.run --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d --rdzv-endpoint
127.0.0.1:PORT` of tests/killer.py, i.e. train_dual.py with tests/ddp_probe.py's records (see test_ddp.py), in a
session of its own. c10d numbers the nodes by address: node 0 gets --local-addr 127.0.0.1 and so rank 0.

One run folder goes through four jobs, each a module fixture that needs the one before:
  1. fresh: 3 epochs, uninterrupted, beside archived experiments and a results.csv left by a run killed before its
     first checkpoint;
  2. node_killed: the next job archives it, starts fresh, and node 1 dies in epoch 3: its torchrun is SIGKILLed, and
     its rank ends itself within a second;
  3. sigtermed: the re-run resumes at epoch 3; every process of both nodes gets SIGTERM, as SLURM signals a job.
     While it trains, a second job on the same RUNS_DIR, and one with DEVICE="0,1", are refused;
  4. finished: the same command again resumes at epoch 3 and finishes, bit-identical to job 1.
Then a job whose nodes don't share RUNS_DIR is refused, with that finished run in rank 0's RUNS_DIR; and one node
with two processes (`torchrun --standalone --nproc-per-node 2`) trains job 1's run again, bit for bit.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import killer_cmd, make_dataset, make_old_experiments
from test_ddp import (
    DROPOUT,
    EPOCHS,
    LAUNCH_TIMEOUT,
    MOSAIC,
    POLICY,
    Probed,
    alive,
    assert_resumed_at_epoch_3,
    final_state,
    setup_of,
    wait_gone,
    written,
)
from test_train_dual import csv_epochs, load_ckpt, snapshot

from yolofuse import checkpoint, replay
from yolofuse.ddp import SHARED_PROOF
from yolofuse.lock import LOCK_NAME, is_locked

NODES = 2
GONE_TIMEOUT = 30  # s for the processes of a job to end after a kill or SIGTERM
SHARED_WAIT = "3"  # s the other ranks wait to see rank 0's file in RUNS_DIR (YOLOFUSE_SHARED_WAIT; 120 by default)
LOST = "error: training stopped: another rank is gone"
RERUN = "Run the same torchrun command (on every node) again to resume."

_jobs = []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Job(Probed):
    """One torchrun per node, each in a session of its own; node N's output in `folder`/nodeN, probe records too.

    `runs`: each node's RUNS_DIR (the story's by default); `one_node`: a single torchrun with 2 processes instead.
    """

    def __init__(self, story, name: str, pause="", runs=None, settings=(), one_node=False):
        self.folder = story.base / name
        self.folder.mkdir()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_DDP_PROBE": str(self.folder), "KILLER_DDP_PAUSE": pause}
        env["YOLO_CONFIG_DIR"] = str(story.base / "config")
        env["YOLOFUSE_SHARED_WAIT"] = SHARED_WAIT
        port, runs = free_port(), runs or (story.runs,) * NODES
        self.nodes = []
        for node in range(1 if one_node else NODES):
            torchrun = [sys.executable, "-m", "torch.distributed.run"]
            if one_node:
                torchrun += ["--standalone", f"--nproc-per-node={NODES}"]
            else:
                torchrun += [f"--nnodes={NODES}", "--nproc-per-node=1", "--rdzv-backend=c10d"]
                torchrun += [f"--rdzv-endpoint=127.0.0.1:{port}", f"--local-addr=127.0.0.{node + 1}"]
            args = (f"RUNS_DIR={runs[node]}", f"DATA={story.data}", f"EPOCHS={EPOCHS}", "DEVICE=cpu", MOSAIC, *POLICY)
            args += (f"MODALITY_DROPOUT={DROPOUT}",)
            cmd = torchrun + killer_cmd(*args, *settings)[1:]
            with open(self.folder / f"node{node}", "w") as out:
                self.nodes.append(
                    subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                )
        _jobs.append(self)

    def output(self, node: int) -> str:
        return (self.folder / f"node{node}").read_text(errors="replace")

    def tail(self) -> str:
        return "\n".join(f"--- node {n} ---\n{self.output(n)[-3000:]}" for n in range(len(self.nodes)))

    def said(self, node: int) -> list[str]:
        """The lines in which train_dual.py told the user how it ended (torchrun's own report follows them)."""
        return [line for line in self.output(node).splitlines() if line.startswith(("error:", "Interrupted:"))]

    def processes(self, node: int) -> list[psutil.Process]:
        """torchrun of `node` and everything it started (its rank runs in a session of its own)."""
        try:
            torchrun = psutil.Process(self.nodes[node].pid)
            return [torchrun, *torchrun.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def running(self) -> bool:
        return all(node.poll() is None for node in self.nodes)

    def wait(self) -> list[int]:
        return [node.wait(timeout=LAUNCH_TIMEOUT) for node in self.nodes]


@pytest.fixture(scope="module", autouse=True)
def _no_leftover_processes():
    """A failed test leaves no torchrun or rank behind."""
    yield
    for job in _jobs:
        for process in alive([p for node in range(len(job.nodes)) for p in job.processes(node)] + job.workers()):
            process.kill()
        for node in job.nodes:
            node.wait()


def ended(job: Job, runs: Path) -> SimpleNamespace:
    """`job` once it has ended, and what it left in `runs`."""
    rcs = job.wait()
    return SimpleNamespace(
        job=job,
        rcs=rcs,
        csv=csv_epochs(runs),
        state=checkpoint.probe(runs / "weights" / "last.pt", EPOCHS).state,
        final=final_state(runs) if not any(rcs) else None,
    )


def assert_says_rerun(job: Job, node: int) -> None:
    """The rank on `node` ended with one line saying to re-run: the lost-rank line, or "Interrupted" when torchrun
    stopped it (torchrun does when it loses its rendezvous, i.e. when the lost node hosted it; or on SIGTERM)."""
    said = job.said(node)
    assert len(said) == 1, job.tail()
    assert said[0].startswith(("Interrupted:", LOST)) and said[0].lower().endswith(RERUN.lower()), said


def run_folder(runs: Path) -> dict[str, str]:
    """Every file under `runs` but the lock file, whose content is the PID of the last process that took it."""
    return {rel: digest for rel, digest in snapshot(runs).items() if rel != LOCK_NAME}


# ----------------------------------------------------------------------------------------------------------------------
# The jobs


@pytest.fixture(scope="module")
def story(tmp_path_factory):
    base = tmp_path_factory.mktemp("multinode")
    runs = base / "runs"
    make_old_experiments(runs)
    return SimpleNamespace(base=base, runs=runs, data=make_dataset(base / "data"))


@pytest.fixture(scope="module")
def fresh(story):
    (story.runs / "results.csv").write_text("epoch,time\n1,9.5\n")  # a run killed before its first checkpoint
    return ended(Job(story, "1-fresh"), story.runs)


@pytest.fixture(scope="module")
def node_killed(story, fresh):
    """Rank 1 pauses in epoch 3, after epoch 2 is saved (rank 0 then waits for it in a collective). Then node 1 dies:
    its torchrun is SIGKILLed, and its rank, which torchrun started in a session of its own, must end itself."""
    job = Job(story, "2-node-killed", "1:2:on_train_batch_end")
    job.wait_paused()
    everyone = job.processes(0) + job.processes(1)
    job.processes(1)[0].kill()
    t0 = time.monotonic()
    rc = job.nodes[0].wait(timeout=LAUNCH_TIMEOUT)
    return SimpleNamespace(
        job=job,
        rc=rc,
        seconds=time.monotonic() - t0,
        survivors=wait_gone(everyone, GONE_TIMEOUT),
        locked=is_locked(story.runs),
        saved=load_ckpt(story.runs / "weights" / "last.pt"),
        exact=replay.load_state(story.runs / "weights" / "last.pt"),
        csv=csv_epochs(story.runs),
    )


@pytest.fixture(scope="module")
def sigtermed(story, node_killed):
    """SIGTERM to every process of both nodes while rank 1 is paused in epoch 3, as SLURM signals a job's steps (or
    pre-empts it). Before that, while it trains, two more jobs are started and refused."""
    job = Job(story, "3-sigtermed", "1:2:on_train_batch_end")
    job.wait_paused()
    before = run_folder(story.runs)
    second = Job(story, "3a-second-job")
    second_rcs = second.wait()
    device_list = Job(story, "3b-device-list", settings=["DEVICE=0,1"])
    device_rcs = device_list.wait()
    untouched = run_folder(story.runs) == before
    everyone = job.processes(0) + job.processes(1)
    for process in everyone:
        process.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    rcs = job.wait()
    return SimpleNamespace(
        job=job,
        rcs=rcs,
        seconds=time.monotonic() - t0,
        survivors=wait_gone(everyone, GONE_TIMEOUT),
        locked=is_locked(story.runs),
        last_epoch=load_ckpt(story.runs / "weights" / "last.pt")["epoch"],
        second=second,
        second_rcs=second_rcs,
        device_list=device_list,
        device_rcs=device_rcs,
        untouched=untouched,
    )


@pytest.fixture(scope="module")
def finished(story, sigtermed):
    return ended(Job(story, "4-finished"), story.runs)


@pytest.fixture(scope="module")
def one_node(story, fresh):
    """`torchrun --standalone --nproc-per-node 2`: the same fresh run as job 1, on one node, in a run folder of its
    own."""
    runs = story.base / "one-node-runs"
    return SimpleNamespace(**vars(ended(Job(story, "6-one-node", runs=(runs,), one_node=True), runs)), runs=runs)


@pytest.fixture(scope="module")
def not_shared(story, fresh):
    """Node 1's RUNS_DIR is another folder (on a real cluster: the same path on a disk of its own). Rank 0's holds a
    finished run (job 1's, or job 4's when every test runs), which it would archive if it went on."""
    elsewhere = story.base / "node1-runs"
    before = run_folder(story.runs)
    job = Job(story, "5-not-shared", runs=(story.runs, elsewhere))
    rcs = job.wait()
    return SimpleNamespace(job=job, rcs=rcs, elsewhere=elsewhere, untouched=run_folder(story.runs) == before)


# ----------------------------------------------------------------------------------------------------------------------
# 1. A fresh run: every epoch once; rank 1 writes nothing into the run folder; cleanup on rank 0 only


def test_fresh_run_trains_every_epoch_once_and_only_rank_0_writes(story, fresh):
    job = fresh.job
    assert fresh.rcs == [0, 0], job.tail()
    setup = {"start_epoch": 0, "world_size": 2, "modality_dropout": DROPOUT}
    assert setup_of(job) == {r: setup for r in (0, 1)}, job.tail()
    assert fresh.csv == [1, 2, 3], "an epoch is missing or repeated (or the stale row survived)"
    assert fresh.state == "finished"
    assert written(job, 1, story.runs) == [], "rank 1 wrote into the run folder"
    files = {path for _, path in written(job, 0, story.runs)}
    assert {"weights/last.pt", "weights/best.pt", "results.csv", LOCK_NAME} <= files, files
    assert not (story.runs / SHARED_PROOF).exists()
    assert "Done. best.pt:" in job.output(0) and "Done." not in job.output(1)


def test_cleanup_runs_on_rank_0_only(story, fresh):
    assert fresh.rcs == [0, 0], fresh.job.tail()
    prunes = {rank: [e["epoch"] for e in log if "prune" in e] for rank, log in fresh.job.ranks().items()}
    assert prunes == {0: [-1, 1], 1: []}, prunes  # before training, then CLEANUP_EVERY=2 of 3 epochs
    exps = sorted(p.name for p in story.runs.iterdir() if p.name.startswith("exp"))
    assert exps == ["exp2", "exp3", "exp5", "exp5_best"]  # whitelisted, .keep, newest, renamed


# ----------------------------------------------------------------------------------------------------------------------
# 2. One node SIGKILLed after epoch 2: the other ends within seconds with one line; nothing survives; the lock is free


def test_node_killed_the_other_ends_within_seconds_with_the_rerun_line(story, node_killed):
    job = node_killed.job
    assert "Finished run" in job.output(0), job.tail()  # the fresh run was archived first
    assert node_killed.rc == 1, job.tail()
    assert node_killed.seconds < 20, f"node 0 took {node_killed.seconds:.0f} s to end"
    assert_says_rerun(job, 0)
    assert node_killed.survivors == [], "processes of the job outlived it"
    assert not node_killed.locked
    assert node_killed.saved["epoch"] == 1 and node_killed.csv == [1, 2]


# ----------------------------------------------------------------------------------------------------------------------
# 3. SIGTERM to every process (SLURM's signal before the time limit, or a pre-emption), then the same command again


def test_sigterm_to_every_process_ends_the_job_with_the_rerun_line(story, sigtermed):
    job = sigtermed.job
    assert "Unfinished run" in job.output(0), job.tail()
    assert sigtermed.seconds < 20, f"the job took {sigtermed.seconds:.0f} s to end"
    for node in range(NODES):
        assert_says_rerun(job, node)
    assert sigtermed.survivors == [] and not sigtermed.locked, job.tail()
    assert sigtermed.last_epoch == 1


def test_both_nodes_rerun_resume_at_epoch_3_and_end_bit_identical_to_the_uninterrupted_run(
    story, fresh, node_killed, sigtermed, finished
):
    for job in (sigtermed.job, finished.job):
        assert_resumed_at_epoch_3(job, node_killed.saved, node_killed.exact)
    assert finished.rcs == [0, 0], finished.job.tail()
    assert finished.csv == [1, 2, 3] and finished.state == "finished"
    (straight, straight_csv), (resumed, resumed_csv) = fresh.final, finished.final
    different = [k for k in straight if not straight[k].equal(resumed[k])]
    assert straight.keys() == resumed.keys() and not different, f"{len(different)} tensors differ: {different[:3]}"
    assert straight_csv.equals(resumed_csv)


def test_rank_1_never_writes_into_the_run_folder(story, fresh, node_killed, sigtermed, finished):
    for job in (fresh.job, node_killed.job, sigtermed.job, finished.job):
        assert written(job, 1, story.runs) == [], f"rank 1 wrote into the run folder in {job.folder.name}"


# ----------------------------------------------------------------------------------------------------------------------
# 4. Bad set-ups: one line on each node, and nothing changes


def test_second_job_on_the_same_runs_dir_is_refused_on_every_node(story, sigtermed):
    job = sigtermed.second
    assert sigtermed.second_rcs == [1, 1], job.tail()
    assert sigtermed.untouched, "the refused jobs changed the run folder"
    assert [len(job.said(n)) for n in range(NODES)] == [1, 1], job.tail()
    assert "is in use by another training" in job.said(0)[0]
    assert job.said(1)[0].startswith("error: rank 0 stopped: ") and "is in use by another training" in job.said(1)[0]


def test_device_list_with_torchrun_is_refused_on_every_node(story, sigtermed):
    job = sigtermed.device_list
    assert sigtermed.device_rcs == [1, 1], job.tail()
    for node in range(NODES):
        assert len(job.said(node)) == 1 and "together with torchrun" in job.said(node)[0], job.tail()
    assert written(job, 0, story.runs) == written(job, 1, story.runs) == []


def test_runs_dir_not_shared_is_refused_on_every_node_and_nothing_changes(story, not_shared):
    job = not_shared.job
    assert not_shared.rcs == [1, 1], job.tail()
    for node in range(NODES):
        said = job.said(node)
        assert len(said) == 1 and "is not shared: rank(s) [1] did not see rank 0's file" in said[0], job.tail()
    assert not_shared.untouched, "rank 0 changed its run folder (a finished run it would archive)"
    assert not not_shared.elsewhere.exists()
    assert not is_locked(story.runs)


# ----------------------------------------------------------------------------------------------------------------------
# One node with two processes works the same way


def test_one_node_with_two_processes_trains_as_two_nodes_do(fresh, one_node):
    job = one_node.job
    assert one_node.rcs == [0], job.tail()
    setup = {"start_epoch": 0, "world_size": 2, "modality_dropout": DROPOUT}
    assert setup_of(job) == {r: setup for r in (0, 1)}, job.tail()
    assert written(job, 1, one_node.runs) == [], "rank 1 wrote into the run folder"
    (two_nodes, two_nodes_csv), (one, one_csv) = fresh.final, one_node.final
    different = [k for k in two_nodes if not two_nodes[k].equal(one[k])]
    assert two_nodes.keys() == one.keys() and not different, f"{len(different)} tensors differ: {different[:3]}"
    assert two_nodes_csv.equals(one_csv)
