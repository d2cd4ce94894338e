"""Multi-GPU (DDP) training: the launching process, its workers, a switch that runs the same path on CPUs, and
torchrun, which takes it past one machine.

Ultralytics launches DDP itself: the launching process pickles the trainer and its callbacks and runs
`torch.distributed.run`, which starts one worker per GPU, each in a session of its own.

Under torchrun (`torchrun ... train_dual.py` on every node) each launcher process is one rank instead. Rank 0 alone
decides and acts on the run folder, holding its lock (`lead`); every other rank waits for that decision and then
trains the model rank 0 sends, with rank 0's settings (`follow`, `send`). Their messages go through torchrun's
process group, which the trainer then trains in; a token that rank 0 writes into RUNS_DIR and the others must read
back proves that every node sees the same run folder.
"""

import os
import re
import secrets
import signal
import threading
import time
from contextlib import contextmanager, suppress
from datetime import timedelta
from pathlib import Path

import cloudpickle
import psutil
import torch
import torch.distributed as dist
from ultralytics.utils import LOCAL_RANK, LOGGER, RANK

from yolofuse import checkpoint
from yolofuse.lock import RunLock

# The CPU switch, for tests and machines without GPUs: YOLOFUSE_CPU_DDP=N trains a DEVICE="cpu" run as N DDP processes
# (gloo), launched by Ultralytics exactly as DEVICE="0,1" would be. Unset, or with a GPU device, it changes nothing.
CPU_PROCESSES = int(os.environ.get("YOLOFUSE_CPU_DDP") or 0)
WORKERS_GONE_TIMEOUT = 60  # s; a killed worker is gone at once, this only bounds a wait on a stuck kernel call
LAUNCHER_VAR = "YOLOFUSE_DDP_LAUNCHER"  # the launching process's PID, for its DDP workers (who inherit it)

# The torchrun switch: torchrun (torch.distributed.run) started this process as one of WORLD_SIZE ranks. Stock's own
# DDP workers are started by torch.distributed.run too, but from our launcher, which marks them with LAUNCHER_VAR.
TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ and LAUNCHER_VAR not in os.environ
TORCHRUN_WORLD = int(os.environ.get("WORLD_SIZE") or 1) if TORCHRUN else 1
FOLLOWER = TORCHRUN_WORLD > 1 and RANK > 0  # a torchrun rank that trains as rank 0 decides
RERUN = "the same torchrun command (on every node)" if TORCHRUN else "`python train_dual.py`"
SHARED_WAIT = float(os.environ.get("YOLOFUSE_SHARED_WAIT") or 120)  # s; NFS may take a minute to show a new file
SHARED_PROOF = ".torchrun"  # in RUNS_DIR while the ranks check that they all see it
RANKS_TIMEOUT = timedelta(hours=3)  # as stock's _setup_ddp: the other ranks may wait long for rank 0 (a data cache)
_followers_waiting = False  # on rank 0: the other ranks wait in `follow` for its next message


@contextmanager
def workers_end_first():
    """Around the DDP launch, in the launching process: however this process ends, its workers end first or with it.

    Killed, even by SIGKILL: each worker watches this process and kills itself within a second (`watch_launcher`).
    torch.distributed.run survives the launcher and starts the workers in sessions of their own, so without this they
    would train on, beside a re-run, once the launcher's run lock is gone.
    Ctrl+C or SIGTERM: stock lets the interrupt reach `subprocess.run`, which SIGKILLs torch.distributed.run and
    returns at once; here the workers are killed too, and gone, before KeyboardInterrupt leaves.
    """
    workers = []

    def on_signal(signum, frame):
        workers.extend(psutil.Process().children(recursive=True))  # while torch.distributed.run still parents them
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    os.environ[LAUNCHER_VAR] = str(os.getpid())
    try:
        yield
    except KeyboardInterrupt:
        for worker in workers:
            try:
                worker.kill()  # psutil checks the PID still names the same process
            except psutil.NoSuchProcess:
                pass
        if survivors := wait_until_gone(workers, WORKERS_GONE_TIMEOUT):
            LOGGER.warning(f"DDP workers {[p.pid for p in survivors]} still run {WORKERS_GONE_TIMEOUT} s after SIGKILL")
        raise
    finally:
        del os.environ[LAUNCHER_VAR]
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def watch_launcher() -> None:
    """In a DDP worker: SIGKILL this process within a second of the launching process's end (`workers_end_first`)."""
    pid = os.environ.get(LAUNCHER_VAR)
    if pid:  # else started by torch.distributed.run without our launcher
        end_with(int(pid))


