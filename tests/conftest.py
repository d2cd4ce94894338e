"""Shared fixtures: a tiny copy of the bundled demo dataset, a model trained on it, and a way to run train_dual.py as
a user would."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "datasets" / "demo_night"
sys.path.insert(0, str(ROOT))

# Fast settings for real training runs on a CPU: tiny images, tiny batches, an optimizer step per batch, and no plots
# (drawing them is seconds of each tiny run; the tests that read plots give PLOTS=True after these).
FAST = ["IMGSZ=64", "BATCH=4", "NBS=4", "WORKERS=0", "CLEANUP_EVERY=1000", "PLOTS=False"]


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


def _move_pairs(root: Path, src: str, dst: str, names: list[str]) -> None:
    """Move pairs (RGB, IR, label) from split folder `src` to `dst`, as another folder of the same set."""
    for folder in ("images", "imagesIR", "labels"):
        (root / folder / dst).mkdir(parents=True, exist_ok=True)
        for f in (root / folder / src).iterdir():
            if f.stem in names:
                f.rename(root / folder / dst / f.name)


def folders_config(data: Path) -> Path:
    """A make_dataset set whose train split is two folders, listed under `train:`."""
    root = data.parent
    _move_pairs(root, "train", "extra", [p.stem for p in sorted((root / "images" / "train").iterdir())[::2]])
    data.write_text(data.read_text().replace("train: images/train", "train: [images/train, images/extra]"))
    return data


def image_list_config(data: Path) -> Path:
    """A make_dataset set given as image lists: train.txt with ./ paths (from the list's folder), val.txt absolute."""
    root = data.parent
    train = sorted((root / "images" / "train").iterdir())
    (root / "train.txt").write_text("".join(f"./images/train/{p.name}\n" for p in train))
    (root / "val.txt").write_text("".join(f"{p}\n" for p in sorted((root / "images" / "val").iterdir())))
    text = data.read_text().replace("train: images/train", "train: train.txt")
    data.write_text(text.replace("val: images/val", "val: val.txt"))
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


def train_demo(tmp: Path, model: Path) -> SimpleNamespace:
    """A 4-channel model of the yaml `model` trained on the 64 demo train pairs at imgsz 64 for 13 epochs, about 200
    optimizer steps: the fewest that give a model whose predictions depend on its input (mAP50 about 0.2 on the 4 val
    pairs). A 2-epoch model predicts the same frame-sized boxes whatever the pair: checks on it could not fail.
    `data`: its data yaml; `pt`: its best.pt. Copy `pt` elsewhere before writing beside it (test_export does)."""
    from yolofuse import YOLO

    data = make_dataset(tmp / "data", n_train=64, n_val=4)
    settings = dict(imgsz=64, batch=4, nbs=4, workers=0, device="cpu", cache="ram", mosaic=0.0, close_mosaic=0)
    # val and save only after the last epoch, and no plots: their cost is most of a short run's time
    YOLO(str(model)).train(
        data=str(data), epochs=13, save_dir=str(tmp / "run"), exist_ok=True, val=False, save=False, plots=False,
        **settings,
    )  # fmt: skip
    return SimpleNamespace(data=data, pt=tmp / "run" / "weights" / "best.pt")


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> SimpleNamespace:
    """yolov8n-fuse.yaml, trained by `train_demo`."""
    return train_demo(tmp_path_factory.mktemp("trained"), ROOT / "yolov8n-fuse.yaml")


@pytest.fixture(scope="session")
def trained26(tmp_path_factory) -> SimpleNamespace:
    """YOLO26n made RGB+IR (mid fusion: two stock YOLO26n backbones, its neck and end-to-end head), trained by
    `train_demo`."""
    from yolofuse import fuse

    tmp = tmp_path_factory.mktemp("trained26")
    return train_demo(tmp, fuse.write(fuse.resolve(Path("yolo26n.yaml"), "mid"), tmp))


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    """An MJPG .avi at 10 fps of the frames (BGR or gray), as a camera would record them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (w, h))
    for frame in frames:
        writer.write(frame if frame.ndim == 3 else cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def train_dual_cmd(*settings: str) -> list[str]:
    return [sys.executable, str(ROOT / "train_dual.py"), *FAST, *settings]


def killer_cmd(*settings: str) -> list[str]:
    """train_dual.py run through tests/killer.py: same arguments and behaviour, plus its KILLER_* fault injection."""
    return [sys.executable, str(ROOT / "tests" / "killer.py"), *FAST, *settings]


def run_train_dual(*settings: str, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    """Run the real script in a subprocess, as a user would; the output is kept for assertions."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(train_dual_cmd(*settings), capture_output=True, text=True, timeout=timeout, env=env, **kwargs)


def set_made_at(exp: Path, when: float) -> None:
    """Date the run in `exp` to `when` (seconds since the epoch): the mtimes of its results.csv, args.yaml, weights/
    and the files in it, which cleanup reads an experiment's age from."""
    for path in (exp / "results.csv", exp / "args.yaml", *(exp / "weights").glob("*"), exp / "weights"):
        if path.exists():
            os.utime(path, (when, when), follow_symlinks=False)


def make_old_experiments(runs: Path) -> None:
    """exp1..exp5 in runs, made an hour apart in that order (exp5 the newest): exp2 has best mAP50 0.95, exp3 a .keep,
    the rest mAP50 0.1; and exp5_best, a renamed experiment that is never a cleanup candidate."""
    for n, (map50, keep) in enumerate([(0.1, False), (0.95, False), (0.1, True), (0.1, False), (0.1, False)], 1):
        exp = runs / f"exp{n}"
        exp.mkdir(parents=True)
        (exp / "results.csv").write_text(f"epoch,metrics/mAP50(B)\n1,{map50}\n")
        if keep:
            (exp / ".keep").touch()
        set_made_at(exp, time.time() - (6 - n) * 3600)
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
