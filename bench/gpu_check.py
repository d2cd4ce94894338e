"""One-shot GPU check of exact resume and speed, ending with one summary table. On a machine with a CUDA GPU:

    python bench/gpu_check.py

Takes some minutes on one H100-class GPU (the YOLOv8n checks alone took well under 10; the YOLO11n and YOLO26n
ones are not timed yet); installs and downloads nothing. It runs train_dual.py (through tests/killer.py) on the
bundled demo set at the defaults BATCH=16, NBS=64 (accumulate 4) and WORKERS=8, IMGSZ=640, on cuda:0, each time a
fresh model:
1. straight: 4 epochs, twice (two runs of the same command show what the GPU itself repeats);
2. resumed: the same, SIGKILLed right after epoch 2's checkpoint, then re-run; compared with run 1 tensor by
   tensor (FP32 weights, EMA, optimizer moments, open-window gradients) and row by row (results.csv);
   1 and 2 again for YOLO26n made RGB+IR (MODEL=yolo26n.yaml, mid fusion) with MuSGD, the optimizer that
   optimizer=auto picks on real-size runs (straight once, then resumed);
3. speed: training and inference images/s of each fused model (yolov8n-fuse.yaml, YOLO11n and YOLO26n mid fusion)
   and of its stock model on the RGB half of the same data, in this process;
4. with 2+ GPUs, DEVICE="0,1" straight, and killed a second after its first epoch is saved, then re-run;
5. with 2+ GPUs, torchrun (NCCL): `torchrun --standalone --nproc-per-node 2` straight, compared with DEVICE="0,1";
   and two "nodes" on this machine (two torchruns with --nnodes 2, one GPU each by CUDA_VISIBLE_DEVICES, c10d on
   localhost) straight, then node 1 SIGKILLed a second after the first epoch is saved (how long node 0 takes to end
   is the time NCCL needs to notice a lost node), then the same two commands again.
It also lists the ops torch warned have no deterministic CUDA implementation.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch sees no CUDA GPU (torch.cuda.is_available() is False); run it on a machine with one.")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402

import yolofuse  # noqa: E402, F401  (keeps Ultralytics offline)
from yolofuse import checkpoint, replay  # noqa: E402

EPOCHS, KILL_AFTER, IMGSZ = 4, 2, 640
RUN_TIMEOUT = 300  # s per train_dual.py launch
LOST_NODE_WAIT = 120  # s node 0 may take to end after node 1 is killed (NCCL may wait for its 3 h timeout instead)
NONDETERMINISTIC = re.compile(r"(\w+) does not have a deterministic implementation")


YOLO26 = ["MODEL=yolo26n.yaml"], {"KILLER_TRAIN": "optimizer=MuSGD"}  # settings, environment of the YOLO26n checks


def settings(data: Path, runs: Path, device: str | None = "0", epochs: int = EPOCHS) -> list[str]:
    """train_dual.py's arguments; device None: DEVICE left as is (torchrun gives each rank its GPU)."""
    # BATCH, NBS and WORKERS stay at train_dual.py's defaults; CLOSE_MOSAIC=1: mosaic on for all epochs but the last.
    chosen = [f"DEVICE='{device}'"] if device else []
    return [f"DATA={data}", f"RUNS_DIR={runs}", f"EPOCHS={epochs}", f"IMGSZ={IMGSZ}", *chosen] + [
        "CLOSE_MOSAIC=1",
        "CLEANUP_EVERY=1000",
    ]