def end_with(pid: int) -> None:
    """SIGKILL this process within a second of the end of process `pid`."""
    try:
        launcher = psutil.Process(pid)
    except psutil.NoSuchProcess:
        os.kill(os.getpid(), signal.SIGKILL)

    def watch():
        while running(launcher):
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="watch-launcher", daemon=True).start()


def running(process: psutil.Process) -> bool:
    """Whether `process` still runs (a zombie has ended: only its exit status is left for its parent to read)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until_gone(processes, timeout: float) -> list:
    """Wait until every process has ended; returns those still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in processes if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


class CpuDistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """DDP for a CPU module: torch refuses `device_ids` there, and stock Ultralytics always passes [device.index]."""

    def __init__(self, module, device_ids=None, **kwargs):
        super().__init__(module, **kwargs)


class NoFinalValidation:
    """Stands in for the validator in stock `final_eval` on CPU ranks, which re-validates best.pt on a CUDA device."""

    def __init__(self, validator):
        self.args = validator.args

    def __call__(self, model=None) -> dict:
        LOGGER.info("DDP on CPUs: no final validation (stock does it on a CUDA device); best.pt keeps its metrics")
        return {}


class DdpSwitch:
    """Trainer mixin: DDP where stock Ultralytics can't take it, on CPU processes and on torchrun's ranks.

    Stock takes the world size from the device list of one machine (a CPU device: 0) and launches DDP itself. Under
    torchrun this process already is one rank: the world is torchrun's, and the process group is joined (`lead`,
    `follow`). On CPUs (YOLOFUSE_CPU_DDP=N, or torchrun with DEVICE="cpu"), stock's DDP code assumes an accelerator in
    three places: `_setup_ddp` (set_device, NCCL), the DDP wrap (`device_ids`), and the final validation of best.pt
    on the ranks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cpu = self.device.type == "cpu"
        if TORCHRUN_WORLD > 1:
            self.world_size, self.ddp = TORCHRUN_WORLD, False
        elif cpu and CPU_PROCESSES > 1:
            self.world_size, self.ddp = CPU_PROCESSES, LOCAL_RANK == -1  # as stock sets them for DEVICE="0,1"
        self.cpu_ddp = cpu and self.world_size > 1

    def _setup_ddp(self):
        if self.cpu_ddp:
            torch.set_num_threads(1)  # the ranks share the machine's cores
            torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel  # in this process only
        if dist.is_initialized():  # torchrun: joined before rank 0 decided, on this rank's device
            return
        if self.cpu_ddp:
            dist.init_process_group("gloo", rank=RANK, world_size=self.world_size)
        else:
            super()._setup_ddp()

    def final_eval(self):
        if self.cpu_ddp:
            self.validator = NoFinalValidation(self.validator)
        return super().final_eval()


class TorchrunError(RuntimeError):
    """A torchrun set-up the launcher refuses, or what rank 0 stopped with, as the other ranks hear it."""


def check_torchrun(device) -> None:
    """Under torchrun, refuse what would fight it over the processes: a DEVICE but None or "cpu", or the CPU switch."""
    if not TORCHRUN:
        return
    if device is not None and str(device).lower() != "cpu":
        raise TorchrunError(
            f"DEVICE={device!r} together with torchrun: torchrun starts the processes, each on the GPU of its local "
            "rank; leave DEVICE=None (or set 'cpu') and choose the GPUs with --nproc-per-node and CUDA_VISIBLE_DEVICES"
        )
    if CPU_PROCESSES:
        raise TorchrunError("YOLOFUSE_CPU_DDP together with torchrun: torchrun starts the processes; unset it")


def _join(device) -> None:
    """Join torchrun's process group (env://): NCCL on the GPU of this local rank, gloo on CPUs."""
    end_with(os.getppid())  # torchrun starts its ranks in sessions of their own: they would outlive a SIGKILL of it
    if device == "cpu" or not torch.cuda.is_available():
        backend = "gloo"
    else:
        torch.cuda.set_device(LOCAL_RANK)
        os.environ["TORCH_NCCL_BLOCKING_WAIT"] = "1"  # as stock's _setup_ddp: a stuck collective raises at the timeout
        backend = "nccl"
    dist.init_process_group(backend, timeout=RANKS_TIMEOUT)


