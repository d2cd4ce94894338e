"""Does fusion help? Train RGB-only, IR-only, early fusion and mid fusion on the demo set with identical settings.

    python bench/ablation.py [EPOCHS] [IMGSZ]

RGB-only and IR-only are stock YOLOv8n on one modality (3-channel RGB, 1-channel IR), early and mid fusion are
this project's yamls on the stacked 4-channel input. Prints mAP50 and mAP50-95 per class and overall on val.

Does a pretrained start help? "mid fusion, from RGB only" is mid fusion started from the RGB-only run's best.pt
(yolofuse.pretrained, as WEIGHTS= does), trained with the same settings. A second table compares it with mid fusion
from scratch at equal epochs: the mAP50-95 of each run's own validation after epochs 5, 10 and EPOCHS (results.csv).
"""

import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import ultralytics  # noqa: E402

import yolofuse  # noqa: E402
from yolofuse import pretrained  # noqa: E402

DEMO = ROOT / "datasets" / "demo_night"
PAIRED = ROOT / "data_config.yaml"
COMPARED = ("mid fusion", "mid fusion, from RGB only")  # the pretrained start, against the same model from scratch
NAMES = "names:\n  0: person\n  1: sign\n  2: car\n"
SETTINGS = dict(batch=8, nbs=8, workers=0, device="cpu", seed=0, plots=False, verbose=False)  # and epochs, imgsz


def single_modality_data(work: Path, folder: str, channels: int) -> Path:
    """A stock-layout copy of one modality: its frames as images/, with the shared labels (copies, since
    Ultralytics resolves links and would then look for labels beside the original folder)."""
    root = work / folder
    shutil.copytree(DEMO / folder, root / "images")
    shutil.copytree(DEMO / "labels", root / "labels")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: images/train\nval: images/val\nchannels: {channels}\n{NAMES}")
    return data


def train_and_validate(model, data: Path, run: Path, epochs: int, imgsz: int) -> dict:
    model.train(data=str(data), save_dir=str(run), epochs=epochs, imgsz=imgsz, **SETTINGS)
    best = type(model)(str(run / "weights" / "best.pt"))
    box = best.val(data=str(data), imgsz=imgsz, batch=16, device="cpu", plots=False, verbose=False).box
    per_class = {name: (box.ap50[i], box.ap[i]) for i, name in enumerate(best.names.values())}
    return {**per_class, "all": (box.map50, box.map)}


def mid_fusion_from(weights: Path) -> yolofuse.YOLO:
    model = yolofuse.YOLO(str(ROOT / "yolov8n-fuse.yaml"))
    print(pretrained.start_from(model, weights, PAIRED))
    return model


def run_name(variant: str) -> str:
    return variant.replace(" ", "_").replace(",", "")


def main(epochs: int, imgsz: int):
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        variants = {  # name: (model, built when its turn comes; data); the last one starts from the first's best.pt
            "RGB only": (lambda: ultralytics.YOLO("yolov8n.yaml"), single_modality_data(work, "images", 3)),
            "IR only": (lambda: ultralytics.YOLO("yolov8n.yaml"), single_modality_data(work, "imagesIR", 1)),
            "early fusion": (lambda: yolofuse.YOLO(str(ROOT / "models" / "yolov8n-fuse-early.yaml")), PAIRED),
            "mid fusion": (lambda: yolofuse.YOLO(str(ROOT / "yolov8n-fuse.yaml")), PAIRED),
            "mid fusion, from RGB only": (
                lambda: mid_fusion_from(work / run_name("RGB only") / "weights" / "best.pt"),
                PAIRED,
            ),
        }
        results, by_epoch = {}, {}
        for name, (make_model, data) in variants.items():
            results[name] = train_and_validate(make_model(), data, work / run_name(name), epochs, imgsz)
            if name in COMPARED:
                csv = pd.read_csv(work / run_name(name) / "results.csv").rename(columns=str.strip)
                by_epoch[name] = dict(zip(csv["epoch"], csv["metrics/mAP50-95(B)"]))
    classes = list(next(iter(results.values())))
    print(f"\nAblation on {DEMO.name}: {epochs} epochs, imgsz {imgsz}, batch 8, seed 0, CPU. Cells: mAP50 / mAP50-95")
    print("| model | " + " | ".join(classes) + " |")
    print("|---" * (len(classes) + 1) + "|")
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{row[c][0]:.3f} / {row[c][1]:.3f}" for c in classes) + " |")
    shown = sorted({e for e in (5, 10, epochs) if e <= epochs})
    print("\nPretrained start vs scratch: mAP50-95 of each run's validation after the given epoch (EMA weights)")
    print("| model | " + " | ".join(f"epoch {e}" for e in shown) + " |")
    print("|---" * (len(shown) + 1) + "|")
    for name in COMPARED:
        print(f"| {name} | " + " | ".join(f"{by_epoch[name][e]:.3f}" for e in shown) + " |")


if __name__ == "__main__":
    os.chdir(ROOT)  # data_config.yaml's dataset path is relative to the repository
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 60, int(sys.argv[2]) if len(sys.argv) > 2 else 256)
