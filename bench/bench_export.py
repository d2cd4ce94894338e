"""Val parity of exported models: the same trained model as .pt, TorchScript, ONNX (and OpenVINO where installed).

    python bench/bench_export.py [BEST_PT] [DATA] [IMGSZ]   (default: runs/fuse/weights/best.pt data_config.yaml 256)

Run it after the README's demo command. Exports go to a temporary folder; each format is validated on DATA at IMGSZ
on the CPU. `.pt` is validated twice: with its default rectangular batches, and square (`rect=False`), as the
fixed-size exports must be. Prints mAP50 / mAP50-95 per format and the difference to the square `.pt` (target: at
most 0.005).
"""

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from yolofuse import YOLO  # noqa: E402

BEST = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "runs" / "fuse" / "weights" / "best.pt"
DATA = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT / "data_config.yaml"
IMGSZ = int(sys.argv[3]) if len(sys.argv) > 3 else 256
FORMATS = ["torchscript", "onnx"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


def val(weights: Path, rect: bool) -> tuple[float, float]:
    box = YOLO(str(weights)).val(data=str(DATA), imgsz=IMGSZ, device="cpu", rect=rect, plots=False, verbose=False).box
    return box.map50, box.map


def main() -> None:
    if not BEST.is_file():
        sys.exit(f"error: {BEST} not found; run the README's demo command first, or pass a best.pt")
    with tempfile.TemporaryDirectory() as tmp:
        best = Path(tmp) / "best.pt"
        shutil.copyfile(BEST, best)
        rows = {".pt (rectangular batches, the default)": val(best, rect=True), ".pt, rect=False": val(best, False)}
        for fmt in FORMATS:
            options = {"simplify": False} if fmt == "onnx" else {}  # onnxslim is optional (docs/use.md)
            exported = YOLO(str(best)).export(format=fmt, imgsz=IMGSZ, **options)
            rows[fmt] = val(Path(exported), rect=False)
    square = rows[".pt, rect=False"]
    print(f"\n{BEST} on {DATA.name}, imgsz {IMGSZ}, CPU\n")
    print("| model | mAP50 | mAP50-95 | vs `.pt`, rect=False |\n|---|---|---|---|")
    for name, (map50, map5095) in rows.items():
        diff = max(abs(map50 - square[0]), abs(map5095 - square[1]))
        print(f"| {name} | {map50:.4f} | {map5095:.4f} | {diff:.4f} |")


if __name__ == "__main__":
    main()
