"""Shared fixtures: a tiny copy of the bundled demo dataset, and a way to run train_dual.py as a user would."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo_night"
sys.path.insert(0, str(ROOT))

# Fast settings for real training runs on a CPU: tiny images, tiny batches, an optimizer step per batch.
FAST = ["IMGSZ=64", "BATCH=4", "NBS=4", "WORKERS=0", "CLEANUP_EVERY=1000"]


def make_dataset(root: Path, n_train: int = 8, n_val: int = 4, channels: int = 4) -> Path:
    """Copy the first demo pairs into `root` (same layout) and write its data yaml; returns the yaml path."""
    for split, n in (("train", n_train), ("val", n_val)):
        for rgb in sorted((DEMO / "images" / split).glob("*.jpg"))[:n]:
            for folder, src in (
                ("images", rgb),
                ("imagesIR", next((DEMO / "imagesIR" / split).glob(rgb.stem + ".*"))),
                ("labels", DEMO / "labels" / split / (rgb.stem + ".txt")),
            ):
                dst = root / folder / split / src.name
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dst)
    data = root / "data.yaml"
    data.write_text(
        f"path: {root}\ntrain: images/train\nval: images/val\nchannels: {channels}\n"
        "names:\n  0: person\n  1: sign\n  2: car\n"
    )
    return data


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


@pytest.fixture(scope="session")
def stock_weights(tmp_path_factory):
    """family ("yolo26n", ...) -> a stock Ultralytics checkpoint of it, made once per session by a 1-epoch stock run
    at imgsz 64 on the RGB half of a tiny demo copy, offline: a user's yolo26n.pt in miniature (same classes)."""
    import ultralytics

    work = tmp_path_factory.mktemp("stock_weights")
    paired = make_dataset(work / "data", n_train=8, n_val=2)
    rgb = work / "rgb.yaml"  # stock datasets read images/ and labels/: the IR folder beside them is ignored
    rgb.write_text(paired.read_text().replace("channels: 4\n", ""))
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            run = work / family
            ultralytics.YOLO(f"{family}.yaml").train(
                data=str(rgb), epochs=1, imgsz=64, batch=4, workers=0, device="cpu", plots=False, val=False,
                save_dir=str(run), exist_ok=True, verbose=False,
            )  # fmt: skip
            made[family] = run / "weights" / "last.pt"  # finished, so stripped: as Ultralytics releases them
        return made[family]

    return get


def train_dual_cmd(*settings: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_dual.py"), *FAST, *settings]


def killer_cmd(*settings: str) -> list[str]:
    """train_dual.py run through tests/killer.py: same arguments and behaviour, plus its KILLER_* fault injection."""
    return [sys.executable, str(ROOT / "tests" / "killer.py"), *FAST, *settings]


def run_train_dual(*settings: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the real script in a subprocess, as a user would; the output is kept for assertions."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(train_dual_cmd(*settings), capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def make_old_experiments(runs: Path) -> None:
    """exp1..exp5 in runs, created in that order (exp5 newest by ctime): exp2 has best mAP50 0.95, exp3 a .keep, the
    rest mAP50 0.1; and exp5_best, a renamed experiment that is never a cleanup candidate."""
    for n, (map50, keep) in enumerate([(0.1, False), (0.95, False), (0.1, True), (0.1, False), (0.1, False)], 1):
        exp = runs / f"exp{n}"
        exp.mkdir(parents=True)
        (exp / "results.csv").write_text(f"epoch,metrics/mAP50(B)\n1,{map50}\n")
        if keep:
            (exp / ".keep").touch()
        time.sleep(0.02)  # distinct ctimes for the real filesystem
    (runs / "exp5_best").mkdir()


def refuse_network(mp: pytest.MonkeyPatch) -> list:
    """Every connection or name lookup in this process fails, as on a machine without network; the returned list
    records each attempt."""
    attempts = []

    def refuse(*args):
        attempts.append(args)
        raise OSError("network disabled in tests")

    mp.setattr(socket.socket, "connect", lambda self, *a: refuse(*a))
    mp.setattr(socket.socket, "connect_ex", lambda self, *a: refuse(*a))
    mp.setattr(socket, "getaddrinfo", lambda *a, **k: refuse(*a))
    return attempts


@pytest.fixture
def no_network(monkeypatch) -> list:
    return refuse_network(monkeypatch)