def launch(
    logs: Path, name: str, args: list[str], kill_after_save: int | None = None, **env: str
) -> subprocess.CompletedProcess:
    """train_dual.py through tests/killer.py (which can SIGKILL it right after a checkpoint); output kept in logs/."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    if kill_after_save:
        env["KILLER_AFTER_SAVE"] = str(kill_after_save)
    cmd = [sys.executable, str(ROOT / "tests" / "killer.py"), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=RUN_TIMEOUT)
    (logs / f"{name}.stdout").write_text(res.stdout)
    (logs / f"{name}.stderr").write_text(res.stderr)
    expected = -signal.SIGKILL if kill_after_save else 0
    if res.returncode != expected:
        raise RuntimeError(f"{name}: exit code {res.returncode}, see {logs / name}.stderr:\n{res.stderr[-1500:]}")
    return res


def compare_tensors(a: dict, b: dict) -> str:
    """'bit-exact (N tensors)' or 'k of N tensors differ, max abs diff x (name)'."""
    if a.keys() != b.keys():
        return f"different tensors saved: {sorted(a.keys() ^ b.keys())[:3]}"
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() for k in a if not torch.equal(a[k], b[k])}
    if not diffs:
        return f"bit-exact ({len(a)} tensors)"
    worst = max(diffs, key=diffs.get)
    return f"{len(diffs)} of {len(a)} tensors differ, max abs diff {diffs[worst]:.3g} ({worst})"


def compare_csv(a: Path, b: Path) -> str:
    x, y = (pd.read_csv(p).drop(columns="time") for p in (a, b))
    if x.shape != y.shape:
        return f"different shapes {x.shape} vs {y.shape}"
    diff = (x - y).abs().max()
    return "identical" if diff.max() == 0 else f"max abs diff {diff.max():.3g} ({diff.idxmax()})"


def compare_runs(a: Path, b: Path, finished: bool = False) -> str:
    """Two run folders: their last.pt tensors (a finished run keeps only FP16 weights) and results.csv rows."""
    if finished:
        x, y = (checkpoint.load(run / "weights" / "last.pt")["model"].state_dict() for run in (a, b))
    else:
        x, y = (replay.saved_tensors(run / "weights" / "last.pt") for run in (a, b))
    return f"{compare_tensors(x, y)}; results.csv {compare_csv(a / 'results.csv', b / 'results.csv')}"


def resume_checks(work: Path, data: Path, logs: Path) -> dict:
    runs = {name: work / name for name in ("straight", "straight_again", "resumed")}
    for name in ("straight", "straight_again"):  # killed after the last epoch's save: before the final strip
        launch(logs, name, settings(data, runs[name]), kill_after_save=EPOCHS)
    launch(logs, "resumed_first", settings(data, runs["resumed"]), kill_after_save=KILL_AFTER)
    res = launch(logs, "resumed", settings(data, runs["resumed"]), kill_after_save=EPOCHS)
    assert "Unfinished run" in res.stdout, "the re-run did not resume"
    args = checkpoint.load(runs["straight"] / "weights" / "last.pt")["train_args"]
    return {
        "settings (from last.pt)": f"batch {args['batch']}, nbs {args['nbs']}, workers {args['workers']}, "
        f"imgsz {args['imgsz']}, {EPOCHS} epochs, deterministic={args['deterministic']}",
        "straight vs straight again (GPU repeatability)": compare_runs(runs["straight"], runs["straight_again"]),
        f"killed after epoch {KILL_AFTER} + re-run vs straight": compare_runs(runs["straight"], runs["resumed"]),
    }


def yolo26_resume_checks(work: Path, data: Path, logs: Path) -> dict:
    """The YOLO26n RGB+IR model with MuSGD: straight, and killed + re-run."""
    extra, env = YOLO26
    straight, resumed = work / "yolo26_straight", work / "yolo26_resumed"
    launch(logs, "yolo26_straight", settings(data, straight) + extra, kill_after_save=EPOCHS, **env)
    launch(logs, "yolo26_resumed_first", settings(data, resumed) + extra, kill_after_save=KILL_AFTER, **env)
    res = launch(logs, "yolo26_resumed", settings(data, resumed) + extra, kill_after_save=EPOCHS, **env)
    assert "Unfinished run" in res.stdout, "the re-run did not resume"
    optimizer = checkpoint.load(straight / "weights" / "last.pt")["train_args"]["optimizer"]
    return {f"YOLO26n mid, {optimizer}: killed + re-run vs straight": compare_runs(straight, resumed)}


def nondeterministic_ops(logs: Path) -> dict:
    warned = set()
    for log in logs.glob("*.stderr"):
        warned.update(NONDETERMINISTIC.findall(log.read_text()))
    return {"ops torch warned are not deterministic on CUDA": ", ".join(sorted(warned)) or "none"}


def speed(model, data: str, work: Path, name: str, n_train: int) -> tuple[float, float]:
    """(training images/s over epochs 2-3, inference images/s from validation) for one model on cuda:0."""
    starts, ends = [], []
    model.add_callback("on_train_epoch_start", lambda t: (torch.cuda.synchronize(), starts.append(time.perf_counter())))
    model.add_callback("on_train_epoch_end", lambda t: (torch.cuda.synchronize(), ends.append(time.perf_counter())))
    model.train(
        data=data, epochs=3, imgsz=IMGSZ, batch=16, workers=8, device=0, plots=False, val=False,
        project=str(work), name=name, exist_ok=True, seed=0,
    )  # fmt: skip
    seconds = [e - s for s, e in zip(starts[1:], ends[1:])]  # epoch 1 warms up cuDNN and the loader
    train = n_train * len(seconds) / sum(seconds)
    metrics = model.val(data=data, imgsz=IMGSZ, batch=16, device=0, half=True, plots=False)
    return train, 1000 / metrics.speed["inference"]


def speed_checks(work: Path, demo: Path) -> dict:
    import ultralytics

    from yolofuse import YOLO, fuse

    rgb = work / "rgb.yaml"  # the same images and labels, RGB only (stock models read images/ with 3 channels)
    rgb.write_text(f"path: {demo}\ntrain: images/train\nval: images/val\nnames:\n  0: person\n  1: sign\n  2: car\n")
    n_train = len(list((demo / "images" / "train").glob("*.jpg")))
    rows = {}
    for family, fused_yaml in (
        ("yolov8n", ROOT / "yolov8n-fuse.yaml"),
        ("yolo11n", fuse.write(fuse.resolve(Path("yolo11n.yaml"), "mid"), work)),
        ("yolo26n", fuse.write(fuse.resolve(Path("yolo26n.yaml"), "mid"), work)),
    ):
        fused = speed(YOLO(str(fused_yaml)), str(demo / "data.yaml"), work, f"speed_{family}_fused", n_train)
        stock = speed(ultralytics.YOLO(f"{family}.yaml"), str(rgb), work, f"speed_{family}_rgb", n_train)
        label = f"{fused_yaml.name} vs {family} RGB"
        rows[f"training images/s at {IMGSZ}, batch 16 ({label})"] = (
            f"{fused[0]:.0f} vs {stock[0]:.0f} (ratio {fused[0] / stock[0]:.2f})"
        )
        rows[f"inference images/s at {IMGSZ}, FP16 ({label})"] = (
            f"{fused[1]:.0f} vs {stock[1]:.0f} (ratio {fused[1] / stock[1]:.2f})"
        )
    return rows


def ddp_checks(work: Path, data: Path, logs: Path) -> dict:
    """DEVICE="0,1": straight to the end, and SIGKILLed (whole process group) a second after epoch 1 is saved."""
    straight, killed = work / "ddp_straight", work / "ddp_killed"
    epochs = 5
    launch(logs, "ddp_straight", settings(data, straight, "0,1", epochs))
    cmd = [sys.executable, str(ROOT / "train_dual.py"), *settings(data, killed, "0,1", epochs)]
    with open(logs / "ddp_killed_first.stdout", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and proc.poll() is None and not (killed / "weights" / "last.pt").exists():
        time.sleep(0.2)  # until epoch 1 is saved
    time.sleep(0.5)  # somewhere in epoch 2
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    rerun = launch(logs, "ddp_killed_rerun", settings(data, killed, "0,1", epochs))
    what = "killed + re-run" if "Unfinished run" in rerun.stdout else "NOT RESUMED (see logs), second run"
    return {f'DEVICE="0,1": {what} vs straight (final FP16 weights)': compare_runs(straight, killed, True)}


def start_nodes(logs: Path, name: str, args: list[str]) -> list[subprocess.Popen]:
    """Two torchruns on this machine as two nodes of one GPU each (--nnodes 2, c10d on localhost); c10d numbers the
    nodes by address, so node 0 (127.0.0.1) is rank 0. Output in logs/<name>.node<N>."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = []
    for node in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
        cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", f"--local-addr=127.0.0.{node + 1}"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": str(node)}
        with open(logs / f"{name}.node{node}", "w") as out:
            nodes.append(
                subprocess.Popen([*cmd, str(ROOT / "train_dual.py"), *args], stdout=out, stderr=subprocess.STDOUT,
                                 env=env, start_new_session=True)
            )  # fmt: skip
    return nodes


