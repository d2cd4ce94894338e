"""Make docs/demo_prediction.png, the README's picture: one demo val pair predicted, RGB | IR with the same boxes.

    python docs/make_picture.py [BEST_PT] [--epochs N]

Without BEST_PT it first trains the bundled demo with the README's demo command (`EPOCHS=40 IMGSZ=256 BATCH=8
NBS=8`, or `--epochs N`) into a temporary run folder, on the CPU. The pair is the first val pair whose labels hold
all three classes; `predict(..., save=True)` writes it as RGB | IR, and the PNG is stored with a 256-colour palette
to keep it small.
"""

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolofuse import YOLO  # noqa: E402

DEMO = ROOT / "datasets" / "demo_night"
PICTURE = ROOT / "docs" / "demo_prediction.png"
CLASSES = 3  # person, sign, car


def pair_with_every_class() -> Path:
    """The first val RGB image whose label file holds every class: boxes on both halves, whatever each one shows."""
    for label in sorted((DEMO / "labels" / "val").glob("*.txt")):
        if len({line.split()[0] for line in label.read_text().splitlines() if line.strip()}) == CLASSES:
            return DEMO / "images" / "val" / f"{label.stem}.jpg"
    sys.exit(
        f"error: no val pair in {DEMO} holds all {CLASSES} classes; regenerate it: python datasets/make_demo_night.py"
    )


def train_demo(runs_dir: Path, epochs: int) -> Path:
    command = [sys.executable, str(ROOT / "train_dual.py"), f"EPOCHS={epochs}", "IMGSZ=256", "BATCH=8", "NBS=8"]
    subprocess.run([*command, "DEVICE=cpu", f"RUNS_DIR={runs_dir}"], check=True)
    return runs_dir / "weights" / "best.pt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("best", nargs="?", type=Path, help="a trained demo best.pt (default: train one first)")
    parser.add_argument("--epochs", type=int, default=40, help="epochs of the demo training (default 40)")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        best = opts.best or train_demo(Path(tmp) / "runs", opts.epochs)
        if not best.is_file():
            sys.exit(f"error: {best} not found; pass a trained best.pt, or none to train the demo first")
        source = pair_with_every_class()
        result = YOLO(str(best)).predict(str(source), imgsz=256, device="cpu", save=True, project=tmp, name="predict")
        saved = Path(result[0].save_dir) / source.name
        Image.open(saved).convert("RGB").quantize(colors=256).save(PICTURE, optimize=True)
    print(f"{PICTURE} ({PICTURE.stat().st_size / 1e3:.0f} kB): {source.relative_to(ROOT)}, {best}")


if __name__ == "__main__":
    main()
