"""Paired loader vs stock's single-image loader, on LLVIP-like pairs it generates itself.

    python bench/bench_loader.py [PAIRS] [ROUNDS]      (defaults: 256 pairs, 3 rounds)

Writes PAIRS pairs of 1280x1024 frames into a temporary folder: RGB as JPEG quality 95, IR as a 3-channel gray JPEG
(as LLVIP stores it), night scenes with texture, hard edges and sensor noise so that decoding costs what it costs on
camera frames, and the same frames as PNG. Then, with the same hyp for every loader (stock defaults: mosaic on),
imgsz 640, it times a pass over the pairs in a fixed shuffled order, each image decoded once, as an epoch does:
- stock `YOLODataset` on the RGB frames alone (the reference, 1.00x),
- ours (`PairedDataset`) with `channels: 4` and with `channels: 6`,
first in this one process (samples per CPU-second of the process: the same as per second on a quiet machine, and
steady when other jobs share it), then through a `DataLoader` with 2 workers (wall clock, worker start-up left out).
Batch 4, so stock's mosaic buffer holds 32 images and most of a pass runs in the steady state of a long epoch. Each
round runs every loader once, interleaved; the best round counts. Ratios are vs stock, measured in the same run.
Targets: `channels: 4` >= 1.0x stock, `channels: 6` >= 0.6x. Last, the cost of checking every pair before training.
"""

import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ultralytics.cfg import get_cfg  # noqa: E402
from ultralytics.data.build import build_dataloader, build_yolo_dataset  # noqa: E402
from ultralytics.utils import LOGGER  # noqa: E402

import yolofuse  # noqa: E402,F401  (offline settings before Ultralytics is used)
from yolofuse.engine import build_paired_dataset  # noqa: E402

W, H, QUALITY = 1280, 1024, 95  # LLVIP frames
IMGSZ, BATCH, WORKERS = 640, 4, 2
CHECKED_PAIRS = 15_000  # about LLVIP's size, for the cost of checking every pair before training


