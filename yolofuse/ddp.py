"""Multi-GPU (DDP) training: the launching process, its workers, and a switch that runs the same path on CPUs.

Ultralytics launches DDP itself: the launching process pickles the trainer and its callbacks and runs
`torch.distributed.run`, which starts one worker per GPU, each in a session of its own.
"""

import os
import signal
import threading
import time
from contextlib import contextmanager

import psutil
import torch
import torch.distributed as dist
from ultralytics.utils import LOCAL_RANK, LOGGER, RANK

# The CPU switch, for tests and machines without GPUs: YOLOFUSE_CPU_DDP=N trains a DEVICE="cpu" run as N DDP processes
# (gloo), launched by Ultralytics exactly as DEVICE="0,1" would be. Unset, or with a GPU device, it changes nothing.
CPU_PROCESSES = int(os.environ.get("YOLOFUSE_CPU_DDP") or 0)
WORKERS_GONE_TIMEOUT = 60  # s; a killed worker is gone at once, this only bounds a wait on a stuck kernel call
LAUNCHER_VAR = "YOLOFUSE_DDP_LAUNCHER"  # the launching process's PID, for its DDP workers (who inherit it)


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
    if not pid:
        return  # started by torch.distributed.run without our launcher
    try:
        launcher = psutil.Process(int(pid))
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
        LOGGER.info("YOLOFUSE_CPU_DDP: no final validation (stock does it on a CUDA device); best.pt keeps its metrics")
        return {}


class CpuSwitch:
    """Trainer mixin: with YOLOFUSE_CPU_DDP=N and a CPU device, train as N DDP processes; otherwise stock.

    Stock Ultralytics gives a CPU device world size 0, and its DDP code assumes an accelerator in three places:
    `_setup_ddp` (set_device, NCCL), the DDP wrap (`device_ids`), and the final validation of best.pt on the ranks.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_ddp = CPU_PROCESSES > 1 and self.device.type == "cpu"
        if self.cpu_ddp:
            self.world_size, self.ddp = CPU_PROCESSES, LOCAL_RANK == -1  # as stock sets them for DEVICE="0,1"

    def _setup_ddp(self):
        if not self.cpu_ddp:
            return super()._setup_ddp()
        torch.set_num_threads(1)  # the ranks share the machine's cores
        torch.nn.parallel.DistributedDataParallel = CpuDistributedDataParallel  # in this worker process only
        dist.init_process_group("gloo", rank=RANK, world_size=self.world_size)

    def final_eval(self):
        if self.cpu_ddp:
            self.validator = NoFinalValidation(self.validator)
        return super().final_eval()
