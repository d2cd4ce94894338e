"""Time cleanup on a runs folder of 1,000 experiments: one dry-run decision (target < 1 s) and one callback call;
then the callback's cost as a share of one epoch of the README's demo training (target < 1%).

    python bench/bench_cleanup.py [--experiments 1000] [--rows 50]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: cleanup.py is at the repo root
import pandas as pd  # noqa: E402

import cleanup  # noqa: E402

DEMO = ["EPOCHS=3", "IMGSZ=256", "BATCH=8", "NBS=8"]  # the README's demo settings, fewer epochs

HEADER = (
    "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
    "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
)


def build_runs(runs_dir: Path, experiments: int, rows: int):
    """`experiments` exp<N> folders, each with a `rows`-epoch results.csv and a small weights/last.pt."""
    for n in range(1, experiments + 1):
        exp = runs_dir / f"exp{n}"
        (exp / "weights").mkdir(parents=True)
        best = (n % 100) / 100  # a few end up above the whitelist threshold
        lines = [
            f"{e},{e * 61.3:.6g},1.21,1.53,1.12,0.61,0.52,{best * e / rows:.6g},{best * e / rows / 2:.6g},"
            f"1.31,1.62,1.23,0.00099,0.00099,0.00099"
            for e in range(1, rows + 1)
        ]
        (exp / "results.csv").write_text(HEADER + "\n" + "\n".join(lines) + "\n")
        (exp / "weights" / "last.pt").write_bytes(b"\0" * 4096)


def time_dry_run(runs_dir, **prune_kwargs) -> tuple[float, cleanup.Report]:
    t = time.perf_counter()
    report = cleanup.prune(runs_dir, dry_run=True, **prune_kwargs)
    return time.perf_counter() - t, report


def time_callback(runs_dir, keep_latest=3, map_whitelist=0.8, min_free_gb=5.0, trash_hours=24.0) -> float:
    """Seconds one due `on_fit_epoch_end` call takes on `runs_dir`; it really prunes, so use a copy."""
    callback = cleanup.make_callback(runs_dir, keep_latest, map_whitelist, 1, min_free_gb, trash_hours)
    t = time.perf_counter()
    callback(SimpleNamespace(epoch=0, epochs=100))
    return time.perf_counter() - t


def epoch_share(work: Path) -> None:
    """Train the demo for a few epochs beside 10 archived experiments, then time a due callback against an epoch."""
    runs_dir = work / "demo_runs"
    build_runs(runs_dir, 10, 50)
    subprocess.run(
        [sys.executable, str(ROOT / "train_dual.py"), *DEMO, f"RUNS_DIR={runs_dir}", "CLEANUP_EVERY=1000"],
        check=True,
        capture_output=True,
    )
    epoch = pd.read_csv(runs_dir / "results.csv")["time"].diff().iloc[1:].median()  # seconds, train + val
    callback = time_callback(runs_dir, keep_latest=20)  # nothing to prune: the steady-state cost
    print(
        f"demo epoch: {epoch:.2f} s; one due callback call: {callback * 1e3:.1f} ms = {100 * callback / epoch:.2f}% "
        f"of an epoch; every 10 epochs (CLEANUP_EVERY): {10 * callback / epoch:.3f}% per epoch"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=50)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp) / "runs"
        build_runs(runs_dir, args.experiments, args.rows)
        times = []
        for _ in range(3):
            seconds, report = time_dry_run(runs_dir)
            times.append(seconds)
        print(f"experiments: {args.experiments}, results.csv rows: {args.rows}")
        print(f"dry-run decision: {min(times):.3f} s (best of 3; all: {', '.join(f'{s:.3f}' for s in times)})")
        print(f"kept {len(report.kept)}, would trash {len(report.trashed)}")
        print(f"one callback call (real prune of the same folder): {time_callback(runs_dir):.3f} s")
        print(f"one callback call with nothing left to prune: {time_callback(runs_dir):.3f} s")
        epoch_share(Path(tmp))


if __name__ == "__main__":
    main()
