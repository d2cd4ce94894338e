"""Paired RGB+IR data: the pairing rule, the stacked image, the dataset, and the checks run before training.

Layout (YOLOFuse / LLVIP): images/<split>/x.jpg (RGB), imagesIR/<split>/x.<any ext> (IR, same stem),
labels/<split>/x.txt (one label file for both). The stacked array is H x W x C, channels R, G, B, then IR.
"""

import math
import os
import stat
from contextlib import contextmanager
from functools import cached_property, partial
from pathlib import Path

import cv2
import numpy as np
import yaml
from PIL import Image
from ultralytics.data import build
from ultralytics.data.augment import RandomHSV
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import IMG_FORMATS, get_hash, img2label_paths
from ultralytics.utils import LOGGER

from yolofuse import replay, sensors

RGB_DIR, IR_DIR = "images", "imagesIR"
SUPPORTED_CHANNELS = {4: "RGB + 1-channel IR", 6: "RGB + 3-channel IR"}
IR_READ = {4: cv2.IMREAD_GRAYSCALE, 6: cv2.IMREAD_COLOR}  # how IR is decoded for each `channels:` value
# A JPEG can be scaled by 1/2, 1/4 or 1/8 while it is decoded (in the DCT domain), at a fraction of the full cost.
JPEG_FRAME_MARKERS = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # SOFn: the size
JPEG_REDUCED = {
    cv2.IMREAD_COLOR: {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8},
    cv2.IMREAD_GRAYSCALE: {
        2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
        4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
        8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
    },
}
RGB_BGR = [0, 2, 1, 1, 2, 0]  # cv2.mixChannels pairs: channels 0-2 reversed (the stack is RGB, stock HSV wants BGR)
IMAGE_SUFFIXES = (*(f".{s}" for s in sorted(IMG_FORMATS)), *(f".{s.upper()}" for s in sorted(IMG_FORMATS)))
COLOUR_SPREAD = 4  # mean max-min over an IR frame's 3 channels above this: colour-mapped (JPEG noise is ~1)
_warned = set()  # kinds of warning already given: each is given once per process, not once per frame


class DatasetError(ValueError):
    """Bad input found before training: the message is one line naming the file and the fix."""


def _warn_once(kind: str, message: str) -> None:
    if kind not in _warned:
        _warned.add(kind)
        LOGGER.warning(message)


def _ir_dir(rgb_path: Path) -> Path:
    """The last `images` folder of the RGB image's path becomes `imagesIR`; never a parent that says "images"."""
    parts = rgb_path.parts
    if RGB_DIR not in parts:
        raise DatasetError(f"{rgb_path}: not inside an '{RGB_DIR}/' folder, so its IR partner cannot be found")
    i = len(parts) - 1 - parts[::-1].index(RGB_DIR)
    return Path(*parts[:i], IR_DIR, *parts[i + 1 : -1])


def _ir_names(rgb_name: str) -> list[str]:
    """The names an IR partner may have: the RGB image's stem with its own suffix or any image suffix (either case)."""
    stem, own = os.path.splitext(rgb_name)
    return [stem + own, *(stem + s for s in IMAGE_SUFFIXES if s != own)]


def _partner(rgb_name: str, ir_dir: Path, found: list[str]) -> Path:
    if len(found) > 1:  # one of them would be paired without a word, maybe another frame's under this frame's labels
        raise DatasetError(
            f"{ir_dir / found[0]} and {ir_dir / found[1]}: two IR images for {rgb_name}; "
            "keep the one taken with it and remove the other"
        )
    return ir_dir / (found[0] if found else rgb_name)  # missing: callers report it as `<stem>.*`


def ir_path(rgb_path) -> Path:
    """The IR partner of an RGB image: the last `images` folder becomes `imagesIR`; same stem, any image suffix.
    Two IR files with that stem are refused (DatasetError naming both)."""
    rgb_path = Path(rgb_path)
    return partner_in(_ir_dir(rgb_path), rgb_path)


def partner_in(folder: Path, rgb_path) -> Path:
    """The file in `folder` with the RGB file's stem and its own suffix or any image suffix; two such files are
    refused (DatasetError naming both)."""
    rgb_path = Path(rgb_path)
    found, seen = [], set()
    for name in _ir_names(rgb_path.name):
        try:
            st = os.stat(os.path.join(folder, name))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:  # a case-blind disk finds x.jpg as x.JPG
            seen.add((st.st_dev, st.st_ino))
            found.append(name)
    return _partner(rgb_path.name, Path(folder), found)


