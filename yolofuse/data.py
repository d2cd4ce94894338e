"""Paired RGB+IR data: the pairing rule, the stacked image, the dataset, and the checks run before training.

Layout (YOLOFuse / LLVIP): images/<split>/x.jpg (RGB), imagesIR/<split>/x.<any ext> (IR, same stem),
labels/<split>/x.txt (one label file for both). The stacked array is H x W x C, channels R, G, B, then IR.
"""

from pathlib import Path

import cv2
import numpy as np
import yaml
from ultralytics.data.augment import RandomHSV
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import IMG_FORMATS, get_hash, img2label_paths
from ultralytics.utils import LOGGER

RGB_DIR, IR_DIR = "images", "imagesIR"
SUPPORTED_CHANNELS = {4: "RGB + 1-channel IR", 6: "RGB + 3-channel IR"}
_warned_resize = False  # IR frames of another size are resized with a single warning per process


class DatasetError(ValueError):
    """Bad input found before training: the message is one line naming the file and the fix."""


def ir_path(rgb_path) -> Path:
    """The IR partner of an RGB image: the last `images` folder becomes `imagesIR`; same stem, any image suffix."""
    rgb_path = Path(rgb_path)
    parts = rgb_path.parts
    if RGB_DIR not in parts:
        raise DatasetError(f"{rgb_path}: not inside an '{RGB_DIR}/' folder, so its IR partner cannot be found")
    i = len(parts) - 1 - parts[::-1].index(RGB_DIR)  # only the modality folder, never a parent that says "images"
    ir_dir = Path(*parts[:i], IR_DIR, *parts[i + 1 : -1])
    for suffix in (
        rgb_path.suffix,
        *(f".{s}" for s in sorted(IMG_FORMATS)),
        *(f".{s.upper()}" for s in sorted(IMG_FORMATS)),
    ):
        candidate = ir_dir / (rgb_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return ir_dir / rgb_path.name  # missing: callers report it as `<stem>.*`


def load_pair(rgb_path, channels: int) -> np.ndarray:
    """Read an RGB image and its IR partner as one H x W x `channels` uint8 array (RGB first, then IR)."""
    global _warned_resize
    rgb = cv2.imread(str(rgb_path), cv2.IMREAD_COLOR)
    if rgb is None:
        raise DatasetError(f"{rgb_path}: RGB image is missing or unreadable; replace it or remove it with its label")
    ir_file = ir_path(rgb_path)
    if not ir_file.is_file():
        raise DatasetError(f"{ir_file.with_suffix('.*')}: IR image for {Path(rgb_path).name} is missing; add it")
    ir = cv2.imread(str(ir_file), cv2.IMREAD_UNCHANGED)
    if ir is None:
        raise DatasetError(f"{ir_file}: IR image is unreadable; replace it")
    if ir.dtype != np.uint8:
        raise DatasetError(f"{ir_file}: IR image is {ir.dtype}; convert it to 8-bit")
    ir = ir[..., None] if ir.ndim == 2 else ir[..., 2::-1]  # 3-channel IR in RGB order too
    if ir.shape[2] not in (1, 3):
        raise DatasetError(
            f"{ir_file}: IR image has {ir.shape[2]} channels; save it as 1-channel grayscale or 3-channel"
        )
    if 3 + ir.shape[2] != channels:
        raise DatasetError(
            f"{ir_file}: IR image has {ir.shape[2]} channel(s) but the data config says channels: {channels}; "
            f"set channels: {3 + ir.shape[2]} in the data config"
        )
    if ir.shape[:2] != rgb.shape[:2]:
        if not _warned_resize:
            LOGGER.warning(f"{ir_file}: IR size {ir.shape[1]}x{ir.shape[0]} differs from RGB; resizing IR frames")
            _warned_resize = True
        ir = cv2.resize(ir, (rgb.shape[1], rgb.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(*rgb.shape[:2], -1)
    return np.concatenate([rgb[..., ::-1], ir], axis=2)  # cv2 reads BGR; the model gets RGB


class RGBOnlyHSV(RandomHSV):
    """Stock HSV jitter on the RGB channels only: thermal intensities are temperatures, not colours."""

    def apply_image(self, labels, params=None):
        img = labels["img"]
        bgr = np.ascontiguousarray(img[..., 2::-1])  # stock jitters a BGR frame
        super().apply_image({"img": bgr})
        img[..., :3] = bgr[..., ::-1]
        return labels


class PairedDataset(YOLODataset):
    """YOLODataset whose images are stacked RGB+IR pairs; every stock geometric augmentation moves both at once."""

    def get_cache_hash(self) -> str:
        # The stock hash covers RGB images and labels; adding, removing or replacing IR files must also invalidate it.
        return get_hash([super().get_cache_hash(), *map(str, map(ir_path, self.im_files))])

    def build_transforms(self, hyp=None):
        transforms = super().build_transforms(hyp)
        for k, t in enumerate(transforms.transforms):
            if type(t) is RandomHSV:  # stock skips anything but 3 channels; jitter the RGB part instead
                transforms.transforms[k] = RGBOnlyHSV(hgain=t.hgain, sgain=t.sgain, vgain=t.vgain)
        return transforms

    def pair_cache_file(self, i: int) -> Path:
        # Own suffix per channel count: never read or overwritten by a stock RGB cache (x.npy).
        return Path(self.im_files[i]).with_suffix(f".pair{self.channels}.npy")

    def read_pair(self, i: int) -> np.ndarray:
        """The stacked pair, from its disk cache when that is newer than both images."""
        f = self.pair_cache_file(i)
        if f.exists():
            newest = max(Path(self.im_files[i]).stat().st_mtime, ir_path(self.im_files[i]).stat().st_mtime)
            if f.stat().st_mtime >= newest:
                return np.load(f)
        return load_pair(self.im_files[i], self.channels)

    def cache_images_to_disk(self, i: int) -> None:
        np.save(self.pair_cache_file(i), self.read_pair(i), allow_pickle=False)

    def load_image(self, i: int, rect_mode: bool = True, resize_short: bool = False):
        """Stock `load_image` reads one file with cv2; this reads the pair, then resizes and buffers the same way."""
        if self.ims[i] is not None:  # RAM cache or mosaic buffer
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = self.read_pair(i)
        h0, w0 = im.shape[:2]
        # An exported model fixes its input as (h, w); as stock, the long side then goes to the larger of the two.
        imgsz = max(self.imgsz) if isinstance(self.imgsz, (list, tuple)) else self.imgsz
        if rect_mode:  # long side to imgsz, aspect kept
            r = imgsz / max(h0, w0)
            if r != 1:
                size = (min(round(w0 * r), imgsz), min(round(h0 * r), imgsz))
                im = cv2.resize(im, size, interpolation=cv2.INTER_LINEAR)
        elif (h0, w0) != (imgsz, imgsz):
            im = cv2.resize(im, (imgsz, imgsz), interpolation=cv2.INTER_LINEAR)
        im = im.reshape(*im.shape[:2], self.channels)  # cv2 drops a trailing single channel
        if self.augment and self.cache != "ram":  # keep recent images for mosaic, as stock does
            self.ims[i], self.im_hw0[i], self.im_hw[i] = im, (h0, w0), im.shape[:2]
            self.buffer.append(i)
            if 1 < len(self.buffer) >= self.max_buffer_length:
                j = self.buffer.pop(0)
                self.ims[j], self.im_hw0[j], self.im_hw[j] = None, None, None
        return im, (h0, w0), im.shape[:2]


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix[1:].lower() in IMG_FORMATS)


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
        if len(box) != 4 or cls != int(cls) or not 0 <= cls < nc or not all(0 <= v <= 1 for v in box):
            raise DatasetError(
                f"{label_file}:{n}: '{line.strip()[:40]}' is not 'class x y w h' with class 0..{nc - 1} "
                f"and x y w h normalized to 0..1; fix that line"
            )


def check_dataset(data_file) -> None:
    """Fail fast, in one line naming the file and the fix, on mistakes that would otherwise surface deep in torch."""
    data_file = Path(data_file)
    if not data_file.is_file():
        raise DatasetError(f"{data_file}: data config not found; set DATA to your dataset yaml")
    data = yaml.safe_load(data_file.read_text()) or {}
    channels = data.get("channels")
    if channels not in SUPPORTED_CHANNELS:
        choices = ", ".join(f"{c} ({what})" for c, what in SUPPORTED_CHANNELS.items())
        raise DatasetError(f"{data_file}: 'channels: {channels}' is not supported; use {choices}")
    nc = len(data["names"]) if data.get("names") else data.get("nc")
    if not isinstance(nc, int) or nc < 1:
        raise DatasetError(f"{data_file}: give the class names under 'names:'")
    root = Path(data.get("path") or data_file.parent)  # relative roots are taken from the working directory
    for split in ("train", "val"):
        if not data.get(split):
            raise DatasetError(f"{data_file}: '{split}:' is missing; point it at the {RGB_DIR}/{split} folder")
        folder = root / data[split]
        if not folder.is_dir():
            raise DatasetError(f"{data_file}: {split} folder {folder} does not exist; fix 'path:' or '{split}:'")
        images = _image_files(folder)
        if not images:
            raise DatasetError(f"{folder}: no images found; fix '{split}:' in {data_file}")
        missing = [ir for ir in map(ir_path, images) if not ir.is_file()]
        if missing:
            raise DatasetError(
                f"{missing[0].with_suffix('.*')}: IR image missing ({len(missing)} of {len(images)} in {split}); "
                f"add them under {IR_DIR}/ with the same names as the RGB images"
            )
        for label_file in map(Path, img2label_paths(map(str, images))):
            if label_file.is_file():
                _check_label_file(label_file, nc)
        load_pair(images[0], channels)  # channel count and readability, on one pair
