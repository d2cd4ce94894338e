"""Convert a public RGB+IR detection dataset, or your own export, into the paired layout train_dual.py reads.

    python -m yolofuse.prepare llvip /data/LLVIP /data/llvip-yolo
    python -m yolofuse.prepare voc my_export my_export-yolo --rgb rgb --ir ir --ann Annotations
    python train_dual.py DATA=/data/llvip-yolo/data.yaml

DST gets images/<split>, imagesIR/<split> and labels/<split>, then, last of all, DST/data.yaml: a DST without
data.yaml is unfinished. Images are hard links to SRC's files when both are on one filesystem, else copies;
nothing in SRC is ever written. A re-run rebuilds DST from SRC. The layouts each format reads, and the sources
they were taken from, are in docs/data.md ("Convert a public dataset").
"""

import argparse
import errno
import json
import os
import shlex
import shutil
import sys
import xml.etree.ElementTree as ET
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import yaml
from PIL import Image
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.utils import TQDM

from yolofuse.checkpoint import commit
from yolofuse.data import IR_DIR, RGB_DIR, SUPPORTED_CHANNELS

LABEL_DIR = "labels"
OUTPUTS = (RGB_DIR, IR_DIR, LABEL_DIR)  # the folders prepare owns in DST, besides data.yaml
MARKER = ".yolofuse-prepare"  # in DST: its images/, labels/ and data.yaml were written by prepare and may be replaced
STAGING = ".prepare-staging"  # in DST: the new tree is built here, then moved into place
GENERIC = {"voc": "ann", "coco": "json", "yolo": "labels"}  # your own export: its annotation option
OPTIONS = {  # the options each format takes, besides the common ones
    "llvip": set(),
    "kaist": set(),
    "m3fd": {"val_fraction"},
    "voc": {"rgb", "ir", "ann", "val_fraction"},
    "coco": {"rgb", "ir", "json", "val_fraction"},
    "yolo": {"rgb", "ir", "labels", "names", "val_fraction"},
}
TITLES = {"llvip": "LLVIP", "m3fd": "M3FD", "kaist": "KAIST", "voc": "VOC", "coco": "COCO", "yolo": "YOLO"}
FIXED_NAMES = {  # classes of the named datasets, in their authors' order
    "llvip": ["person"],
    "m3fd": ["People", "Car", "Bus", "Lamp", "Motorcycle", "Truck"],  # TarDAL's loader/m3fd.py
    "kaist": ["person"],  # the benchmark's class; people, cyclist and person? are its ignore labels
}
KAIST_SPLITS = {f"set{i:02d}": "train" if i < 6 else "val" for i in range(12)}  # the standard train/test sets
NAMED_SKIPS = 3  # skipped files named per reason in the summary

# Why a pair is left out; the summary counts each.
NO_IR, NO_RGB, NO_ANN, BROKEN, UNREADABLE = (
    "no IR partner",
    "no RGB partner",
    "annotation missing",
    "annotation broken",
    "unreadable image",
)

Box = tuple[str, float, float, float, float]  # class name, x0, y0, x1, y1 in pixels


class PrepareError(ValueError):
    """Bad input or options: the message is one line naming the file and the fix."""


class AnnotationError(ValueError):
    """An annotation file that cannot be read; the message says where in it."""


@dataclass
class Frame:
    """An RGB frame found in SRC, with its IR partner and annotation file (None where missing)."""

    key: str  # path relative to its RGB folder, without suffix ('sub/x')
    name: str  # output file stem, unique in the dataset
    rgb: Path
    ir: Path | None
    ann: Path | None
    split: str | None  # None: chosen later from a hash of the name (--val-fraction)


@dataclass
class Source:
    """What a format finds in SRC."""

    frames: list[Frame]
    read: Callable[[Frame, int, int], list[Box]]  # a frame's boxes, given its image width and height
    names: list[str] | None  # class order set by the dataset; None: sorted from the annotations
    skipped: list[tuple[str, Path]]  # IR frames without an RGB partner
    dropped: Counter = field(default_factory=Counter)  # boxes left out while reading (COCO crowd regions)


