"""Does fusion help? Train RGB-only, IR-only, early fusion and mid fusion on the demo set with identical settings.

    python bench/ablation.py [EPOCHS] [IMGSZ]

RGB-only and IR-only are stock YOLOv8n on one modality (3-channel RGB, 1-channel IR), early and mid fusion are
this project's yamls on the stacked 4-channel input. Prints mAP50 and mAP50-95 per class and overall on val.
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ultralytics  # noqa: E402

import yolofuse  # noqa: E402

EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 60
IMGSZ = int(sys.argv[2]) if len(sys.argv) > 2 else 256
DEMO = ROOT / "datasets" / "demo_night"
NAMES = "names:\n  0: person\n  1: sign\n  2: car\n"
SETTINGS = dict(epochs=EPOCHS, imgsz=IMGSZ, batch=8, nbs=8, workers=0, device="cpu", seed=0, plots=False, verbose=False)


def single_modality_data(work: Path, folder: str, channels: int) -> Path:
    """A stock-layout copy of one modality: its frames as images/, with the shared labels (copies, since
    Ultralytics resolves links and would then look for labels beside the original folder)."""
    root = work / folder
    shutil.copytree(DEMO / folder, root / "images")
    shutil.copytree(DEMO / "labels", root / "labels")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nchannels: {channels}\n{NAMES}")
    return data


def train_and_validate(model, data: Path, run: Path) -> dict:
    model.train(data=str(data), save_dir=str(run), **SETTINGS)
    best = type(model)(str(run / "weights" / "best.pt"))
    box = best.val(data=str(data), imgsz=IMGSZ, batch=16, device="cpu", plots=False, verbose=False).box
    per_class = {name: (box.ap50[i], box.ap[i]) for i, name in enumerate(best.names.values())}
    return {**per_class, "all": (box.map50, box.map)}


def main():
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {
            "RGB only": (ultralytics.YOLO("yolov8n.yaml"), single_modality_data(work, "images", 3)),
            "IR only": (ultralytics.YOLO("yolov8n.yaml"), single_modality_data(work, "imagesIR", 1)),
            "early fusion": (
                yolofuse.YOLO(str(ROOT / "models" / "yolov8n-fuse-early.yaml")),
                ROOT / "data_config.yaml",
            ),
            "mid fusion": (yolofuse.YOLO(str(ROOT / "yolov8n-fuse.yaml")), ROOT / "data_config.yaml"),
        }
        results = {}
        for name, (model, data) in variants.items():
            results[name] = train_and_validate(model, data, work / name.replace(" ", "_"))
    classes = list(next(iter(results.values())))
    print(f"\nAblation on {DEMO.name}: {EPOCHS} epochs, imgsz {IMGSZ}, batch 8, seed 0, CPU. Cells: mAP50 / mAP50-95")
    print("| model | " + " | ".join(classes) + " |")
    print("|---" * (len(classes) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c][0]:.3f} / {row[c][1]:.3f}" for c in classes) + " |")


if __name__ == "__main__":
    os.chdir(ROOT)  # data_config.yaml's dataset path is relative to the repository
    main()
