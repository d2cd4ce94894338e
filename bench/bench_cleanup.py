"""What cleanup costs, measured in one run on this machine.

    python bench/bench_cleanup.py [--experiments 1000] [--rows 50] [--runs 4]

(a) one dry-run decision over 1,000 experiments, each with a `rows`-epoch results.csv (target < 1 s);
(b) how long one due training callback holds training up with 1,000 experiments that are all kept (the steady
    state), as a share of one epoch of the README's demo training (target < 1% per epoch with CLEANUP_EVERY=10);
(c) archive throughput: cleanup's checked, fsynced `.tar` vs `tar -czf` and `tar -cf` of the same experiments
    (real checkpoints of yolov8n-fuse.yaml: mostly `.pt` bytes, as real runs are), as ratios;
(d) what gzip (level 6, as `tar -czf` uses) saves on those `.pt` files: why archives are `.tar`;
(e) `python cleanup.py --dry-run` on an empty folder: the whole command, and the part that is importing `yolofuse`.
"""

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere: cleanup.py is at the repo root
import pandas as pd  # noqa: E402
import torch  # noqa: E402

import cleanup  # noqa: E402
import yolofuse.archive  # noqa: E402

DEMO = ["EPOCHS=3", "IMGSZ=256", "BATCH=8", "NBS=8"]  # the README's demo settings, fewer epochs
MB = 1e6

HEADER = (
    "epoch,time,train/box_loss,train/cls_loss,train/dfl_loss,metrics/precision(B),metrics/recall(B),"
    "metrics/mAP50(B),metrics/mAP50-95(B),val/box_loss,val/cls_loss,val/dfl_loss,lr/pg0,lr/pg1,lr/pg2"
)


def results_csv(rows: int, best: float) -> str:
    """An Ultralytics results.csv of `rows` epochs whose mAP50 climbs to `best`."""
    lines = [
        f"{e},{e * 61.3:.6g},1.21,1.53,1.12,0.61,0.52,{best * e / rows:.6g},{best * e / rows / 2:.6g},"
        f"1.31,1.62,1.23,0.00099,0.00099,0.00099"
        for e in range(1, rows + 1)
    ]
    return HEADER + "\n" + "\n".join(lines) + "\n"


def build_runs(runs_dir: Path, experiments: int, rows: int):
    """`experiments` exp<N> folders, each with a `rows`-epoch results.csv and a small weights/last.pt."""
    for n in range(1, experiments + 1):
        exp = runs_dir / f"exp{n}"
        (exp / "weights").mkdir(parents=True)
        (exp / "results.csv").write_text(results_csv(rows, (n % 100) / 100))  # a few end up above the whitelist
        (exp / "weights" / "last.pt").write_bytes(b"\0" * 4096)


def time_dry_run(runs_dir, **prune_kwargs) -> tuple[float, cleanup.Report]:
    t = time.perf_counter()
    report = cleanup.prune(runs_dir, dry_run=True, **prune_kwargs)
    return time.perf_counter() - t, report


def time_callback(runs_dir, keep_latest) -> float:
    """Seconds one due `on_fit_epoch_end` call holds training on `runs_dir` (at most its budget); returns once its
    pass has ended, so that the next call does not find it running and skip."""
    callback = cleanup.make_callback(runs_dir, keep_latest, 0.8, 1, 5.0, 24.0)
    t = time.perf_counter()
    callback(SimpleNamespace(epoch=0, epochs=100))
    held = time.perf_counter() - t
    cleanup.FolderLock(runs_dir, cleanup.CLEANUP_LOCK_NAME).acquire(wait=600).release()
    return held


def demo_epoch_seconds(work: Path) -> float:
    """Median seconds of one epoch (train + val) of the README's demo training."""
    runs_dir = work / "demo_runs"
    subprocess.run(
        [sys.executable, str(ROOT / "train_dual.py"), *DEMO, f"RUNS_DIR={runs_dir}", "CLEANUP_EVERY=1000"],
        check=True,
        capture_output=True,
    )
    return pd.read_csv(runs_dir / "results.csv")["time"].diff().iloc[1:].median()


def build_real_runs(root: Path, runs: int) -> list[Path]:
    """Finished experiments as training leaves them: stripped last.pt and best.pt of the fused model (its FP16 EMA),
    results.csv, args.yaml; the last one is an unfinished run archived as is, with optimizer state and last.prev.pt."""
    from ultralytics.utils.torch_utils import strip_optimizer

    import yolofuse

    model = yolofuse.YOLO(str(ROOT / "yolov8n-fuse.yaml"), verbose=False).model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    state = optimizer.state_dict()

    def save(path: Path, strip: bool):
        for p in model.parameters():  # every checkpoint its own weights
            p.data.add_(torch.randn_like(p) * 1e-3)
        ckpt = {"epoch": 9, "model": None, "ema": copy.deepcopy(model).half(), "optimizer": state}
        torch.save({**ckpt, "train_metrics": {"metrics/mAP50(B)": 0.5}}, path)
        if strip:
            strip_optimizer(path)

    folders = []
    for n in range(1, runs + 1):
        exp = root / f"exp{n}"
        (exp / "weights").mkdir(parents=True)
        finished = n < runs
        save(exp / "weights" / "best.pt", strip=True)
        save(exp / "weights" / ("last.pt" if finished else "last.prev.pt"), strip=finished)
        if not finished:
            save(exp / "weights" / "last.pt", strip=False)
        (exp / "results.csv").write_text(results_csv(100, 0.5))
        (exp / "args.yaml").write_text("task: detect\nmode: train\nepochs: 100\nimgsz: 640\nbatch: 16\n" * 10)
        folders.append(exp)
    return folders


