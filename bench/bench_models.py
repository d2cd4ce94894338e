"""Stock detectors made RGB+IR: size, speed and accuracy of each family and fusion on the demo set, one table.

    python bench/bench_models.py [EPOCHS] [IMGSZ] [--families yolov8n,yolo11n,yolo26n] [-o bench_models.md]

For each family: stock, on the RGB half (3 channels); then mid, p3 and early fusion (yolofuse.fuse) on the pairs,
from scratch and from that stock run's best.pt ("RGB-pretrained": its weights in both streams, as MODEL=*.pt does).
YOLO26n also on the IR half alone (1 channel). Same settings for all (bench/ablation.py's: batch 8, seed 0, CPU).

Columns: parameters and GFLOPs at 640 of the trained model (the demo's 3 classes, its input channels), training
seconds per epoch (median over epochs 2..EPOCHS, training only, no validation; the median, so that a minute of
other load on the machine does not move a row), and mAP50 / mAP50-95 of best.pt on val. "time x" and "GFLOPs x"
are the row's over its family's stock RGB row: a second stream should cost what its arithmetic costs, so the two
should be close. The table goes to stdout and to the -o file (markdown).
"""

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from ablation import PAIRED, ROOT, SETTINGS, single_modality_data, train_and_validate  # puts ROOT on sys.path
from ultralytics import YOLO as StockYOLO
from ultralytics.utils.torch_utils import get_flops

import yolofuse
from yolofuse import fuse, pretrained

FUSIONS = ("mid", "p3", "early")


def timed(model) -> list[float]:
    """Training seconds of each epoch, filled in as `model` trains."""
    seconds, start = [], []
    model.add_callback("on_train_epoch_start", lambda trainer: start.append(time.perf_counter()))
    model.add_callback("on_train_epoch_end", lambda trainer: seconds.append(time.perf_counter() - start[-1]))
    return seconds


def row(model, data: Path, run: Path, epochs: int, imgsz: int) -> dict:
    seconds = timed(model)
    scores = train_and_validate(model, data, run, epochs, imgsz)
    best = type(model)(str(run / "weights" / "best.pt")).model
    return {
        "params": sum(p.numel() for p in best.parameters()) / 1e6,
        "gflops": get_flops(best, 640),
        "s/epoch": statistics.median(seconds[1:] or seconds),
        "map": scores["all"],
    }


def fused(model: Path, fusion: str, work: Path) -> yolofuse.YOLO:
    """The RGB+IR model of a stock yaml or checkpoint, as train_dual.py builds it (MODEL=..., FUSION=...)."""
    architecture = fuse.resolve(model, fusion)
    built = yolofuse.YOLO(str(fuse.write(architecture, work)))
    if architecture.weights:
        print(pretrained.start_from(built, architecture.weights, PAIRED))
    return built


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("epochs", nargs="?", type=int, default=40)
    parser.add_argument("imgsz", nargs="?", type=int, default=256)
    parser.add_argument("--families", default="yolov8n,yolo11n,yolo26n")
    parser.add_argument("-o", "--output", default="bench_models.md")
    args = parser.parse_args()
    rows, size = {}, (args.epochs, args.imgsz)  # rows: (family, variant, start) -> row
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        rgb, ir = single_modality_data(work, "images", 3), single_modality_data(work, "imagesIR", 1)
        for family in args.families.split(","):
            stock_run = work / family / "rgb"
            rows[family, "stock, RGB only", "scratch"] = row(StockYOLO(f"{family}.yaml"), rgb, stock_run, *size)
            if family == "yolo26n":
                ir_run = work / family / "ir"
                rows[family, "stock, IR only", "scratch"] = row(StockYOLO(f"{family}.yaml"), ir, ir_run, *size)
            for fusion in FUSIONS:
                for start, source in (("scratch", Path(f"{family}.yaml")), ("RGB-pretrained", stock_run)):
                    folder = work / family / f"{fusion}-{start}"
                    folder.mkdir(parents=True)
                    source = source / "weights" / "best.pt" if start != "scratch" else source
                    rows[family, fusion, start] = row(fused(source, fusion, folder), PAIRED, folder / "run", *size)
                    print(f"ROW {family} {fusion} {start}: {rows[family, fusion, start]}", flush=True)
    lines = [
        f"Demo set ({PAIRED.name}: 64 train / 32 val pairs), {args.epochs} epochs, imgsz {args.imgsz}, batch "
        f"{SETTINGS['batch']}, seed 0, {os.cpu_count()}-core CPU. Time and GFLOPs x: over the family's stock RGB row.",
        "",
        "| model | fusion | start | params (M) | GFLOPs@640 | s/epoch | time x | GFLOPs x | mAP50 | mAP50-95 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (family, variant, start), r in rows.items():
        base = rows[family, "stock, RGB only", "scratch"]
        lines.append(
            f"| {family} | {variant} | {start} | {r['params']:.2f} | {r['gflops']:.1f} | {r['s/epoch']:.1f} | "
            f"{r['s/epoch'] / base['s/epoch']:.2f} | {r['gflops'] / base['gflops']:.2f} | "
            f"{r['map'][0]:.3f} | {r['map'][1]:.3f} |"
        )
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    Path(args.output).write_text(table)
    print(f"Written to {Path(args.output).resolve()}")


if __name__ == "__main__":
    os.chdir(ROOT)  # data_config.yaml's dataset path is relative to the repository
    main()