@dataclass
class Pair:
    frame: Frame
    size: tuple[int, int]
    boxes: list[Box]


@dataclass
class Summary:
    pairs: Counter = field(default_factory=Counter)  # split -> pairs
    boxes: Counter = field(default_factory=Counter)  # (split, class) -> boxes
    skipped: list[tuple[str, Path]] = field(default_factory=list)  # (reason, file)
    other_classes: Counter = field(default_factory=Counter)  # boxes left out: not in the class list
    dropped: Counter = field(default_factory=Counter)  # boxes left out for another reason
    clipped: int = 0  # boxes cut at the image border
    names: list[str] = field(default_factory=list)  # the classes written, in id order
    placed: str = "hard links"


# ----------------------------------------------------------------------------------------------------------------------
# Annotation readers: each returns pixel boxes (class, x0, y0, x1, y1) or raises AnnotationError.


def read_voc(path: Path) -> list[Box]:
    """Pascal VOC XML (LLVIP, M3FD, labelImg): <object><name>, <bndbox><xmin>... An empty file has no boxes."""
    data = path.read_bytes()
    if not data.strip():
        return []
    try:
        root = ET.fromstring(data)
    except ET.ParseError as e:
        raise AnnotationError(f"not valid XML ({e})") from None
    boxes = []
    for obj in root.findall("object"):
        name, bndbox = (obj.findtext("name") or "").strip(), obj.find("bndbox")
        if not name or bndbox is None:
            raise AnnotationError("an <object> lacks its <name> or <bndbox>")
        try:
            boxes.append((name, *(float(bndbox.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))))
        except (TypeError, ValueError):
            raise AnnotationError(f"the <bndbox> of a '{name}' is not four numbers xmin ymin xmax ymax") from None
    return boxes


def read_bbgt(path: Path) -> list[Box]:
    """KAIST's bbGt text: a '% bbGt version=3' header, then 'label x y w h occ vx vy vw vh ign ang' per object."""
    boxes = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        label, *fields = line.split() or [""]
        if not label or label.startswith("%"):
            continue
        try:
            x, y, w, h = (float(v) for v in fields[:4])
        except ValueError:
            raise AnnotationError(f"line {n} '{line.strip()[:40]}' is not 'label x y w h ...'") from None
        boxes.append((label, x, y, x + w, y + h))
    return boxes