def smooth(rng, cell: int, channels: int) -> np.ndarray:
    """Noise at a scale of `cell` pixels: large cells are lighting, small ones texture."""
    small = rng.standard_normal((H // cell + 1, W // cell + 1, channels)).astype(np.float32)
    return cv2.resize(small, (W, H), interpolation=cv2.INTER_CUBIC).reshape(H, W, channels)


def frame(rng, channels: int, base: float, detail: float, noise: float, boxes) -> np.ndarray:
    """A night street scene: dim lighting gradients, texture, objects with hard edges (the labelled ones), noise."""
    img = base * (1 + 0.6 * smooth(rng, 256, channels)) + 10 * smooth(rng, 48, channels) + detail * smooth(rng, 6, 1)
    for _ in range(20):  # background clutter
        x, y = int(rng.integers(0, W - 60)), int(rng.integers(0, H - 60))
        w, h = int(rng.integers(15, 200)), int(rng.integers(15, 200))
        cv2.rectangle(img, (x, y), (x + w, y + h), [float(v) for v in rng.uniform(10, 200, channels)], -1)
    for x, y, w, h in boxes:  # the labelled objects, at the same place in both modalities
        cv2.rectangle(img, (x, y), (x + w, y + h), [float(v) for v in rng.uniform(120, 250, channels)], -1)
    img += rng.normal(0, noise, (H, W, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_pairs(root: Path, n: int) -> None:
    """images/, imagesIR/ and labels/ for the JPEG set in root/jpg and the PNG set in root/png."""
    rng = np.random.default_rng(0)
    for k in range(n):
        boxes = [(int(rng.integers(0, W - 80)), int(rng.integers(0, H - 200)), 40, 160) for _ in range(4)]
        rgb = frame(rng, 3, base=40, detail=1, noise=0.8, boxes=boxes)
        ir = cv2.GaussianBlur(frame(rng, 1, base=80, detail=1, noise=0.8, boxes=boxes), (0, 0), 1.5)  # softer
        ir = cv2.merge([ir] * 3)  # LLVIP stores IR as 3 equal channels
        label = "".join(
            f"0 {(x + w / 2) / W:.6f} {(y + h / 2) / H:.6f} {w / W:.6f} {h / H:.6f}\n" for x, y, w, h in boxes
        )
        for fmt, params in (("jpg", [cv2.IMWRITE_JPEG_QUALITY, QUALITY]), ("png", [])):
            for folder, img in (("images", rgb), ("imagesIR", ir)):
                path = root / fmt / folder / "train" / f"{k:05d}.{fmt}"
                path.parent.mkdir(parents=True, exist_ok=True)
                cv2.imwrite(str(path), img, params)
            (root / fmt / "labels" / "train").mkdir(parents=True, exist_ok=True)
            (root / fmt / "labels" / "train" / f"{k:05d}.txt").write_text(label)


def mean_kb(files) -> float:
    return np.mean([f.stat().st_size for f in files]) / 1000


def ms_per_call(fn, files) -> float:
    """Process CPU ms per call, best of 3 passes over the files."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for f in files:
            fn(f)
        best = min(best, (time.process_time() - start) / len(files) * 1000)
    return best


def build(kind: str, images: Path, hyp):
    """'stock': YOLODataset on the RGB frames; 'ours4'/'ours6': PairedDataset with that many channels."""
    if kind == "stock":
        data = {"names": {0: "person"}, "nc": 1, "channels": 3}
        return build_yolo_dataset(hyp, str(images), BATCH, data, mode="train", stride=32)
    data = {"names": {0: "person"}, "nc": 1, "channels": int(kind[-1])}
    return build_paired_dataset(hyp, str(images), BATCH, data, mode="train", stride=32)


def forget_images(ds) -> None:
    """Empty the mosaic buffer, so that the next pass decodes every image once, as an epoch does."""
    ds.ims, ds.im_hw0, ds.im_hw = [None] * ds.ni, [None] * ds.ni, [None] * ds.ni
    ds.buffer.clear()


def in_process(ds) -> tuple[float, float]:
    """(samples per CPU-second, CPU ms per sample spent in load_image) over one pass in this process."""
    forget_images(ds)
    order = np.random.default_rng(1).permutation(len(ds)).tolist()
    random.seed(0)
    np.random.seed(0)
    load_image, loading = ds.load_image, [0.0]

    def timed_load_image(*args, **kwargs):  # decoding and stacking, as opposed to augmenting
        start = time.process_time()
        out = load_image(*args, **kwargs)
        loading[0] += time.process_time() - start
        return out

    ds.load_image = timed_load_image
    try:
        start = time.process_time()
        for i in order:
            ds[i]
        return len(order) / (time.process_time() - start), loading[0] / len(order) * 1000
    finally:
        del ds.load_image


def dataloader_rate(ds) -> float:
    """Samples/s through a DataLoader with WORKERS workers, timed from the first batch on (worker start-up left out)."""
    forget_images(ds)
    loader = build_dataloader(ds, BATCH, WORKERS, shuffle=True)
    try:
        batches = iter(loader)
        next(batches)
        start, n = time.perf_counter(), 0
        for batch in batches:
            n += len(batch["img"])
        return n / (time.perf_counter() - start)
    finally:
        loader.close()


LOADERS = {"stock": "stock YOLODataset, RGB only", "ours4": "ours, channels: 4", "ours6": "ours, channels: 6"}


def compare(title: str, datasets: dict, rounds: int, workers: bool) -> dict:
    """Best of `rounds` interleaved passes per loader; in one process, also where each sample's time goes."""
    rate, load_ms = dict.fromkeys(datasets, 0.0), dict.fromkeys(datasets, 0.0)
    for _ in range(rounds):
        for kind, ds in datasets.items():
            if workers:
                rate[kind] = max(rate[kind], dataloader_rate(ds))
            else:
                r, load = in_process(ds)
                if r > rate[kind]:
                    rate[kind], load_ms[kind] = r, load
    print(f"\n{title}\n  {'loader':<30}{'samples/s':>10}{'vs stock':>10}", end="")
    print("" if workers else f"{'ms/sample: load':>18}{'augment':>9}")
    for kind, ds in datasets.items():
        line = f"  {LOADERS[kind]:<30}{rate[kind]:>10.1f}{rate[kind] / rate['stock']:>9.2f}x"
        print(line if workers else f"{line}{load_ms[kind]:>18.2f}{1000 / rate[kind] - load_ms[kind]:>9.2f}")
    return rate


def check_cost(root: Path, n: int = CHECKED_PAIRS) -> None:
    """Seconds to build the label cache of n pairs (stock's scan of every RGB image and label), stock vs ours (the
    same scan plus every IR header). It runs once; later launches load the cache until a file changes."""
    # Flat frames: the check reads headers only, and these have the headers of LLVIP's files at a tenth of the bytes.
    rgb = cv2.imencode(".jpg", np.full((H, W, 3), 60, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()
    ir = cv2.imencode(".jpg", np.full((H, W, 3), 90, np.uint8), [cv2.IMWRITE_JPEG_QUALITY, QUALITY])[1].tobytes()
    for folder, content in (("images", rgb), ("imagesIR", ir), ("labels", b"0 0.5 0.5 0.1 0.3\n")):
        (root / folder / "train").mkdir(parents=True)
        suffix = ".txt" if folder == "labels" else ".jpg"
        for k in range(n):
            (root / folder / "train" / f"{k:05d}{suffix}").write_bytes(content)
    hyp = get_cfg(overrides={"imgsz": IMGSZ})
    seconds = {}
    for kind in ("stock", "ours4", "stock", "ours4"):  # twice each, interleaved: the second pass has warm file caches
        (root / "labels" / "train.cache").unlink(missing_ok=True)
        start = time.perf_counter()
        build(kind, root / "images" / "train", hyp)
        seconds[kind] = time.perf_counter() - start
    print(
        f"\nLabel cache of {n:,} pairs of {W}x{H} JPEGs (built once; later launches load it):\n"
        f"  stock, RGB images and labels    {seconds['stock']:6.2f} s\n"
        f"  ours, plus every IR header      {seconds['ours4']:6.2f} s  (the check adds "
        f"{seconds['ours4'] - seconds['stock']:.2f} s)"
    )


def main(pairs: int = 256, rounds: int = 3) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_loader_"))
    try:
        print(f"Writing {pairs} LLVIP-like pairs ({W}x{H}) as JPEG (quality {QUALITY}) and PNG into {root} ...")
        make_pairs(root, pairs)
        jpg, png = root / "jpg", root / "png"
        rgb_jpg, ir_jpg = sorted((jpg / "images" / "train").iterdir()), sorted((jpg / "imagesIR" / "train").iterdir())
        rgb_png, ir_png = sorted((png / "images" / "train").iterdir()), sorted((png / "imagesIR" / "train").iterdir())
        print(
            f"Mean file size: JPEG RGB {mean_kb(rgb_jpg):.0f} kB, IR {mean_kb(ir_jpg):.0f} kB; "
            f"PNG RGB {mean_kb(rgb_png):.0f} kB, IR {mean_kb(ir_png):.0f} kB"
        )

        size = (IMGSZ, IMGSZ * H // W)
        print("\nDecode cost per file (CPU ms):")
        decode = {}
        for what, fn, files in (
            ("RGB JPEG, full decode + resize to 640", lambda f: cv2.resize(cv2.imread(str(f)), size), rgb_jpg),
            ("RGB JPEG, decoded at 1/2", lambda f: cv2.imread(str(f), cv2.IMREAD_REDUCED_COLOR_2), rgb_jpg),
            ("IR JPEG, decoded as colour", lambda f: cv2.imread(str(f), cv2.IMREAD_COLOR), ir_jpg),
            ("IR JPEG, decoded as gray at 1/2", lambda f: cv2.imread(str(f), cv2.IMREAD_REDUCED_GRAYSCALE_2), ir_jpg),
            ("RGB PNG, full decode", lambda f: cv2.imread(str(f), cv2.IMREAD_COLOR), rgb_png),
            ("IR PNG, full decode as gray", lambda f: cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), ir_png),
        ):
            decode[what] = ms_per_call(fn, files)
            print(f"  {what:<40}{decode[what]:>6.2f}")

        hyp = get_cfg(overrides={"imgsz": IMGSZ, "mosaic": 1.0})
        LOGGER.setLevel("WARNING")  # dataset construction logs
        for fmt, images in (("JPEG", jpg / "images" / "train"), ("PNG", png / "images" / "train")):
            datasets = {kind: build(kind, images, hyp) for kind in LOADERS}
            rate = compare(f"{fmt} pairs, one process (best of {rounds}):", datasets, rounds, workers=False)
            if fmt == "JPEG":
                compare(f"{fmt} pairs, DataLoader with {WORKERS} workers:", datasets, rounds, workers=True)
        stock_ms, ir_ms = 1000 / rate["stock"], decode["IR PNG, full decode as gray"]
        print(
            "\nPNG has no reduced decoding, so ours decodes two full frames per sample where stock decodes one: with\n"
            f"channels: 4 the ratio is bounded by stock's {stock_ms:.1f} ms per sample / ({stock_ms:.1f} + the IR "
            f"frame's {ir_ms:.1f} ms) = {stock_ms / (stock_ms + ir_ms):.2f}x."
        )
        check_cost(root / "check")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(*map(int, sys.argv[1:3]))
