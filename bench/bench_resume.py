"""What resuming costs and what a kill loses, measured in one run on this machine.

    python bench/bench_resume.py [KILLS]

(a) seconds from launch to the first training step, fresh vs resumed; (b) checkpoint write time, durable
(tmp + fsync + rename + dir fsync) vs stock (Path.write_bytes in place), as a ratio; (c) completed epochs lost
over KILLS (default 20) SIGKILLs at random instants, each followed by a re-run.
"""

import io
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from conftest import FAST, make_dataset  # noqa: E402

from yolofuse import checkpoint  # noqa: E402

# Runs train_dual.py in-process, appending "step <t>" at the first training batch and "saved <epoch>" after each
# durable save to the file in $BENCH_LOG, so the parent can time start-up and know what was saved before a kill.
RUNNER = """
import os, runpy, sys, time
from yolofuse.engine import FuseTrainer
log = open(os.environ["BENCH_LOG"], "a", buffering=1)
preprocess, save = FuseTrainer.preprocess_batch, FuseTrainer.save_model
def first_step(self, batch):
    if not getattr(self, "_stepped", False):
        self._stepped = True
        log.write(f"step {time.time()}\\n")
    return preprocess(self, batch)
def logged_save(self):
    saved = save(self)
    log.write(f"saved {self.epoch}\\n")
    return saved
FuseTrainer.preprocess_batch, FuseTrainer.save_model = first_step, logged_save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch(log: Path, *settings: str) -> subprocess.Popen:
    env = {**os.environ, "BENCH_LOG": str(log)}
    cmd = [sys.executable, "-c", RUNNER, str(ROOT / "train_dual.py"), *FAST, *settings]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def read_log(log: Path, kind: str) -> list[float]:
    lines = log.read_text().split("\n") if log.exists() else []
    return [float(line.split()[1]) for line in lines if line.startswith(kind + " ")]


def time_to_first_step(log: Path, *settings: str) -> float:
    log.unlink(missing_ok=True)
    start = time.time()
    proc = launch(log, *settings)
    while not read_log(log, "step"):
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    return read_log(log, "step")[0] - start


def startup(work: Path, data: Path, repeats: int = 3) -> tuple[float, float]:
    log = work / "startup.log"
    fresh, resumed = [], []
    for i in range(repeats):
        fresh.append(time_to_first_step(log, f"DATA={data}", f"RUNS_DIR={work / f'fresh{i}'}", "EPOCHS=50"))
        run = work / f"resume{i}"
        proc = launch(log, f"DATA={data}", f"RUNS_DIR={run}", "EPOCHS=50")
        while len(read_log(log, "saved")) < 1:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        resumed.append(time_to_first_step(log, f"DATA={data}", f"RUNS_DIR={run}", "EPOCHS=50"))
    return statistics.median(fresh), statistics.median(resumed)


def write_ratio(work: Path, checkpoint_bytes: bytes, repeats: int = 10) -> tuple[float, float]:
    stock, durable = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        (work / "stock.pt").write_bytes(checkpoint_bytes)
        stock.append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoint.write_durably(work / "durable.pt", checkpoint_bytes)
        durable.append(time.perf_counter() - t)
    return statistics.median(stock), statistics.median(durable)


def kills(work: Path, data: Path, n: int) -> tuple[int, int]:
    """Kill a long run at random instants; each re-run must start right after the last epoch it was told was saved."""
    run, log, rng = work / "killed", work / "kills.log", random.Random(0)
    lost_total, saved_before = 0, []
    for _ in range(n):
        proc = launch(log, f"DATA={data}", f"RUNS_DIR={run}", "EPOCHS=1000")
        time.sleep(rng.uniform(4.0, 12.0))
        proc.kill()
        proc.wait()
        saved = read_log(log, "saved")
        resumable = checkpoint.probe(run / "weights" / "last.pt", 1000)
        done = resumable.ckpt["epoch"] + 1 if resumable.ckpt else 0
        completed = int(max(saved)) + 1 if saved else 0
        lost_total += max(completed - done, 0)
        saved_before.append(completed)
    return lost_total, saved_before[-1]


def main():
    n_kills = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = make_dataset(work / "data")
        fresh, resumed = startup(work, data)
        print(
            f"(a) launch to first training step: fresh {fresh:.2f} s, resume {resumed:.2f} s, "
            f"ratio resume/fresh {resumed / fresh:.2f}"
        )
        trained = checkpoint.load(next(work.glob("resume*/weights/last.pt")))
        buffer = io.BytesIO()
        torch.save(trained, buffer)
        stock, durable = write_ratio(work, buffer.getvalue())
        print(
            f"(b) checkpoint write ({len(buffer.getvalue()) / 1e6:.1f} MB): stock {stock * 1e3:.1f} ms, "
            f"durable {durable * 1e3:.1f} ms, ratio durable/stock {durable / stock:.2f}"
        )
        lost, epochs = kills(work, data, n_kills)
        print(f"(c) {n_kills} random SIGKILLs over {epochs} completed epochs: {lost} completed epochs lost")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