def ir_paths(rgb_files) -> list[Path]:
    """`ir_path` of each RGB image by the same rule, reading each IR folder once instead of trying every suffix of
    every image (a whole dataset's partners: 12,000 in ~0.1 s instead of ~1 s)."""
    folders, partners = {}, []  # RGB folder -> (its IR folder, the files there)
    for rgb in map(str, rgb_files):
        folder, name = os.path.split(rgb)
        if folder not in folders:
            ir_dir = _ir_dir(Path(rgb))
            try:
                with os.scandir(ir_dir) as entries:
                    folders[folder] = ir_dir, {e.name for e in entries if e.is_file()}
            except OSError:  # no IR folder: every partner is missing
                folders[folder] = ir_dir, set()
        ir_dir, names = folders[folder]
        partners.append(_partner(name, ir_dir, [n for n in _ir_names(name) if n in names]))
    return partners


def _ir_error(ir_file: Path, problem: str, rgb_name: str = "") -> DatasetError:
    """One line naming the IR file and the fix, the same whether the pre-training check or the loader finds it."""
    if problem == "missing":
        return DatasetError(f"{ir_file.with_suffix('.*')}: IR image for {rgb_name} is missing; add it")
    if problem == "unreadable":
        return DatasetError(f"{ir_file}: IR image is unreadable; replace it")
    return DatasetError(f"{ir_file}: IR image has more than 8 bits per channel; convert it to 8-bit")


def check_ir_header(rgb_file, ir_file: Path | None = None) -> None:
    """The cheap check of one pair before training: its IR partner exists, and its header is readable and 8-bit.
    `ir_file` is the partner when the caller has already found it."""
    ir_file = ir_file or ir_path(rgb_file)
    if not ir_file.is_file():
        raise _ir_error(ir_file, "missing", Path(rgb_file).name)
    try:
        with Image.open(ir_file) as im:  # reads the header only
            deep = im.mode in ("I", "F") or ";16" in str(im.tile[:1])  # 16/32-bit gray, or 16-bit colour
    except Exception:
        raise _ir_error(ir_file, "unreadable") from None
    if deep:
        raise _ir_error(ir_file, "deep")


def _verify_pair(verify, ir_and_args):
    """Stock's label-cache check of one RGB image and its labels, after its IR partner's header check.

    Stock drops an empty RGB file as corrupt with the reason of its last try, a HEIF plugin ("No module named
    'pi_heif'"); the reason given here is that the file is empty."""
    ir_file, args = ir_and_args
    check_ir_header(args[0], ir_file)
    result = verify(args)
    rgb, prefix = args[0], args[2]
    if result[0] is None and os.path.isfile(rgb) and os.path.getsize(rgb) == 0:
        result[-1] = f"{prefix}{rgb}: ignoring corrupt image/label: the file is empty (0 bytes)"
    return result


def _fit_size(hw: tuple[int, int], imgsz: int | None) -> tuple[int, int]:
    """Stock `load_image`'s training size (w, h) for a frame of size `hw`: long side to imgsz, aspect kept."""
    h0, w0 = hw
    r = imgsz / max(h0, w0) if imgsz else 1
    return (min(math.ceil(w0 * r), imgsz), min(math.ceil(h0 * r), imgsz)) if r != 1 else (w0, h0)