def best_of(times: int, action) -> float:
    best = float("inf")
    for _ in range(times):
        t = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - t)
    return best


def archive_figures(work: Path, runs: int) -> None:
    source = work / "exps"
    folders = build_real_runs(source, runs)
    tree_bytes = sum(cleanup.dir_size(f) for f in folders)
    pt = [p for f in folders for p in f.rglob("*.pt")]
    pt_bytes = sum(p.stat().st_size for p in pt)
    out = work / "out"
    out.mkdir()

    def ours():
        for f in folders:
            target = out / f"{f.name}.tar"
            target.unlink(missing_ok=True)
            yolofuse.archive.write_archive(f, target, f.name)  # written, checked against the folder, fsynced, renamed

    def tar(flags, suffix):
        def run():
            for f in folders:
                subprocess.run(["tar", flags, str(out / f"{f.name}{suffix}"), "-C", str(source), f.name], check=True)

        return run

    ours()  # warm the page cache: every contender then reads from memory
    t_ours, t_gz, t_tar = (best_of(3, a) for a in (ours, tar("-czf", ".tar.gz"), tar("-cf", ".plain.tar")))
    tar_size = sum(p.stat().st_size for p in out.glob("exp*.tar") if not p.name.endswith(".plain.tar"))
    gz_size = sum(p.stat().st_size for p in out.glob("*.tar.gz"))
    print(
        f"(c) archive of {runs} experiments, {tree_bytes / MB:.0f} MB, {100 * pt_bytes / tree_bytes:.1f}% in .pt files"
    )
    print(f"    cleanup .tar (checked, fsynced): {tree_bytes / MB / t_ours:.0f} MB/s")
    print(f"    tar -czf: {tree_bytes / MB / t_gz:.0f} MB/s; cleanup/tar -czf = {t_gz / t_ours:.1f}x faster")
    print(f"    tar -cf:  {tree_bytes / MB / t_tar:.0f} MB/s; cleanup/tar -cf = {t_tar / t_ours:.2f}x")
    ratios = []
    for p in pt:
        data = p.read_bytes()
        ratios.append(len(zlib.compress(data, 6)) / len(data))
    print(
        f"(d) gzip -6 on the {len(pt)} .pt files: compressed to {100 * statistics.mean(ratios):.1f}% of their size "
        f"(range {100 * min(ratios):.1f}-{100 * max(ratios):.1f}%); the whole tree's .tar.gz / .tar: "
        f"{gz_size / tar_size:.3f}"
    )


def cli_figures(work: Path) -> None:
    empty = work / "empty"
    empty.mkdir()

    def run(*command):
        return lambda: subprocess.run([sys.executable, *command], check=True, capture_output=True, cwd=ROOT)

    cli = best_of(3, run(str(ROOT / "cleanup.py"), str(empty), "--dry-run"))
    bare = best_of(3, run("-c", "import pandas, tarfile, hashlib, threading"))
    package = best_of(3, run("-c", "import yolofuse.lock")) - best_of(3, run("-c", "pass"))
    print(f"(e) python cleanup.py EMPTY --dry-run: {cli:.2f} s (best of 3); importing yolofuse in it: {package:.2f} s;")
    print(f"    python with cleanup's other imports (pandas, tarfile, ...) alone: {bare:.2f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiments", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=50)
    parser.add_argument("--runs", type=int, default=4, help="experiments in the archive benchmark")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        runs_dir = Path(tmp) / "runs"
        build_runs(runs_dir, args.experiments, args.rows)
        times = []
        for _ in range(3):
            seconds, report = time_dry_run(runs_dir, keep_latest=3, map_whitelist=0.8, trash_hours=24, min_free_gb=5)
            times.append(seconds)
        print(f"experiments: {args.experiments}, results.csv rows: {args.rows}")
        print(f"(a) dry-run decision: {min(times):.3f} s (best of 3; all: {', '.join(f'{s:.3f}' for s in times)})")
        print(f"    kept {len(report.kept)}, would trash {len(report.trashed)}")

        # the steady state: every experiment kept, so each pass reads them all and moves nothing
        settings = dict(keep_latest=args.experiments, map_whitelist=0.8, trash_hours=24, min_free_gb=5)
        one_pass = best_of(3, lambda: cleanup.prune(runs_dir, **settings))
        held = min(time_callback(runs_dir, keep_latest=args.experiments) for _ in range(3))
        epoch = demo_epoch_seconds(Path(tmp))
        print(f"(b) one cleanup pass over {args.experiments} kept experiments: {one_pass:.3f} s (best of 3)")
        print(
            f"    one due callback holds training {held:.3f} s (at most its {cleanup.CALLBACK_BUDGET_S:g} s budget) = "
            f"{100 * held / epoch:.1f}% of a demo epoch ({epoch:.2f} s); "
            f"with CLEANUP_EVERY=10: {10 * held / epoch:.2f}% per epoch"
        )
        archive_figures(Path(tmp), args.runs)
        cli_figures(Path(tmp))


if __name__ == "__main__":
    main()