def run_nodes(logs: Path, name: str, args: list[str]) -> str:
    """Both nodes to the end; node 0's output."""
    nodes = start_nodes(logs, name, args)
    codes = [node.wait(timeout=RUN_TIMEOUT) for node in nodes]
    if codes != [0, 0]:
        raise RuntimeError(f"{name}: exit codes {codes}, see {logs / name}.node0 and .node1")
    return (logs / f"{name}.node0").read_text()


def torchrun_checks(work: Path, data: Path, logs: Path) -> dict:
    """torchrun on one node (vs DEVICE="0,1"), and on two "nodes" of one GPU each: straight, and node 1 SIGKILLed."""
    epochs, rows = 5, {}
    standalone = work / "torchrun_standalone"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    res = subprocess.run([*cmd, str(ROOT / "train_dual.py"), *settings(data, standalone, None, epochs)],
                         capture_output=True, text=True, timeout=RUN_TIMEOUT)  # fmt: skip
    (logs / "torchrun_standalone.stdout").write_text(res.stdout + res.stderr)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun --standalone: exit code {res.returncode}, see {logs}/torchrun_standalone.stdout")
    if (work / "ddp_straight" / "weights" / "last.pt").exists():
        rows['torchrun --nproc-per-node 2 vs DEVICE="0,1" (final FP16 weights)'] = compare_runs(
            work / "ddp_straight", standalone, True
        )
    straight, killed = work / "nodes_straight", work / "nodes_killed"
    run_nodes(logs, "nodes_straight", settings(data, straight, None, epochs))
    nodes = start_nodes(logs, "nodes_killed_first", settings(data, killed, None, epochs))
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and nodes[0].poll() is None and not (killed / "weights" / "last.pt").exists():
        time.sleep(0.2)  # until epoch 1 is saved
    time.sleep(1)  # somewhere in epoch 2
    node_1 = psutil.Process(nodes[1].pid)
    for process in [node_1, *node_1.children(recursive=True)]:
        process.kill()
    t0 = time.time()
    try:
        code = nodes[0].wait(timeout=LOST_NODE_WAIT)
        ended = f"node 0 ended {time.time() - t0:.1f} s later, exit code {code}"
    except subprocess.TimeoutExpired:
        ended = f"node 0 still ran {LOST_NODE_WAIT} s later (killed now)"
        node_0 = psutil.Process(nodes[0].pid)
        for process in [node_0, *node_0.children(recursive=True)]:
            process.kill()
    nodes[1].wait()
    rows["2 nodes (torchrun, NCCL): node 1 SIGKILLed in epoch 2"] = ended
    rerun = run_nodes(logs, "nodes_killed_rerun", settings(data, killed, None, epochs))
    what = "killed + re-run" if "Unfinished run" in rerun else "NOT RESUMED (see logs), second run"
    rows[f"2 nodes: {what} vs straight (final FP16 weights)"] = compare_runs(straight, killed, True)
    return rows


