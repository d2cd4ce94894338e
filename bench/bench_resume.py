"""What resuming costs and what a kill loses, measured in one run on this machine.

    python bench/bench_resume.py [KILLS]

(a) seconds from launch to the first training step, fresh vs resumed; (b) checkpoint write time, durable
(tmp + fsync + rename + dir fsync) vs stock (Path.write_bytes in place), as a ratio; (c) completed epochs lost
over KILLS (default 20) SIGKILLs at random instants of training, each followed by a re-run, and how many of those
kills landed inside a checkpoint write; (d) what exact resume costs: `save_model` time and `last.pt` size, this trainer
(stock's bytes + the exact-resume member, durable) vs stock Ultralytics' (in place) on the same trained state.
"""

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

from conftest import killer_cmd, make_dataset  # noqa: E402

from yolofuse import checkpoint  # noqa: E402


def launch(log: Path, *settings: str) -> subprocess.Popen:
    """train_dual.py through tests/killer.py, which logs the first training step and each save to `log`."""
    env = {**os.environ, "KILLER_LOG": str(log)}
    return subprocess.Popen(killer_cmd(*settings), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def log_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().split("\n") if line] if log.exists() else []


def read_log(log: Path, kind: str) -> list[float]:
    return [float(line.split()[1]) for line in log_lines(log) if line.startswith(kind + " ")]


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


def kills(work: Path, data: Path, n: int) -> tuple[int, int, int]:
    """Kill a long run at random instants of its training; each re-run must start right after the last epoch it
    was told was saved.

    Returns (completed epochs lost, completed epochs at the end, kills that landed inside a checkpoint write).
    """
    run, log, rng = work / "killed", work / "kills.log", random.Random(0)
    lost_total, saved_before, inside_write = 0, [], 0
    for _ in range(n):
        started = len(read_log(log, "step"))
        proc = launch(log, f"DATA={data}", f"RUNS_DIR={run}", "EPOCHS=1000")
        while len(read_log(log, "step")) == started:  # start-up time varies with the machine's load: not counted
            if proc.poll() is not None:
                raise RuntimeError(f"the run ended (exit code {proc.returncode}) before training; run it by hand")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 8.0))
        proc.kill()
        proc.wait()
        inside_write += log_lines(log)[-1].startswith("saving ")  # a save began and never finished
        saved = read_log(log, "saved")
        resumable = checkpoint.probe(run / "weights" / "last.pt", 1000)
        done = resumable.ckpt["epoch"] + 1 if resumable.ckpt else 0
        completed = int(max(saved)) + 1 if saved else 0
        lost_total += max(completed - done, 0)
        saved_before.append(completed)
    return lost_total, saved_before[-1], inside_write


def exact_resume_cost(work: Path, data: Path) -> None:
    """One trainer, trained in this process, saved by our save_model and by the stock one.

    NBS=16 with BATCH=4, as the defaults accumulate 4 batches: the last window is open, so last.pt holds gradients.
    """
    from ultralytics.models.yolo.detect import DetectionTrainer

    from yolofuse.engine import FuseTrainer

    settings = dict(model=str(ROOT / "yolov8n-fuse.yaml"), data=str(data), epochs=3, imgsz=64, batch=4, nbs=16)
    trainer = FuseTrainer(
        overrides={**settings, "workers": 0, "device": "cpu", "plots": False, "save_dir": str(work / "inproc")}
    )
    trainer.train()
    assert trainer.accumulation.state(trainer.model)["grads"], "no open accumulation window to save"
    stock_dir = work / "stock"
    stock_dir.mkdir()
    ours_times, stock_times = [], []
    for _ in range(9):  # in pairs, so that a burst of other jobs' disk traffic hits both sides of a ratio
        # Stock leaves its bytes for the kernel to write back later: in training, during the next epoch. Back to
        # back here, that write-back would land in the next timing, so each starts with none pending (not timed).
        os.sync()
        t = time.perf_counter()
        trainer.save_model()
        ours_times.append(time.perf_counter() - t)
        last, best = trainer.last, trainer.best
        trainer.last, trainer.best = stock_dir / "last.pt", stock_dir / "best.pt"
        os.sync()
        t = time.perf_counter()
        DetectionTrainer.save_model(trainer)
        stock_times.append(time.perf_counter() - t)
        trainer.last, trainer.best = last, best
    ours, stock = statistics.median(ours_times), statistics.median(stock_times)
    ratio = statistics.median(a / b for a, b in zip(ours_times, stock_times))
    size, stock_size = trainer.last.stat().st_size, (stock_dir / "last.pt").stat().st_size
    best, stock_best = trainer.best.stat().st_size, (stock_dir / "best.pt").stat().st_size
    print(
        f"(d) exact resume: save_model {ours * 1e3:.0f} ms vs stock {stock * 1e3:.0f} ms (median ratio {ratio:.2f}); "
        f"last.pt {size / 1e6:.1f} MB vs stock {stock_size / 1e6:.1f} MB (ratio {size / stock_size:.2f}); "
        f"best.pt {best / 1e6:.1f} MB vs stock {stock_best / 1e6:.1f} MB"
    )


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
        trained = next(work.glob("resume*/weights/last.pt")).read_bytes()
        stock, durable = write_ratio(work, trained)
        print(
            f"(b) checkpoint write ({len(trained) / 1e6:.1f} MB): stock {stock * 1e3:.1f} ms, "
            f"durable {durable * 1e3:.1f} ms, ratio durable/stock {durable / stock:.2f}"
        )
        lost, epochs, inside_write = kills(work, data, n_kills)
        print(
            f"(c) {n_kills} random SIGKILLs over {epochs} completed epochs: {lost} completed epochs lost; "
            f"{inside_write} of the kills landed inside a checkpoint write"
        )
        exact_resume_cost(work, data)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