def read_yolo(path: Path, names: list[str], w: int, h: int) -> list[Box]:
    """YOLO txt: 'class cx cy w h' per line, normalized to 0..1; class is an index into `names`."""
    boxes = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            cls, cx, cy, bw, bh = (float(v) for v in line.split())
            if cls != int(cls) or not 0 <= cls < len(names):
                raise ValueError
        except ValueError:
            raise AnnotationError(
                f"line {n} '{line.strip()[:40]}' is not 'class cx cy w h' with class 0..{len(names) - 1}"
            ) from None
        boxes.append((names[int(cls)], (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
    return boxes


# ----------------------------------------------------------------------------------------------------------------------
# Finding frames: one scanner per format.


def image_index(folder: Path) -> dict[str, Path]:
    """Images under `folder`, keyed by their path relative to it, without suffix ('sub/x')."""
    return {
        p.relative_to(folder).with_suffix("").as_posix(): p
        for p in folder.rglob("*")
        if p.suffix[1:].lower() in IMG_FORMATS and p.is_file()
    }


def pair_folders(rgb_dir: Path, ir_dir: Path, ann_of, split=None, prefix="") -> tuple[list[Frame], list]:
    """Frames of `rgb_dir` paired with `ir_dir`'s by relative path and stem (any image suffix); IR-only frames."""
    rgb, ir = image_index(rgb_dir), image_index(ir_dir)
    frames = []
    for key in sorted(rgb):
        ann = ann_of(key)
        name = prefix + key.replace("/", "_")
        frames.append(Frame(key, name, rgb[key], ir.get(key), ann if ann and ann.is_file() else None, split))
    return frames, [(NO_RGB, ir[key]) for key in sorted(ir.keys() - rgb.keys())]


def need_dir(folder: Path, fix: str) -> Path:
    if not folder.is_dir():
        raise PrepareError(f"{folder}: folder not found; {fix}")
    return folder


def scan_llvip(src: Path, opts) -> Source:
    """visible/{train,test}/x.jpg, infrared/{train,test}/x.jpg, Annotations/x.xml; test becomes val."""
    fix = "point SRC at the unpacked LLVIP folder that holds visible/, infrared/ and Annotations/"
    if not (src / "visible").is_dir() and (src / "LLVIP" / "visible").is_dir():
        fix = f"point SRC at {src / 'LLVIP'}"
    ann_dir = need_dir(src / "Annotations", fix)
    frames, skipped = [], []
    for src_split, split in (("train", "train"), ("test", "val")):
        rgb_dir, ir_dir = need_dir(src / "visible" / src_split, fix), need_dir(src / "infrared" / src_split, fix)
        found = pair_folders(rgb_dir, ir_dir, lambda key: ann_dir / f"{Path(key).name}.xml", split)
        frames, skipped = frames + found[0], skipped + found[1]
    return Source(frames, lambda frame, w, h: read_voc(frame.ann), FIXED_NAMES["llvip"], skipped)


def scan_m3fd(src: Path, opts) -> Source:
    """Vis/x.png, Ir/x.png, Annotation/x.xml side by side: at SRC (M3FD_Detection) or per scene (README tree)."""
    groups = sorted({p.parent for p in [src / "Vis", *src.rglob("Vis")] if p.is_dir()})
    if not groups:
        raise PrepareError(
            f"{src}: no Vis/ folder found; point SRC at the unpacked M3FD folder (Vis/, Ir/, Annotation/)"
        )
    frames, skipped = [], []
    for group in groups:
        fix = f"M3FD keeps Vis/, Ir/ and Annotation/ side by side in {group}"
        ir_dir, ann_dir = need_dir(group / "Ir", fix), need_dir(group / "Annotation", fix)
        prefix = "".join(f"{part}_" for part in group.relative_to(src).parts)  # scene folders may reuse names
        found = pair_folders(group / "Vis", ir_dir, lambda key, d=ann_dir: d / f"{key}.xml", prefix=prefix)
        frames, skipped = frames + found[0], skipped + found[1]
    return Source(frames, lambda frame, w, h: read_voc(frame.ann), FIXED_NAMES["m3fd"], skipped)


def scan_kaist(src: Path, opts) -> Source:
    """images/setXX/VYYY/{visible,lwir}/I00000.jpg and annotations/setXX/VYYY/I00000.txt (bbGt)."""
    fix = "point SRC at the KAIST folder that holds images/setXX/ and annotations/setXX/"
    images, annotations = need_dir(src / "images", fix), need_dir(src / "annotations", fix)
    frames, skipped = [], []
    for set_dir in sorted(p for p in images.iterdir() if p.name in KAIST_SPLITS and p.is_dir()):
        for video in sorted(p for p in set_dir.iterdir() if p.is_dir()):
            ann_dir = annotations / set_dir.name / video.name
            found = pair_folders(
                video / "visible",
                video / "lwir",
                lambda key, d=ann_dir: d / f"{key}.txt",
                KAIST_SPLITS[set_dir.name],
                prefix=f"{set_dir.name}_{video.name}_",  # frame names repeat in every video
            )
            frames, skipped = frames + found[0], skipped + found[1]
    if not frames:
        raise PrepareError(f"{images}: no setXX/VYYY/visible/ frames found; {fix}")
    return Source(frames, lambda frame, w, h: read_bbgt(frame.ann), FIXED_NAMES["kaist"], skipped)


def generic_dirs(src: Path, opts) -> tuple[Path, Path, Path]:
    """--rgb, --ir and the annotation option of a generic format, each resolved inside SRC."""
    flag = GENERIC[opts.format]
    if not (opts.rgb and opts.ir and getattr(opts, flag)):
        raise PrepareError(f"{src}: {opts.format} needs --rgb DIR --ir DIR --{flag} ... (paths inside SRC)")
    rgb, ir, ann = (src / p for p in (opts.rgb, opts.ir, getattr(opts, flag)))
    fix = f"give --rgb, --ir and --{flag} as paths inside SRC (or absolute)"
    if not (ann.is_file() if flag == "json" else ann.is_dir()):
        raise PrepareError(f"{ann}: {'file' if flag == 'json' else 'folder'} not found; {fix}")
    return need_dir(rgb, fix), need_dir(ir, fix), ann


def scan_voc(src: Path, opts) -> Source:
    rgb_dir, ir_dir, ann_dir = generic_dirs(src, opts)

    def ann_of(key):  # at the image's relative path, else flat by stem (labelImg's one folder)
        nested = ann_dir / f"{key}.xml"
        return nested if nested.is_file() else ann_dir / f"{Path(key).name}.xml"

    frames, skipped = pair_folders(rgb_dir, ir_dir, ann_of)
    return Source(frames, lambda frame, w, h: read_voc(frame.ann), None, skipped)


def scan_coco(src: Path, opts) -> Source:
    rgb_dir, ir_dir, json_file = generic_dirs(src, opts)
    crowd = Counter()
    by_key = read_coco(json_file, crowd)
    by_stem = {Path(key).name: boxes for key, boxes in by_key.items()}  # file_name may or may not carry a folder

    def lookup(key):  # None: the JSON does not list this image
        return by_key.get(key, by_stem.get(Path(key).name))

    frames, skipped = pair_folders(rgb_dir, ir_dir, lambda key: None if lookup(key) is None else json_file)
    return Source(frames, lambda frame, w, h: lookup(frame.key), None, skipped, crowd)


def read_coco(json_file: Path, dropped: Counter) -> dict[str, list[Box]]:
    """COCO detection JSON: images[].file_name, annotations[].bbox [x, y, w, h] in pixels, categories[].name."""
    try:
        data = json.loads(json_file.read_bytes())
        categories = {c["id"]: str(c["name"]) for c in data["categories"]}
        files = {im["id"]: Path(im["file_name"]).with_suffix("").as_posix() for im in data["images"]}
    except (ValueError, KeyError, TypeError) as e:
        raise PrepareError(
            f"{json_file}: not a COCO detection file ({type(e).__name__}: {e}); export it again"
        ) from None
    by_key = {key: [] for key in files.values()}  # a listed image without annotations is a negative
    for a in data.get("annotations", []):
        try:
            if a.get("iscrowd"):  # a region of many objects, not one box (COCO's own detectors ignore them)
                dropped["crowd regions (iscrowd: 1)"] += 1
                continue
            x, y, w, h = (float(v) for v in a["bbox"])
            by_key[files[a["image_id"]]].append((categories[a["category_id"]], x, y, x + w, y + h))
        except (KeyError, ValueError, TypeError):
            raise PrepareError(
                f"{json_file}: annotation id {a.get('id')} needs an image_id, a category_id and a bbox [x, y, w, h] "
                "that match its images and categories; export it again"
            ) from None
    return by_key


def yolo_names(src: Path, labels_dir: Path, names: str | None) -> list[str]:
    """--names, else classes.txt (labelImg) or obj.names (CVAT) beside the labels or in SRC."""
    if names:
        return split_list(names)
    for f in (labels_dir / "classes.txt", labels_dir / "obj.names", src / "classes.txt", src / "obj.names"):
        if f.is_file():
            return [line.strip() for line in f.read_text().splitlines() if line.strip()]
    raise PrepareError(f"{labels_dir}: no classes.txt or obj.names found; give the class names with --names a,b,...")


def scan_yolo(src: Path, opts) -> Source:
    rgb_dir, ir_dir, labels_dir = generic_dirs(src, opts)
    names = yolo_names(src, labels_dir, opts.names)
    frames, skipped = pair_folders(rgb_dir, ir_dir, lambda key: labels_dir / f"{key}.txt")
    return Source(frames, lambda frame, w, h: read_yolo(frame.ann, names, w, h), names, skipped)


SCANNERS = {
    "llvip": scan_llvip,
    "m3fd": scan_m3fd,
    "kaist": scan_kaist,
    "voc": scan_voc,
    "coco": scan_coco,
    "yolo": scan_yolo,
}


# ----------------------------------------------------------------------------------------------------------------------
# Reading, choosing classes and splits, writing.


def image_size(path: Path) -> tuple[int, int] | None:
    """(width, height) from the file header, without decoding the pixels; None if it is not a readable image.

    OpenCV, which the loader reads with, is asked first: that also keeps Ultralytics' patched `Image.open` from
    trying to install a HEIF plugin, with a log line, for each file Pillow cannot identify.
    """
    if not cv2.haveImageReader(str(path)):
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, SyntaxError, ValueError, ImportError):
        return None


def read_pairs(source: Source, summary: Summary, skip_broken: bool, progress: bool) -> list[Pair]:
    pairs = []
    for frame in TQDM(source.frames, desc="Reading", file=sys.stderr, disable=not progress):
        if frame.ir is None:
            summary.skipped.append((NO_IR, frame.rgb))
        elif frame.ann is None:
            summary.skipped.append((NO_ANN, frame.rgb))
        elif (size := image_size(frame.rgb)) is None:
            summary.skipped.append((UNREADABLE, frame.rgb))
        elif not cv2.haveImageReader(str(frame.ir)):  # its size is not needed, only that it can be read
            summary.skipped.append((UNREADABLE, frame.ir))
        else:
            try:
                pairs.append(Pair(frame, size, source.read(frame, *size)))
            except (AnnotationError, OSError) as e:
                if not skip_broken:
                    raise PrepareError(
                        f"{frame.ann}: {e}; fix or delete that file, or pass --skip-broken to leave its pair out"
                    ) from None
                summary.skipped.append((BROKEN, frame.ann))
    return pairs


def choose_names(pairs: list[Pair], source: Source, classes: list[str] | None, where: Path) -> list[str]:
    """--classes, in its order; else the dataset's own class list; else every class found, sorted."""
    found = {box[0] for pair in pairs for box in pair.boxes}
    if classes:
        if not found & set(classes):
            have = ", ".join(sorted(found)) or "no boxes at all"
            raise PrepareError(
                f"{where}: no box has class {', '.join(classes)}; the annotations hold {have}; fix --classes"
            )
        return classes
    if source.names:
        return source.names
    if not found:
        raise PrepareError(f"{where}: the annotations hold no boxes at all; check that --rgb and the annotations match")
    return sorted(found)


def assign_splits(pairs: list[Pair], val_fraction: float) -> None:
    """Pairs without a published split go to val when a hash of their name falls below `val_fraction`.

    The hash (not the order) decides, so a pair stays in its split when others are added or removed. A tiny set whose
    hashes all fall on one side gets one pair moved, so that both splits exist.
    """
    free = sorted((p for p in pairs if p.frame.split is None), key=lambda p: zlib.crc32(p.frame.name.encode()))
    for p in free:
        p.frame.split = "val" if zlib.crc32(p.frame.name.encode()) < val_fraction * 2**32 else "train"
    if len(free) >= 2 and free[0].frame.split == "train":
        free[0].frame.split = "val"
    if len(free) >= 2 and free[-1].frame.split == "val":
        free[-1].frame.split = "train"


def check_names(pairs: list[Pair]) -> None:
    """Subfolders are flattened into names ('a/b' is 'a_b'), so two frames could get the same one."""
    seen = {}
    for p in pairs:
        other = seen.setdefault((p.frame.split, p.frame.name), p.frame.rgb)
        if other != p.frame.rgb:
            raise PrepareError(f"{p.frame.rgb}: gets the output name {p.frame.name} of {other} too; rename one of them")


def yolo_lines(pair: Pair, index: dict[str, int], summary: Summary) -> str:
    """The label file: one 'class cx cy w h' line (normalized) per box, cut at the image border."""
    w, h = pair.size
    lines = []
    for name, x0, y0, x1, y1 in pair.boxes:
        if name not in index:
            summary.other_classes[name] += 1
            continue
        cut = min(max(x0, 0), w), min(max(y0, 0), h), min(max(x1, 0), w), min(max(y1, 0), h)
        summary.clipped += cut != (x0, y0, x1, y1)
        x0, y0, x1, y1 = cut
        if x1 - x0 < 1 or y1 - y0 < 1:
            summary.dropped["under 1 pixel wide or high inside the image"] += 1
            continue
        summary.boxes[pair.frame.split, name] += 1
        lines.append(
            f"{index[name]} {(x0 + x1) / 2 / w:.6f} {(y0 + y1) / 2 / h:.6f} {(x1 - x0) / w:.6f} {(y1 - y0) / h:.6f}"
        )
    return "".join(f"{line}\n" for line in lines)


class Placer:
    """Puts an image into DST: a hard link when SRC and DST share a filesystem that has them, else a copy."""

    def __init__(self, copy: bool):
        self.copy = copy

    def __call__(self, src: Path, dst: Path) -> None:
        if not self.copy:
            try:
                os.link(src, dst)
                return
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                self.copy = True  # another filesystem, or one without hard links: copy this and the rest
        shutil.copyfile(src, dst)


def write_tree(pairs: list[Pair], names: list[str], root: Path, previous: Path, summary: Summary, opts) -> None:
    """The new tree in `root`. A label file equal to the one in the `previous` tree is a hard link to it, so that
    deleting the previous tree frees no blocks: on some disks that costs milliseconds per file."""
    for split in sorted({p.frame.split for p in pairs}):
        for folder in OUTPUTS:
            (root / folder / split).mkdir(parents=True)
    place, index = Placer(opts.copy), {name: i for i, name in enumerate(names)}
    for pair in TQDM(pairs, desc="Writing", file=sys.stderr, disable=not opts.progress):
        f, label = pair.frame, Path(LABEL_DIR, pair.frame.split, f"{pair.frame.name}.txt")
        place(f.rgb, root / RGB_DIR / f.split / f"{f.name}{f.rgb.suffix}")
        place(f.ir, root / IR_DIR / f.split / f"{f.name}{f.ir.suffix}")
        text = yolo_lines(pair, index, summary)
        if (previous / label).is_file() and (previous / label).read_text() == text:
            os.link(previous / label, root / label)
        else:
            (root / label).write_text(text)
        summary.pairs[f.split] += 1
    summary.placed = "copies" if place.copy else "hard links"


def check_places(src: Path, dst: Path, inputs: list[Path]) -> None:
    """DST must not overlap SRC, and what prepare would replace in DST must have been written by prepare."""
    for path in {src, *inputs}:
        if dst == path or dst.is_relative_to(path) or path.is_relative_to(dst):
            raise PrepareError(f"{dst}: DST overlaps the input {path}; choose a DST outside SRC")
    if dst.exists() and not dst.is_dir():
        raise PrepareError(f"{dst}: DST is a file; choose a folder")
    ours = (dst / MARKER).is_file()
    for name in (*OUTPUTS, "data.yaml"):
        if (dst / name).exists() and not ours:
            raise PrepareError(
                f"{dst / name}: DST already holds a dataset that prepare did not write; choose a new or empty DST"
            )


def install(staging: Path, dst: Path, data_yaml: str) -> None:
    """Swap the staged folders into DST, then put data.yaml there last: until then DST does not look finished."""
    (dst / "data.yaml").unlink(missing_ok=True)
    old = staging / "old"
    old.mkdir()
    for folder in OUTPUTS:
        if (dst / folder).exists():
            os.replace(dst / folder, old / folder)
        os.replace(staging / folder, dst / folder)
    (staging / "data.yaml").write_text(data_yaml)
    commit(staging / "data.yaml", dst / "data.yaml")  # fsynced, renamed into DST, DST fsynced


def data_yaml(dst: Path, names: list[str], channels: int, command: str) -> str:
    data = {"path": str(dst), "train": f"{RGB_DIR}/train", "val": f"{RGB_DIR}/val", "channels": channels}
    data["names"] = dict(enumerate(names))
    return f"# Written by: {command}\n# Re-run that command to rebuild this folder from its source.\n" + yaml.safe_dump(
        data, sort_keys=False, allow_unicode=True
    )


def prepare(opts) -> Summary:
    """Convert opts.src into opts.dst (see `parse_args` for the options); raises PrepareError on bad input."""
    src, dst = Path(opts.src).expanduser().resolve(), Path(opts.dst).expanduser().resolve()
    if not src.is_dir():
        raise PrepareError(f"{src}: SRC folder not found; give the unpacked {TITLES[opts.format]} folder")
    inputs = [src / p for p in (opts.rgb, opts.ir, opts.ann, opts.labels) if p]
    inputs += [(src / opts.json).parent] if opts.json else []
    check_places(src, dst, [p.resolve() for p in inputs])
    source = SCANNERS[opts.format](src, opts)
    summary = Summary(skipped=list(source.skipped), dropped=source.dropped)
    pairs = read_pairs(source, summary, opts.skip_broken, opts.progress)
    summary.names = names = choose_names(pairs, source, split_list(opts.classes) if opts.classes else None, src)
    assign_splits(pairs, opts.val_fraction)
    check_names(pairs)
    for split in ("train", "val"):
        if not any(p.frame.split == split for p in pairs):
            raise PrepareError(
                f"{src}: no usable {split} pairs ({reasons(summary)}); SRC needs pairs for train and val"
            )

    dst.mkdir(parents=True, exist_ok=True)
    (dst / MARKER).write_text("images/, imagesIR/, labels/ and data.yaml here are rebuilt by yolofuse.prepare\n")
    staging = dst / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    try:
        write_tree(pairs, names, staging, dst, summary, opts)
        install(staging, dst, data_yaml(dst, names, opts.channels, opts.command))
    except OSError as e:
        raise PrepareError(
            f"{e.filename or dst}: {e.strerror or e}; fix that (disk space, permissions) and re-run"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def split_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def reasons(summary: Summary) -> str:
    counts = Counter(reason for reason, _ in summary.skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.items()) or "nothing was skipped"


def report(summary: Summary, title: str, src: Path, dst: Path) -> str:
    """The summary table: pairs and boxes per split, skipped pairs with reasons, boxes left out."""
    names = summary.names
    width = max(7, *(len(n) + 2 for n in names))
    lines = [f"{title}: {src} -> {dst} ({summary.placed})"]
    lines.append(f"{'split':<8}{'pairs':>8}" + "".join(f"{n:>{width}}" for n in names))
    for split in ("train", "val"):
        counts = "".join(f"{summary.boxes[split, n]:>{width}}" for n in names)
        lines.append(f"{split:<8}{summary.pairs[split]:>8}{counts}")
    skipped = len(summary.skipped)
    lines.append(f"skipped {skipped} pair{'s' * (skipped != 1)}" + (f": {reasons(summary)}" if skipped else ""))
    by_reason = defaultdict(list)
    for reason, path in summary.skipped:
        by_reason[reason].append(path)
    for reason, paths in by_reason.items():
        more = f" and {len(paths) - NAMED_SKIPS} more" if len(paths) > NAMED_SKIPS else ""
        lines.append(f"  {reason}: {', '.join(map(str, paths[:NAMED_SKIPS]))}{more}")
    left_out = [f"{n} {why}" for why, n in summary.dropped.items()]
    if summary.other_classes:
        other = ", ".join(f"{name} {n}" for name, n in summary.other_classes.most_common())
        left_out.append(f"{summary.other_classes.total()} of other classes ({other})")
    lines.append(f"boxes: {summary.clipped} cut at the image border" + "".join(f"; left out: {x}" for x in left_out))
    lines.append(f"Wrote {dst / 'data.yaml'}. Train with: python train_dual.py DATA={dst / 'data.yaml'}")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # stock prints the whole usage first; one line naming the fix is enough
        self.exit(2, f"error: {message}; see python -m yolofuse.prepare --help\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = OneLineParser(prog="python -m yolofuse.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("format", metavar="FORMAT", help=f"one of {', '.join(SCANNERS)}")
    p.add_argument("src", metavar="SRC", help="the dataset as published (or your export); never modified")
    p.add_argument("dst", metavar="DST", help="output folder; gets images/, imagesIR/, labels/ and data.yaml")
    p.add_argument("--rgb", help="voc/coco/yolo: folder of RGB images, inside SRC")
    p.add_argument("--ir", help="voc/coco/yolo: folder of IR images (same relative paths and stems), inside SRC")
    p.add_argument("--ann", help="voc: folder of Pascal VOC .xml files, inside SRC")
    p.add_argument("--json", help="coco: the COCO detection .json file, inside SRC")
    p.add_argument("--labels", help="yolo: folder of YOLO .txt labels, inside SRC")
    p.add_argument("--names", help="yolo: class names for ids 0, 1, ... (default: classes.txt or obj.names)")
    p.add_argument("--classes", help="keep only these classes, in this order (comma-separated)")
    p.add_argument("--val-fraction", type=float, help="m3fd/voc/coco/yolo: share of pairs for val (default 0.2)")
    p.add_argument("--channels", type=int, default=4, help="data.yaml channels: 4 reads IR as gray (default), 6 as 3")
    p.add_argument("--copy", action="store_true", help="copy images even where hard links would work")
    p.add_argument("--skip-broken", action="store_true", help="leave out pairs whose annotation cannot be read")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    opts = p.parse_args(argv)
    if opts.format not in SCANNERS:
        p.error(f"unknown format '{opts.format}'; use one of {', '.join(SCANNERS)}")
    for option in ("rgb", "ir", "ann", "json", "labels", "names", "val_fraction"):
        if getattr(opts, option) is not None and option not in OPTIONS[opts.format]:
            p.error(f"--{option.replace('_', '-')} does not apply to {opts.format}")
    opts.val_fraction = 0.2 if opts.val_fraction is None else opts.val_fraction
    if not 0 < opts.val_fraction < 1:
        p.error(f"--val-fraction {opts.val_fraction} must be between 0 and 1")
    if opts.channels not in SUPPORTED_CHANNELS:
        p.error(f"--channels {opts.channels}: use 4 (IR read as gray) or 6 (IR read as 3 channels)")
    # For data.yaml's header: the same command with SRC and DST absolute, so it can be re-run from anywhere.
    where = {opts.src: str(Path(opts.src).expanduser().resolve()), opts.dst: str(Path(opts.dst).expanduser().resolve())}
    opts.command = shlex.join(["python", "-m", "yolofuse.prepare", *(where.get(a, a) for a in argv)])
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    try:
        summary = prepare(opts)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    src, dst = (Path(p).expanduser().resolve() for p in (opts.src, opts.dst))
    print(report(summary, TITLES[opts.format], src, dst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