def main() -> None:
    t0 = time.time()
    gpus = torch.cuda.device_count()
    rows = {
        "GPU": f"{gpus} x {torch.cuda.get_device_name(0)}; torch {torch.__version__}, CUDA {torch.version.cuda}",
    }
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        logs = work / "logs"
        logs.mkdir()
        demo = work / "demo_night"  # a copy: label caches and runs stay out of the repository
        shutil.copytree(ROOT / "datasets" / "demo_night", demo)
        data = demo / "data.yaml"
        data.write_text((ROOT / "data_config.yaml").read_text().replace("datasets/demo_night", str(demo)))
        for name, check in (
            ("resume", lambda: resume_checks(work, data, logs)),
            ("YOLO26n resume", lambda: yolo26_resume_checks(work, data, logs)),
            ("nondeterministic ops", lambda: nondeterministic_ops(logs)),
            ("speed", lambda: speed_checks(work, demo)),
            ("multi-GPU", lambda: ddp_checks(work, data, logs) if gpus >= 2 else {"DEVICE=0,1": "skipped: 1 GPU"}),
            ("torchrun", lambda: torchrun_checks(work, data, logs) if gpus >= 2 else {"torchrun": "skipped: 1 GPU"}),
        ):
            try:
                rows.update(check())
            except Exception as e:  # one failed check still leaves the table of the others
                rows[f"{name} check"] = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0][:150]}"
                print(str(e)[-3000:], file=sys.stderr)
        kept = Path(tempfile.gettempdir()) / "gpu_check_logs"
        shutil.rmtree(kept, ignore_errors=True)
        shutil.copytree(logs, kept)
    rows["total time"] = f"{time.time() - t0:.0f} s (logs of every launch: {kept})"
    width = max(map(len, rows))
    print("\n" + "=" * 100 + "\ngpu_check summary\n" + "=" * 100)
    for key, value in rows.items():
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