def _jpeg_size(data: np.ndarray) -> tuple[int, int] | None:
    """(h, w) from a JPEG's frame header (before any EXIF turn); None for other files. Reads only the markers."""
    b = data.data  # a memoryview: indexing it gives plain ints, far cheaper than NumPy scalars
    if b[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 <= len(b) and b[i] == 0xFF:
        if b[i + 1] == 0xFF:  # a fill byte before a marker
            i += 1
            continue
        if b[i + 1] in JPEG_FRAME_MARKERS:
            return b[i + 5] << 8 | b[i + 6], b[i + 7] << 8 | b[i + 8]
        i += 2 + (b[i + 2] << 8 | b[i + 3])  # skip the segment
    return None


def _reduction(hw: tuple[int, int], size: tuple[int, int]) -> int:
    """The largest JPEG scale-down (8, 4, 2, else 1) whose output still covers `size`, either way round (EXIF)."""
    short, long = sorted(hw)
    need_short, need_long = sorted(size)
    return next((f for f in (8, 4, 2) if math.ceil(short / f) >= need_short and math.ceil(long / f) >= need_long), 1)


def _read(path, flags: int, size_for) -> tuple[np.ndarray | None, tuple[int, int] | None]:
    """Decode one file with cv2 `flags` at the size (w, h) that `size_for(original hw)` gives; (image, original hw).

    A JPEG is decoded at the smallest DCT reduction that still covers that size, then resized the rest of the way;
    other formats (PNG, TIFF, ...) are decoded in full and resized. The image is None when unreadable.
    """
    try:
        data = np.fromfile(path, np.uint8)  # one read; cv2 decodes from memory
    except OSError:
        return None, None
    hw0 = _jpeg_size(data)
    if hw0:
        factor = _reduction(hw0, size_for(hw0))
        im = cv2.imdecode(data, JPEG_REDUCED[flags & cv2.IMREAD_COLOR][factor] if factor > 1 else flags)
        if im is not None and im.shape[:2] != tuple(math.ceil(n / factor) for n in hw0):
            hw0 = hw0[::-1]  # cv2 turned it as its EXIF orientation says
    else:
        im = cv2.imdecode(data, flags) if data.size else None
        hw0 = im.shape[:2] if im is not None else None
    if im is None:
        return None, None
    w, h = size_for(hw0)
    if im.shape[:2] != (h, w):
        im = cv2.resize(im, (w, h), interpolation=cv2.INTER_LINEAR)
    return im, hw0


def load_pair(
    rgb_path, channels: int, imgsz: int | None = None, ir_file: Path | None = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Read one pair the way training, validation and prediction do; returns (stack, the RGB frame's original hw).

    The stack is H x W x `channels` uint8, R, G, B, then IR, with its long side resized to `imgsz` (None: the RGB
    frame's own size) and the IR frame resized to the RGB frame. `channels` decides how IR is read, whatever the
    file holds: 4 decodes it as one gray channel (a 3-channel file is converted to gray), 6 as three channels (a
    1-channel file is replicated). `ir_file` is the IR partner when the caller has already looked it up.
    """
    ir_file = ir_file or ir_path(rgb_path)
    rgb, hw0 = _read(rgb_path, cv2.IMREAD_COLOR, lambda hw: _fit_size(hw, imgsz))
    if rgb is None:
        raise DatasetError(f"{rgb_path}: RGB image is missing or unreadable; replace it or remove it with its label")
    size = rgb.shape[1::-1]
    ir, ir_hw0 = _read(ir_file, IR_READ[channels] | cv2.IMREAD_ANYDEPTH, lambda hw: size)  # 16-bit reported, not cut
    if ir is None:
        raise _ir_error(ir_file, "unreadable" if ir_file.is_file() else "missing", Path(rgb_path).name)
    if ir.dtype != np.uint8:
        raise _ir_error(ir_file, "deep")
    if ir_hw0 != hw0:
        _warn_once("size", f"{ir_file}: IR size {ir_hw0[1]}x{ir_hw0[0]} differs from RGB; resizing IR frames")
    return stack_pair(rgb, ir_layers(ir, channels)), hw0


def ir_layers(ir: np.ndarray, channels: int) -> np.ndarray:
    """A decoded IR frame (gray, or BGR as cv2 decodes colour) as the stack takes it for `channels`: one gray layer
    for 4, three for 6. Images are decoded straight to that (IR_READ, faster), video frames converted here; for gray
    and equal-channel frames (LLVIP's) both give the same values, for colour-mapped ones up to 3 levels apart."""
    if channels == 4 and ir.ndim == 3:
        return cv2.cvtColor(ir, cv2.COLOR_BGR2GRAY)
    if channels == 6 and ir.ndim == 2:
        return cv2.cvtColor(ir, cv2.COLOR_GRAY2BGR)
    return ir


def stack_pair(rgb: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """Decoded frames as one stack, R, G, B, then IR: `rgb` BGR as cv2 decodes it, `ir` gray or BGR, same size.

    The model gets RGB order, for a 3-channel IR too. Each channel is copied once, straight to its place: converting
    each frame and then `cv2.merge` cost 2.7x as much for 4 channels, 4.6x for 6, on a 640x512 pair.
    """
    if ir.ndim == 2:
        stack = cv2.cvtColor(rgb, cv2.COLOR_BGR2RGBA)  # 4-channel conversions are SIMD; the A plane becomes IR
        cv2.insertChannel(ir, stack, 3)
        return stack
    stack = np.empty((*rgb.shape[:2], 6), np.uint8)
    cv2.mixChannels([rgb, ir], [stack], RGB_BGR + [3, 5, 4, 4, 5, 3])  # IR's channels 3-5 reversed too
    return stack


def _warn_if_colour_mapped(ir_file: Path, channels: int) -> None:
    """With `channels: 4`, a colour-mapped IR file (a false-colour palette, not 3 equal channels) is read as gray."""
    if channels != 4:
        return
    ir = cv2.imread(str(ir_file), cv2.IMREAD_COLOR)
    if ir is not None and (ir.max(2) - ir.min(2)).mean() > COLOUR_SPREAD:
        _warn_once(
            "colour",
            f"{ir_file}: IR images are colour-mapped; channels: 4 reads them as gray (luma). "
            f"Use channels: 6 to keep the colours, or store the raw gray frames",
        )


class RGBOnlyHSV(RandomHSV):
    """Stock HSV jitter on the RGB channels only: thermal intensities are temperatures, not colours."""

    def apply_image(self, labels, params=None):
        if not (self.hgain or self.sgain or self.vgain):
            return labels
        img = labels["img"]
        if not img.flags.c_contiguous:  # cv2 writes the result back into it
            img = labels["img"] = np.ascontiguousarray(img)
        if img.shape[2] == 4:  # cv2's 4-channel colour conversions are SIMD; the IR plane is set aside meanwhile
            ir = cv2.extractChannel(img, 3)
            bgr = cv2.cvtColor(img, cv2.COLOR_RGBA2BGR)
            super().apply_image({"img": bgr})  # stock jitters a BGR frame
            cv2.cvtColor(bgr, cv2.COLOR_BGR2RGBA, dst=img)
            cv2.insertChannel(ir, img, 3)
        else:
            bgr = np.empty((*img.shape[:2], 3), np.uint8)
            cv2.mixChannels([img], [bgr], RGB_BGR)  # copies the RGB part only
            super().apply_image({"img": bgr})
            cv2.mixChannels([bgr], [img], RGB_BGR)
        return labels


class PairedDataset(YOLODataset):
    """YOLODataset whose images are stacked RGB+IR pairs; every stock geometric augmentation moves both at once."""

    modality_dropout = 0.0  # the fraction of samples with one sensor blanked; the trainer sets it on its train set

    def get_cache_hash(self) -> str:
        # The stock hash covers RGB images and labels; adding, removing or replacing IR files must also invalidate it.
        return get_hash([super().get_cache_hash(), *map(str, ir_paths(self.im_files))])

    def verify_args(self):
        """Stock checks every image and label file when it builds the label cache; each IR header is checked there too.

        So a bad pair anywhere in the set stops the run before epoch 1, and the check costs nothing again until a
        file changes (the cache hash covers the IR files).
        """
        verify, args = super().verify_args()
        return partial(_verify_pair, verify), zip(ir_paths(self.im_files), args)

    def build_transforms(self, hyp=None):
        transforms = super().build_transforms(hyp)
        for k, t in enumerate(transforms.transforms):
            if type(t) is RandomHSV:  # stock skips anything but 3 channels; jitter the RGB part instead
                transforms.transforms[k] = RGBOnlyHSV(hgain=t.hgain, sgain=t.sgain, vgain=t.vgain)
        return transforms

    @cached_property
    def ir_files(self) -> list[Path]:
        """Each image's IR partner, looked up once (pathlib work per sample costs about 3% of a sample).

        First used when images are cached or loaded, after Ultralytics has settled the order of `im_files`.
        """
        return ir_paths(self.im_files)

    def __getitem__(self, key):
        # The train loader passes replay.SampleKey: seeded augmentation, mosaic partners from the sample's own batch.
        # Modality dropout comes after the augmentations, under the same seed.
        with replay.sample(self, key) as index:
            sample = super().__getitem__(index)
            sensors.drop_modality(sample["img"], self.modality_dropout)
            return sample

    def pair_cache_file(self, i: int) -> Path:
        # Own suffix per channel count: never read or overwritten by a stock RGB cache (x.npy).
        return Path(self.im_files[i]).with_suffix(f".pair{self.channels}.npy")

    @property
    def long_side(self) -> int:
        """The training size: `imgsz`, or the larger side of an export's fixed (h, w) input, as stock resizes to."""
        return max(self.imgsz) if isinstance(self.imgsz, (list, tuple)) else self.imgsz

    def cache_key(self, i: int) -> list[int]:
        """What a cached pair depends on: the training size, and the size and mtime_ns of both image files.

        (Sizes too: a file copied over another with `cp -p` or `rsync -a` may keep an older mtime.)
        """
        rgb, ir = os.stat(self.im_files[i]), os.stat(self.ir_files[i])
        return [self.long_side, rgb.st_size, rgb.st_mtime_ns, ir.st_size, ir.st_mtime_ns]

    def cached_pair(self, i: int, header_only: bool = False):
        """(stack, original hw) from the disk cache, or None when there is none or it is stale.

        A cache file holds two arrays: the header [h0, w0, *cache_key], then the stack. A corrupt file is reported,
        deleted, and treated as missing. With `header_only`, the stack is not read (it is None).
        """
        f = self.pair_cache_file(i)
        if not f.exists():
            return None
        try:
            key = self.cache_key(i)
        except FileNotFoundError:
            return None  # an image is gone: load_pair names it
        try:
            with open(f, "rb") as fh:
                header = np.load(fh)
                if header[2:].tolist() != key:
                    return None
                return (None if header_only else np.load(fh)), (int(header[0]), int(header[1]))
        except FileNotFoundError:
            return None  # deleted meanwhile by another worker that found it corrupt
        except Exception as e:
            LOGGER.warning(f"{self.prefix}{f}: corrupt pair cache ({e}); deleting it and reading the images")
            f.unlink(missing_ok=True)
            return None

    def read_pair(self, i: int) -> tuple[np.ndarray, tuple[int, int]]:
        """`load_pair` at training size; with CACHE="disk", from the pair's cache file when that holds this key."""
        cached = self.cache == "disk" and self.cached_pair(i)
        return cached or load_pair(self.im_files[i], self.channels, self.long_side, self.ir_files[i])

    def cache_images_to_disk(self, i: int) -> None:
        """Write the pair's cache file when it is missing or stale, atomically: a kill never leaves half a file."""
        if self.cached_pair(i, header_only=True):
            return
        key = self.cache_key(i)  # before reading: a file changed meanwhile makes this cache stale, not wrong
        im, (h0, w0) = load_pair(self.im_files[i], self.channels, self.long_side, self.ir_files[i])
        f = self.pair_cache_file(i)
        tmp = f.with_name(f"{f.name}.{os.getpid()}.tmp")  # one per process: DDP ranks may cache the same file
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, np.array([h0, w0, *key], np.int64))
                np.save(fh, im)
            os.replace(tmp, f)
        except OSError as e:  # e.g. a full disk: train from the images, as stock does
            _warn_once("cache write", f"{self.prefix}{f}: pair cache not written ({e}); reading the images instead")
        finally:
            tmp.unlink(missing_ok=True)

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """Stock `load_image` reads one file, then resizes it; this reads the pair already at training size.

        The long side is `imgsz`, as stock's default. (`rect_mode` and `resize_short` are stock options for other
        tasks; detection never changes them.) Recent images are kept for mosaic exactly as stock does.
        """
        if self.ims[i] is not None:  # RAM cache or mosaic buffer
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im, (h0, w0) = self.read_pair(i)
        if self.augment and self.cache != "ram":  # keep recent images for mosaic, as stock does
            self.ims[i], self.im_hw0[i], self.im_hw[i] = im, (h0, w0), im.shape[:2]
            self.buffer.append(i)
            if 1 < len(self.buffer) >= self.max_buffer_length:
                j = self.buffer.pop(0)
                self.ims[j], self.im_hw0[j], self.im_hw[j] = None, None, None
        return im, (h0, w0), im.shape[:2]


@contextmanager
def paired_datasets():
    """While this holds, stock `build_yolo_dataset` builds a `PairedDataset`, with every argument as stock sets it.

    Stock picks the class by a name it hard-codes (`YOLODataset` in ultralytics.data.build) and has no hook for it;
    this is the one place that name is switched, for the length of one build.
    """
    build.YOLODataset = PairedDataset
    try:
        yield
    finally:
        build.YOLODataset = YOLODataset


def image_files(folder: Path) -> list[Path]:
    """The image files anywhere under `folder`, sorted, as Ultralytics finds a folder's images."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix[1:].lower() in IMG_FORMATS and p.is_file())


def listed_images(image_list: Path) -> list[Path]:
    """The images an Ultralytics image list (.txt, one path a line) names: `./x` is taken from the list's folder,
    other relative paths from the working directory, as Ultralytics takes them. A listed file that is missing is an
    error naming the line."""
    images = []
    for n, line in enumerate(image_list.read_text(encoding="utf-8-sig").strip().splitlines(), 1):
        entry = line.strip()
        path = image_list.parent / entry[2:] if entry.startswith("./") else Path(entry)
        if entry and path.suffix[1:].lower() in IMG_FORMATS:
            if not path.is_file():
                raise DatasetError(f"{image_list}:{n}: {path} does not exist; fix that line or remove it")
            images.append(path)
    return sorted(images)


def read_config(data_file: Path) -> dict:
    """The data config's keys; a file that isn't there, isn't YAML, or isn't keys at its top is one line."""
    if not data_file.is_file():
        raise DatasetError(f"{data_file}: data config not found; set DATA to your dataset yaml")
    try:
        config = yaml.safe_load(data_file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        why = getattr(e, "problem", None) or type(e).__name__
        raise DatasetError(f"{data_file}{where}: not valid YAML ({why}); fix it, as in data_config.yaml") from None
    if not isinstance(config, dict | None):
        raise DatasetError(
            f"{data_file}: its top level is a {type(config).__name__}, not keys (path:, train:, val:, channels:, "
            "names:); write it as data_config.yaml does"
        )
    return config or {}


def _check_label_file(label_file: Path, nc: int) -> None:
    for n, line in enumerate(label_file.read_text(errors="replace").splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            cls, *box = (float(x) for x in fields)
        except ValueError:
            raise DatasetError(
                f"{label_file}:{n}: '{line.strip()[:40]}' is not numbers; each line must be 'class x y w h'"
            ) from None
        in_range = math.isfinite(cls) and cls == int(cls) and 0 <= cls < nc and all(0 <= v <= 1 for v in box)
        if len(box) != 4 or not in_range:  # (nan and inf are outside every range)
            raise DatasetError(
                f"{label_file}:{n}: '{line.strip()[:40]}' is not 'class x y w h' with class 0..{nc - 1} "
                f"and x y w h normalized to 0..1; fix that line"
            )


def _split_images(data_file: Path, split: str, root: Path, entry) -> list[Path]:
    """The images of one entry of a split (`train:` may be a folder, an image list .txt, or a list of these)."""
    if not isinstance(entry, str):
        raise DatasetError(f"{data_file}: '{split}: {entry!r}' is not a folder or an image list (.txt); fix '{split}:'")
    source = root / entry
    if source.is_dir():
        images = image_files(source)
    elif source.is_file():
        images = listed_images(source)
    else:
        what = "image list" if source.suffix == ".txt" else "folder"
        raise DatasetError(f"{data_file}: {split} {what} {source} does not exist; fix 'path:' or '{split}:'")
    if not images:
        raise DatasetError(f"{source}: no images found; fix '{split}:' in {data_file}")
    return images


def check_dataset(data_file) -> None:
    """Fail fast, in one line naming the file and the fix, on mistakes that would otherwise surface deep in torch."""
    data_file = Path(data_file)
    data = read_config(data_file)
    channels = data.get("channels")
    if type(channels) is not int or channels not in SUPPORTED_CHANNELS:
        choices = " or ".join(f"{c} ({what})" for c, what in SUPPORTED_CHANNELS.items())
        if isinstance(channels, str) and channels.strip().isdigit():
            raise DatasetError(
                f"{data_file}: channels: {channels!r} is text; write the number without quotes: {choices}"
            )
        raise DatasetError(f"{data_file}: channels: {channels!r} is not supported; use {choices}")
    nc = len(data["names"]) if data.get("names") else data.get("nc")
    if not isinstance(nc, int) or nc < 1:
        raise DatasetError(f"{data_file}: give the class names under 'names:'")
    root = Path(data.get("path") or data_file.parent)  # relative roots are taken from the working directory
    for split in ("train", "val"):
        entries = data.get(split)
        if not entries:
            raise DatasetError(f"{data_file}: '{split}:' is missing; point it at the {RGB_DIR}/{split} folder")
        images = []
        for entry in entries if isinstance(entries, list) else [entries]:
            images += _split_images(data_file, split, root, entry)
        partners = ir_paths(images)  # refuses two IR files with one stem
        missing = [ir for ir in partners if not ir.is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0].with_suffix('.*')}: IR image missing ({len(missing)} of {len(images)} in {split}); "
                f"add them under {IR_DIR}/ with the same names as the RGB images"
            )
        for label_file in map(Path, img2label_paths(map(str, images))):
            if label_file.is_file():
                _check_label_file(label_file, nc)
        load_pair(images[0], channels, ir_file=partners[0])  # readability, on one pair
        _warn_if_colour_mapped(partners[0], channels)