def _broadcast(message=None):
    """Rank 0's `message`, on every rank."""
    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _heard(message) -> object:
    """The payload of a message from rank 0; raises the line rank 0 stopped with."""
    kind, payload = message
    if kind == "stopped":
        raise TorchrunError(f"rank 0 stopped: {payload}")
    return payload


def _check_shared(runs_dir: Path) -> None:
    """Every rank must see `runs_dir` as rank 0 does, or a resume would not find what rank 0 saved: rank 0 writes a
    fresh token there, and each other rank must read it back within SHARED_WAIT seconds."""
    global _followers_waiting
    proof = runs_dir / SHARED_PROOF
    if RANK == 0:
        token = secrets.token_hex(16)
        checkpoint.write_durably(proof, token.encode())
        _broadcast(("token", token))
        saw = True
    else:
        token, deadline = _heard(_broadcast()), time.monotonic() + SHARED_WAIT
        while not (saw := _reads(proof, token)) and time.monotonic() < deadline:
            time.sleep(0.2)
    saw_it = [None] * TORCHRUN_WORLD
    dist.all_gather_object(saw_it, saw)
    if RANK == 0:
        proof.unlink()
    if blind := [rank for rank, saw in enumerate(saw_it) if not saw]:
        _followers_waiting = False  # every rank stops here, with this line
        raise TorchrunError(
            f"RUNS_DIR {runs_dir} is not shared: rank(s) {blind} did not see rank 0's file in it within "
            f"{SHARED_WAIT:g} s; put RUNS_DIR on a filesystem that every node mounts at the same path"
        )


def _reads(path: Path, text: str) -> bool:
    try:
        return path.read_text() == text
    except OSError:
        return False


@contextmanager
def lead(runs_dir: Path, device):
    """The run lock, held while rank 0 (or a single process) decides and acts on the run folder, and trains.

    Under torchrun, the other ranks wait in `follow` meanwhile: first each checks that it sees `runs_dir` (before
    anything in it changes), then it gets the model to train (`send`) or the line rank 0 stopped with.
    """
    global _followers_waiting
    if TORCHRUN_WORLD > 1:
        _join(device)
        _followers_waiting = True
    try:
        with RunLock(runs_dir):
            if TORCHRUN_WORLD > 1:
                _check_shared(runs_dir)
            yield
    except BaseException as e:
        if _followers_waiting:
            _followers_waiting = False
            with suppress(Exception):  # they may be gone already
                _broadcast(("stopped", (str(e).strip().splitlines() or [type(e).__name__])[0]))
        raise


def send(model, settings: dict) -> None:
    """On rank 0, right before it trains: the other ranks, waiting in `follow`, train this model with these settings.

    (Stock's DDP launcher likewise pickles the model and its callbacks into its workers, with cloudpickle.)
    """
    global _followers_waiting
    if _followers_waiting:
        if not settings.get("resume"):  # stock's trainer deletes a fresh run's results.csv on every rank: once, here
            (Path(settings["save_dir"]) / "results.csv").unlink(missing_ok=True)
        _broadcast(("train", cloudpickle.dumps((model, settings))))
        _followers_waiting = False


def follow(runs_dir: Path, device) -> None:
    """A torchrun rank other than 0: wait for rank 0 (`lead`), then train the model it sends, with its settings, on
    this rank's device. Nothing here writes into the run folder: rank 0 alone does."""
    _join(device)
    _check_shared(runs_dir)
    model, settings = cloudpickle.loads(_heard(_broadcast()))
    if settings["device"] != "cpu":
        settings["device"] = str(LOCAL_RANK)
    model.train(**settings)


def lost_rank(error: BaseException) -> str | None:
    """Under torchrun: what torch.distributed said when a collective broke because another rank was gone, else None.

    NCCL and the store raise `DistError`s; gloo a RuntimeError naming itself, e.g. "[.../gloo/transport/tcp/pair.cc:
    545] Read error [127.0.0.1]:8586: Connection reset by peer. This is typically caused by ...".
    """
    text = str(error)
    if not TORCHRUN or not (isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo" in text)):
        return None
    return re.sub(r"^\[[^]]*\] ", "", (text.splitlines() or [""])[0]).split(". ")[0]
