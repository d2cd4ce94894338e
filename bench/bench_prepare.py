"""Time `python -m yolofuse.prepare llvip` on a 15,000-pair tree in LLVIP's layout (target < 60 s), with small images.

    python bench/bench_prepare.py [--pairs 15000] [--keep]

Builds visible/{train,test}, infrared/{train,test} (80 x 64 JPEGs) and Annotations/*.xml (1-4 persons each, some
past the border) in a temporary folder, then times, in this one run:
  - the command line, end to end (Python start-up and imports included), into a new DST;
  - a re-run on that DST (a full rebuild);
  - the same conversion with --copy (what a DST on another filesystem gets);
  - the floor: hard-linking the same 30,000 images with no parsing at all (`cp -al`).
Real LLVIP frames are 1280 x 1024 JPEGs of ~100-200 KB: links cost the same, copies cost far more.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 60.0
W, H = 80, 64


def build_llvip(src: Path, pairs: int) -> None:
    """`pairs` frames, 80% train and 20% test, as LLVIP names them. The images are hard links to 8 JPEGs: prepare
    links or copies them the same way, and building and deleting the tree is quicker."""
    rng = np.random.default_rng(0)
    variants = []
    for k in range(8):
        variants.append(src.parent / "variants" / f"{k}.jpg")
        variants[-1].parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(variants[-1]), rng.integers(0, 255, (H, W, 3), np.uint8))
    n_train = pairs * 4 // 5
    for k in range(pairs):
        split, stem = ("train", f"{10001 + k:06d}") if k < n_train else ("test", f"{190001 + k - n_train:06d}")
        for modality in ("visible", "infrared"):
            folder = src / modality / split
            if k in (0, n_train):
                folder.mkdir(parents=True)
            os.link(variants[k % len(variants)], folder / f"{stem}.jpg")
        objects = ""
        for _ in range(1 + k % 4):
            x0, y0 = int(rng.integers(0, W - 8)), int(rng.integers(0, H - 8))
            x1, y1 = x0 + int(rng.integers(4, 30)), y0 + int(rng.integers(8, 40))  # some pass the border
            objects += (
                f"\t<object>\r\n\t\t<name>person</name>\r\n\t\t<pose>Unspecified</pose>\r\n\t\t<truncated>0</truncated>"
                f"\r\n\t\t<difficult>0</difficult>\r\n\t\t<bndbox>\r\n\t\t\t<xmin>{x0}</xmin>\r\n\t\t\t<ymin>{y0}</ymin>"
                f"\r\n\t\t\t<xmax>{x1}</xmax>\r\n\t\t\t<ymax>{y1}</ymax>\r\n\t\t</bndbox>\r\n\t</object>\r\n"
            )
        if k == 0:
            (src / "Annotations").mkdir()
        (src / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation>\r\n\t<folder>LLVIP</folder>\r\n\t<filename>{stem}.jpg</filename>\r\n\t<size>\r\n"
            f"\t\t<width>{W}</width>\r\n\t\t<height>{H}</height>\r\n\t\t<depth>3</depth>\r\n\t</size>\r\n{objects}"
            "</annotation>\r\n",
            newline="",
        )


def timed_cli(*args: str) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "yolofuse.prepare", *args]
    result = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    if result.returncode:
        sys.exit(f"prepare failed: {result.stdout}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=15_000)
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (its path is printed)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        src = work / "LLVIP"
        t = time.perf_counter()
        build_llvip(src, args.pairs)
        print(f"built {args.pairs:,} pairs in LLVIP's layout in {time.perf_counter() - t:.1f} s ({work})")

        t = time.perf_counter()
        shutil.copytree(src / "visible", work / "floor" / "visible", copy_function=os.link)
        shutil.copytree(src / "infrared", work / "floor" / "infrared", copy_function=os.link)
        floor = time.perf_counter() - t
        first = timed_cli("llvip", str(src), str(work / "out"))
        again = timed_cli("llvip", str(src), str(work / "out"))
        copies = timed_cli("llvip", str(src), str(work / "copies"), "--copy")
        assert len(list((work / "out" / "labels").rglob("*.txt"))) == args.pairs

        print(f"{'what':<52}{'seconds':>9}{'pairs/s':>9}{'vs target':>11}{'vs floor':>10}")
        for what, s in (
            ("prepare, command line end to end, new DST", first),
            ("prepare again on the same DST (full rebuild)", again),
            ("prepare --copy (DST on another filesystem)", copies),
            (f"floor: hard-link the {2 * args.pairs:,} images only (cp -al)", floor),
        ):
            print(f"{what:<52}{s:>9.2f}{args.pairs / s:>9.0f}{s / TARGET_S:>11.2f}{s / floor:>10.1f}")
        print(f"target: < {TARGET_S:.0f} s for the first row ('vs target' < 1)")
    finally:
        if not args.keep:
            t = time.perf_counter()
            shutil.rmtree(work, ignore_errors=True)
            print(f"deleted the temporary trees in {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
