"""Paired RGB+IR data: the pairing rule, the stacked array, augmentations, caches and the pre-training checks.

Everything runs on tiny synthetic images written into tmp_path (or a few copied demo pairs), CPU only, offline.
"""

import os
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import folders_config, image_list_config, make_dataset
from PIL import Image
from ultralytics.cfg import get_cfg
from ultralytics.data.augment import RandomHSV
from ultralytics.data.build import build_dataloader
from ultralytics.data.utils import check_det_dataset

import yolofuse  # noqa: F401  (offline settings, before ultralytics is used)
from yolofuse import data as fdata
from yolofuse.data import DatasetError, PairedDataset, RGBOnlyHSV, check_dataset, ir_path, load_pair
from yolofuse.engine import build_paired_dataset

PAD = 114  # Ultralytics' letterbox / mosaic / perspective fill value


# ---------------------------------------------------------------------------------------------------------- helpers
def touch_image(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img), path
    return path


def cfg(**overrides):
    """Training args with every random augmentation off unless asked for; small images."""
    base = dict(
        imgsz=64,
        mosaic=0.0,
        mixup=0.0,
        cutmix=0.0,
        copy_paste=0.0,
        degrees=0.0,
        translate=0.0,
        scale=0.0,
        shear=0.0,
        perspective=0.0,
        fliplr=0.0,
        flipud=0.0,
        hsv_h=0.0,
        hsv_s=0.0,
        hsv_v=0.0,
        cache=False,
        close_mosaic=0,
    )
    return get_cfg(overrides={**base, **overrides})


def write_yaml(root: Path, channels: int, names=("thing",)) -> Path:
    lines = [f"path: {root}", "train: images/train", "val: images/val", f"channels: {channels}", "names:"]
    lines += [f"  {i}: {n}" for i, n in enumerate(names)]
    (root / "data.yaml").write_text("\n".join(lines) + "\n")
    return root / "data.yaml"


def marker_dataset(root: Path, n: int = 8, channels: int = 4, h: int = 96, w: int = 128) -> Path:
    """n pairs per split: black frames with one bright rectangle at the same place in RGB and IR (varies per pair)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for k in range(n):
            rgb = np.zeros((h, w, 3), np.uint8)
            ir = np.zeros((h, w) if channels == 4 else (h, w, 3), np.uint8)
            lines = []
            for _ in range(3):  # a few markers, so some are inside every mosaic crop
                bh, bw = int(rng.integers(16, 36)), int(rng.integers(16, 36))
                y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
                rgb[y0 : y0 + bh, x0 : x0 + bw] = 255
                ir[y0 : y0 + bh, x0 : x0 + bw] = 255
                lines.append(f"0 {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
            touch_image(root / "images" / split / f"{k:04d}.png", rgb)
            touch_image(root / "imagesIR" / split / f"{k:04d}.png", ir)
            label = root / "labels" / split / f"{k:04d}.txt"
            label.parent.mkdir(parents=True, exist_ok=True)
            label.write_text("".join(lines))
    return write_yaml(root, channels)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / max((a | b).sum(), 1)


def seed(s: int = 0) -> None:
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def assert_one_line_error(exc: pytest.ExceptionInfo, *must_contain: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    for part in must_contain:
        assert str(part) in msg, f"{part!r} not in error {msg!r}"
    return msg


# ------------------------------------------------------------------------------------------------------ pairing rule
@pytest.mark.parametrize(
    "rgb, expected",
    [
        ("data/images/train/x.jpg", "data/imagesIR/train/x.jpg"),
        ("data/images_2024/images/train/x.jpg", "data/images_2024/imagesIR/train/x.jpg"),
        ("images/LLVIP/images/train/x.jpg", "images/LLVIP/imagesIR/train/x.jpg"),
        ("images/images/train/sub/x.jpg", "images/imagesIR/train/sub/x.jpg"),
    ],
)
def test_ir_path_replaces_only_last_images_folder(tmp_path, rgb, expected):
    # Missing partner: the expected path (same name) is returned so the caller can report it.
    assert ir_path(tmp_path / rgb) == tmp_path / expected
    # Present partner, plus a decoy at the place a "replace the first images" rule would look.
    touch_image(tmp_path / expected, np.zeros((4, 4), np.uint8))
    parts = Path(rgb).parts
    wrong = Path(*[("imagesIR" if p == "images" and i == parts.index("images") else p) for i, p in enumerate(parts)])
    if wrong != Path(expected):
        touch_image(tmp_path / wrong, np.zeros((4, 4), np.uint8))
    assert ir_path(tmp_path / rgb) == tmp_path / expected


def test_ir_path_finds_partner_by_stem_with_other_suffix(tmp_path):
    rgb = touch_image(tmp_path / "images_2024" / "images" / "val" / "0007.jpg", np.zeros((4, 4, 3), np.uint8))
    ir = touch_image(tmp_path / "images_2024" / "imagesIR" / "val" / "0007.png", np.zeros((4, 4), np.uint8))
    touch_image(tmp_path / "images_2024" / "imagesIR" / "val" / "0008.jpg", np.zeros((4, 4), np.uint8))  # other stem
    assert ir_path(rgb) == ir
    assert ir_path(str(rgb)) == ir  # str accepted too
    # Two IR files with the stem, one of them with the RGB image's own suffix: refused (see below), not picked.
    touch_image(ir.with_suffix(".jpg"), np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match="two IR images for 0007.jpg"):
        ir_path(rgb)


@pytest.mark.parametrize("rgb_name, ir_name", [("a.JPG", "a.PNG"), ("a.jpg", "a.PNG"), ("a.JPG", "a.png")])
def test_ir_path_other_suffix_any_case(tmp_path, rgb_name, ir_name):
    """Upper-case suffixes count as images everywhere else (Ultralytics, `check_dataset`); the IR lookup too."""
    rgb = touch_image(tmp_path / "images" / "train" / rgb_name, np.zeros((4, 4, 3), np.uint8))
    ir = touch_image(tmp_path / "imagesIR" / "train" / ir_name, np.zeros((4, 4), np.uint8))
    assert ir_path(rgb) == ir


@pytest.mark.parametrize("rgb", ["data/pics/train/x.jpg", "data/images_2024/train/x.jpg", "x.jpg", "imagesIR/t/x.jpg"])
def test_ir_path_outside_images_folder_raises(tmp_path, rgb):
    with pytest.raises(DatasetError) as e:
        ir_path(tmp_path / rgb)
    assert_one_line_error(e, "x.jpg", "images/")


# ---------------------------------------------------------------------------------------------------------- load_pair
def test_load_pair_is_rgb_then_ir(tmp_path):
    bgr = np.zeros((16, 20, 3), np.uint8)
    bgr[:8, :10] = (0, 0, 255)  # pure red in OpenCV's BGR order
    bgr[8:, 10:] = (255, 0, 0)  # pure blue
    rgb = touch_image(tmp_path / "images" / "train" / "a.png", bgr)
    touch_image(tmp_path / "imagesIR" / "train" / "a.png", np.full((16, 20), 77, np.uint8))

    pair = load_pair(rgb, 4)[0]
    assert pair.shape == (16, 20, 4) and pair.dtype == np.uint8
    assert (pair[:8, :10, 0] == 255).all() and (pair[:8, :10, 1:3] == 0).all(), "channel 0 must be red (RGB, not BGR)"
    assert (pair[8:, 10:, 2] == 255).all() and (pair[8:, 10:, :2] == 0).all(), "channel 2 must be blue"
    assert (pair[..., 3] == 77).all(), "channel 3 must be the IR value"


def test_load_pair_three_channel_ir_with_six_channels(tmp_path):
    rgb = touch_image(tmp_path / "images" / "val" / "b.jpg", np.full((12, 12, 3), 50, np.uint8))
    ir_bgr = np.zeros((12, 12, 3), np.uint8)
    ir_bgr[:] = (10, 20, 30)  # B, G, R as stored by OpenCV
    touch_image(tmp_path / "imagesIR" / "val" / "b.png", ir_bgr)

    pair = load_pair(rgb, 6)[0]
    assert pair.shape == (12, 12, 6)
    assert (np.abs(pair[..., :3].astype(int) - 50) <= 2).all()
    # 3-channel IR is stacked in RGB order too, like the visible frame.
    assert (pair[..., 3] == 30).all() and (pair[..., 4] == 20).all() and (pair[..., 5] == 10).all()


@pytest.mark.parametrize("channels", [4, 6])
@pytest.mark.parametrize("ir_layers", [1, 3, 4])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_channels_decide_how_ir_is_read(tmp_path, channels, ir_layers, suffix):
    """Gray, 3-channel gray (LLVIP) and BGRA IR files all load with either `channels:` value; the values survive."""
    rgb = touch_image(tmp_path / "images" / "train" / "c.jpg", np.zeros((16, 16, 3), np.uint8))
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # a ramp, so a wrong read shows
    ir = {1: gray, 3: np.dstack([gray] * 3), 4: np.dstack([gray] * 3 + [np.full_like(gray, 255)])}[ir_layers]
    if suffix == ".jpg" and ir_layers == 4:
        pytest.skip("JPEG has no alpha")
    touch_image(tmp_path / "imagesIR" / "train" / f"c{suffix}", ir)

    pair = load_pair(rgb, channels)[0]
    assert pair.shape == (16, 16, channels) and pair.dtype == np.uint8
    tolerance = 3 if suffix == ".jpg" else 0
    for c in range(3, channels):
        assert np.abs(pair[..., c].astype(int) - gray).max() <= tolerance, f"IR channel {c} is not the stored frame"


def test_colour_mapped_ir_is_read_as_gray_with_one_warning(tmp_path, monkeypatch):
    warnings = []
    monkeypatch.setattr(fdata, "_warned", set())
    monkeypatch.setattr(fdata.LOGGER, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    root = tmp_path / "d"
    heat = cv2.applyColorMap(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)), cv2.COLORMAP_JET)
    for split in ("train", "val"):
        for k in range(2):
            touch_image(root / "images" / split / f"{k}.jpg", np.zeros((32, 32, 3), np.uint8))
            touch_image(root / "imagesIR" / split / f"{k}.png", heat)
    data = write_yaml(root, 4)

    pair = load_pair(root / "images" / "train" / "0.jpg", 4)[0]
    assert pair.shape == (32, 32, 4)
    luma = cv2.cvtColor(heat, cv2.COLOR_BGR2GRAY).astype(int)
    assert np.abs(pair[..., 3] - luma).max() <= 2, (
        "the colour map must become its luma (the decoder rounds its own way)"
    )
    check_dataset(data)
    check_dataset(data)
    assert len(warnings) == 1, warnings
    assert str(root / "imagesIR" / "train" / "0.png") in warnings[0] and "channels: 6" in warnings[0]

    warnings.clear()
    monkeypatch.setattr(fdata, "_warned", set())
    check_dataset(write_yaml(root, 6))  # 6 keeps the colours: nothing to warn about
    gray_root = tmp_path / "g"  # and 3 equal channels (LLVIP) are no colour map
    for split in ("train", "val"):
        touch_image(gray_root / "images" / split / "0.jpg", np.zeros((32, 32, 3), np.uint8))
        touch_image(
            gray_root / "imagesIR" / split / "0.jpg", cv2.cvtColor(heat, cv2.COLOR_BGR2GRAY)[..., None] * [1, 1, 1]
        )
    check_dataset(write_yaml(gray_root, 4))
    assert warnings == []


@pytest.mark.parametrize("channels", [4, 6])
def test_load_pair_16_bit_ir_is_an_error(tmp_path, channels):
    rgb = touch_image(tmp_path / "images" / "train" / "s.jpg", np.zeros((8, 8, 3), np.uint8))
    ir = touch_image(tmp_path / "imagesIR" / "train" / "s.png", np.full((8, 8), 40000, np.uint16))
    with pytest.raises(DatasetError) as e:
        load_pair(rgb, channels)
    assert_one_line_error(e, str(ir), "8 bits", "convert it to 8-bit")


def test_load_pair_missing_or_unreadable(tmp_path):
    rgb = touch_image(tmp_path / "images" / "train" / "d.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(DatasetError) as e:
        load_pair(rgb, 4)
    assert_one_line_error(e, str(tmp_path / "imagesIR" / "train" / "d.*"), "IR", "missing")
    bad = tmp_path / "imagesIR" / "train" / "d.png"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError) as e:
        load_pair(rgb, 4)
    assert_one_line_error(e, str(bad))
    with pytest.raises(DatasetError) as e:
        load_pair(tmp_path / "images" / "train" / "gone.jpg", 4)
    assert_one_line_error(e, "gone.jpg")


@pytest.mark.parametrize("channels", [4, 6])
def test_load_pair_resizes_other_size_ir_with_warning(tmp_path, monkeypatch, channels):
    warnings = []
    monkeypatch.setattr(fdata, "_warned", set())
    monkeypatch.setattr(fdata.LOGGER, "warning", lambda msg, *a, **k: warnings.append(str(msg)))
    bgr = np.zeros((64, 96, 3), np.uint8)
    bgr[16:48, 24:72] = 255
    rgb = touch_image(tmp_path / "images" / "train" / "e.png", bgr)
    ir = np.zeros((32, 48) if channels == 4 else (32, 48, 3), np.uint8)  # half resolution, same scene
    ir[8:24, 12:36] = 255
    ir_file = touch_image(tmp_path / "imagesIR" / "train" / "e.png", ir)

    pair = load_pair(rgb, channels)[0]
    assert pair.shape == (64, 96, channels)
    assert iou(pair[..., 0] > 127, pair[..., 3] > 127) > 0.9, "resized IR must stay aligned with the RGB frame"
    assert len(warnings) == 1 and str(ir_file) in warnings[0]
    load_pair(rgb, channels)
    assert len(warnings) == 1, "warn once, not per frame"


# ------------------------------------------------------------------------------------------- augmentation alignment
@pytest.mark.parametrize("channels", [4, 6])
def test_mosaic_perspective_flip_keep_rgb_and_ir_aligned(tmp_path, channels):
    data_yaml = marker_dataset(tmp_path / "d", n=8, channels=channels)
    data = check_det_dataset(str(data_yaml))
    assert data["channels"] == channels
    args = cfg(
        imgsz=128,
        mosaic=1.0,
        degrees=10,
        translate=0.1,
        scale=0.5,
        shear=2,
        perspective=0.0005,
        fliplr=0.5,
        flipud=0.5,
    )
    ds = build_paired_dataset(args, data["train"], 4, data, mode="train", stride=32)
    assert type(ds) is PairedDataset
    seed(0)
    padded_samples = 0
    for i in range(16):
        img = ds[i % len(ds)]["img"].numpy()  # C x H x W
        assert img.shape == (channels, 128, 128) and img.dtype == np.uint8
        rgb = (img[:3] > 127).all(0)
        assert rgb.sum() > 20, f"sample {i}: no marker visible"
        for c in range(3, channels):
            ir = img[c] > 127
            assert iou(rgb, ir) > 0.95, f"sample {i}: IR channel {c} marker moved away from the RGB marker"
        # Where one channel is padding, every channel is padding (no channel filled with 0 or another value).
        pad = img == PAD
        assert (pad.all(0) == pad.any(0)).all(), f"sample {i}: padding differs between channels"
        padded_samples += pad.all(0).sum() > 50
    assert padded_samples, "mosaic + scale 0.5 should leave 114 borders in some samples"

    # Val: letterboxed to a rect batch shape; the padded corner is 114 on every channel.
    val = build_paired_dataset(args, data["val"], 4, data, mode="val", stride=32)
    img = val[0]["img"].numpy()
    assert img.shape[1:] != (96, 128), "expected letterbox padding at this size"
    for y, x in ((0, 0), (-1, -1), (0, -1), (-1, 0)):
        assert (img[:, y, x] == PAD).all(), f"corner {(y, x)}: {img[:, y, x]}"
    assert iou((img[:3] > 127).all(0), img[3] > 127) > 0.95


# ------------------------------------------------------------------------------------------ JPEG reduced decoding
def textured(h: int, w: int, seed: int) -> np.ndarray:
    """A frame with detail at several scales, so that a shifted, flipped or badly resampled read shows."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w), np.float32)
    for cell, amp in ((64, 60), (16, 30), (4, 12)):
        small = rng.standard_normal((h // cell + 1, w // cell + 1)).astype(np.float32)
        img += amp * cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(img + 110, 0, 255).astype(np.uint8)


def jpeg_pairs(root: Path, n: int, h: int, w: int, ir_layers: int, boxes_per_image: int = 0) -> dict:
    """LLVIP-like pairs: RGB and IR JPEGs (IR as 1 or 3 equal channels), optional white boxes drawn into both."""
    rng = np.random.default_rng(7)
    for split in ("train", "val"):
        for k in range(n):
            gray = textured(h, w, seed=k)
            rgb = cv2.merge([gray, np.roll(gray, 5, 1), 255 - gray])  # three different channels
            ir = cv2.GaussianBlur(gray, (0, 0), 2) // 2
            lines = []
            for _ in range(boxes_per_image):
                bh, bw = int(rng.integers(h // 6, h // 3)), int(rng.integers(w // 8, w // 4))
                y0, x0 = int(rng.integers(0, h - bh)), int(rng.integers(0, w - bw))
                rgb[y0 : y0 + bh, x0 : x0 + bw] = 255
                ir[y0 : y0 + bh, x0 : x0 + bw] = 255
                lines.append(f"0 {(x0 + bw / 2) / w:.6f} {(y0 + bh / 2) / h:.6f} {bw / w:.6f} {bh / h:.6f}\n")
            touch_image(root / "images" / split / f"{k:04d}.jpg", rgb)
            touch_image(root / "imagesIR" / split / f"{k:04d}.jpg", ir if ir_layers == 1 else cv2.merge([ir] * 3))
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{k:04d}.txt").write_text("".join(lines))
    return check_det_dataset(str(write_yaml(root, 4)))


def save_jpeg(path: Path, img: np.ndarray, orientation: int = 1) -> Path:
    """A JPEG as cameras write it: PIL, with an EXIF orientation tag (6: to be shown turned 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path, quality=95, exif=exif.tobytes())
    return path


@pytest.mark.parametrize(
    "w, h, imgsz, reduction",
    [(1280, 1024, 640, 2), (1280, 1024, 600, 2), (1280, 1024, 320, 4), (1280, 1024, 160, 8), (1280, 1024, 1280, 1)],
)
def test_jpeg_decoded_at_smallest_reduction_at_least_the_training_size(tmp_path, monkeypatch, w, h, imgsz, reduction):
    rgb = touch_image(tmp_path / "images" / "train" / "a.jpg", np.full((h, w, 3), 60, np.uint8))
    touch_image(tmp_path / "imagesIR" / "train" / "a.jpg", np.full((h, w, 3), 90, np.uint8))
    touch_image(tmp_path / "images" / "train" / "b.png", np.full((h, w, 3), 60, np.uint8))
    touch_image(tmp_path / "imagesIR" / "train" / "b.png", np.full((h, w), 90, np.uint8))
    decoded = []
    imdecode = cv2.imdecode

    def recording_imdecode(buf, flags):
        im = imdecode(buf, flags)
        decoded.append(im.shape[:2])
        return im

    monkeypatch.setattr(cv2, "imdecode", recording_imdecode)
    pair, hw0 = load_pair(rgb, 4, imgsz)
    assert hw0 == (h, w) and pair.shape[:2] == (round(h * imgsz / w), imgsz)
    assert decoded == [(h // reduction, w // reduction)] * 2, "RGB and IR decoded at the smallest fitting reduction"
    decoded.clear()
    load_pair(rgb.with_name("b.png"), 4, imgsz)
    assert decoded == [(h, w)] * 2, "PNG has no reduced decoding: read in full"


def test_jpeg_exif_orientation_is_applied_as_stock_does(tmp_path):
    """A camera JPEG stored 1280x1024 with 'turn 90 degrees' in its EXIF is a 1024x1280 frame, at any reduction."""
    img = np.zeros((1024, 1280, 3), np.uint8)
    img[:100, :200] = 255  # a mark in the stored top-left corner: top-right once turned clockwise
    rgb = save_jpeg(tmp_path / "images" / "train" / "a.jpg", img, orientation=6)
    save_jpeg(tmp_path / "imagesIR" / "train" / "a.jpg", img, orientation=6)
    plain = cv2.imread(str(rgb))  # stock's read: cv2 applies the EXIF orientation
    assert plain.shape[:2] == (1280, 1024)
    for imgsz in (640, 320, 1280):
        pair, hw0 = load_pair(rgb, 4, imgsz)
        assert hw0 == (1280, 1024) and pair.shape == (imgsz, imgsz * 1024 // 1280, 4)
        expected = cv2.resize(plain, pair.shape[1::-1], interpolation=cv2.INTER_AREA)[..., 0]
        assert np.abs(pair[..., 0].astype(int) - expected).mean() < 3
        assert np.abs(pair[..., 3].astype(int) - expected).mean() < 3


@pytest.mark.parametrize("channels", [4, 6])
def test_training_batch_matches_the_files_read_the_plain_way(tmp_path, channels):
    """A batch equals full decodes resized to the training size, to within what reduced JPEG decoding changes."""
    data = jpeg_pairs(tmp_path / "d", n=4, h=384, w=480, ir_layers=3)  # imgsz 160: decoded at 1/2, then resized
    data["channels"] = channels
    ds = build_paired_dataset(cfg(imgsz=160), data["train"], 4, data, "train", 32)
    batch = next(iter(build_dataloader(ds, 4, 0, shuffle=False)))
    for img, im_file in zip(batch["img"].numpy(), batch["im_file"]):
        rgb = cv2.resize(cv2.imread(im_file), (160, 128), interpolation=cv2.INTER_AREA)[..., ::-1]
        ir = cv2.resize(
            cv2.imread(str(ir_path(im_file)), cv2.IMREAD_GRAYSCALE), (160, 128), interpolation=cv2.INTER_AREA
        )
        plain = np.dstack([rgb] + [ir] * (channels - 3)).transpose(2, 0, 1).astype(int)
        top = (160 - 128) // 2  # the frame sits centred in the square training image, padded with 114
        got = img[:, top : top + 128].astype(int)
        assert (img[:, :top] == PAD).all() and (img[:, top + 128 :] == PAD).all()
        for c in range(channels):
            assert np.abs(got[c] - plain[c]).mean() < 2.5, f"{im_file}: channel {c} differs from the plain read"
        assert np.abs(got[0] - plain[2]).mean() > 20, "the test cannot tell red from blue"
        assert np.abs(got[3] - np.roll(plain[3], 2, 1)).mean() > 5, "the test cannot tell a 2-pixel shift"


@pytest.mark.parametrize("channels", [4, 6])
@pytest.mark.parametrize("ir_layers", [1, 3])
def test_boxes_stay_on_both_modalities_through_mosaic_and_affine(tmp_path, channels, ir_layers):
    """White boxes drawn into both JPEG frames: after mosaic, affine and flips, the label boxes hold them in both."""
    data = jpeg_pairs(tmp_path / "d", n=8, h=384, w=480, ir_layers=ir_layers, boxes_per_image=2)
    data["channels"] = channels
    args = cfg(imgsz=160, mosaic=1.0, degrees=3, translate=0.1, scale=0.3, fliplr=0.5, flipud=0.5)
    ds = build_paired_dataset(args, data["train"], 4, data, "train", 32)
    seed(0)
    boxes_seen = 0
    for i in range(16):
        sample = ds[i % len(ds)]
        img = sample["img"].numpy()
        white = (img[:3] > 200).all(0)  # the boxes; the texture is never white in all three channels
        for c in range(3, channels):
            assert iou(white, img[c] > 200) > 0.9, f"sample {i}: IR channel {c} moved away from the RGB boxes"
        for x, y, w, h in sample["bboxes"].numpy() * 160:  # normalized xywh
            x0, y0, x1, y1 = (int(round(v)) for v in (x - w / 2, y - h / 2, x + w / 2, y + h / 2))
            if min(x1 - x0, y1 - y0) < 6:
                continue  # cut to a sliver by the crop: rounding dominates
            boxes_seen += 1
            for c, name in ((0, "RGB"), (channels - 1, "IR")):
                on_box = (img[c, y0:y1, x0:x1] > 200).mean()
                assert on_box > 0.6, f"sample {i}: label box {x0, y0, x1, y1} is not on the {name} box ({on_box:.2f})"
    assert boxes_seen > 20


# --------------------------------------------------------------------------------------------------------------- HSV
def colorful_pair(h=64, w=64, channels=4, s=0):
    rng = np.random.default_rng(s)
    rgb = rng.integers(30, 226, (h, w, 3), dtype=np.uint8)
    ir = rng.integers(0, 256, (h, w, channels - 3), dtype=np.uint8)
    return rgb, ir


@pytest.mark.parametrize("channels", [4, 6])
def test_rgb_only_hsv_changes_rgb_leaves_ir(channels):
    rgb, ir = colorful_pair(channels=channels)
    img = np.concatenate([rgb, ir], axis=2)
    seed(3)
    out = RGBOnlyHSV(hgain=0.5, sgain=0.9, vgain=0.9)({"img": img.copy()})["img"]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 3:], ir), "IR must be byte-identical"
    assert (out[..., :3] != rgb).mean() > 0.5, "RGB must be jittered"
    # Same colour change as stock HSV on the equivalent BGR frame (hue direction, saturation, value).
    seed(3)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    RandomHSV(hgain=0.5, sgain=0.9, vgain=0.9)({"img": bgr})
    assert np.array_equal(out[..., :3], bgr[..., ::-1])


def test_dataset_hsv_jitters_rgb_only(tmp_path):
    root = tmp_path / "d"
    rgbs, irs = [], []
    for split in ("train", "val"):
        for k in range(4):
            rgb, ir = colorful_pair(s=k)
            touch_image(root / "images" / split / f"{k}.png", rgb[..., ::-1])  # file is BGR, so RGB in memory
            touch_image(root / "imagesIR" / split / f"{k}.png", ir[..., 0])
            (root / "labels" / split).mkdir(parents=True, exist_ok=True)
            (root / "labels" / split / f"{k}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
            if split == "train":
                rgbs.append(rgb), irs.append(ir[..., 0])
    data = check_det_dataset(str(write_yaml(root, 4)))
    ds = build_paired_dataset(cfg(imgsz=64, hsv_h=0.5, hsv_s=0.9, hsv_v=0.9), data["train"], 4, data, "train", 32)
    names = [type(t).__name__ for t in ds.transforms.transforms]
    assert "RGBOnlyHSV" in names and "RandomHSV" not in names, names
    seed(1)
    for i in range(len(ds)):
        sample = ds[i]
        k = int(Path(sample["im_file"]).stem)
        img = sample["img"].numpy().transpose(1, 2, 0)
        assert np.array_equal(img[..., 3], irs[k]), "IR must come through HSV untouched"
        assert (img[..., :3] != rgbs[k]).mean() > 0.5, "RGB must be jittered"
    # With the gains at 0, the sample is exactly the files (nothing else in this pipeline changes pixels).
    ds0 = build_paired_dataset(cfg(imgsz=64), data["train"], 4, data, "train", 32)
    for i in range(len(ds0)):
        sample = ds0[i]
        k = int(Path(sample["im_file"]).stem)
        assert np.array_equal(sample["img"].numpy().transpose(1, 2, 0), np.dstack([rgbs[k], irs[k]]))


def test_hsv_does_not_corrupt_ram_cache(tmp_path):
    """HSV works in place; with a RAM cache and no mosaic, it must not write into the cached pair."""
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=4, n_val=1)))
    args = cfg(imgsz=256, cache="ram", hsv_h=0.5, hsv_s=0.9, hsv_v=0.9)  # 256: no resize, the cached array itself
    ds = build_paired_dataset(args, data["train"], 4, data, "train", 32)
    before = [ds.ims[i].copy() for i in range(len(ds))]
    seed(0)
    for i in range(len(ds)):
        ds[i]
    for i in range(len(ds)):
        assert np.array_equal(ds.ims[i], before[i]), f"RAM cache of image {i} changed by augmentation"


# ------------------------------------------------------------------------------------------------------------ caches
def test_cache_modes_match_no_cache_and_ignore_stock_npy(tmp_path):
    data_yaml = make_dataset(tmp_path / "d", n_train=1, n_val=4)
    data = check_det_dataset(str(data_yaml))
    val_dir = Path(data["val"])
    ref = build_paired_dataset(cfg(imgsz=64), data["val"], 2, data, "val", 32)
    expected = [ref[i]["img"].clone() for i in range(len(ref))]
    assert len(expected) == 4 and expected[0].shape[0] == 4

    # Stock RGB caches (x.npy) next to every image, with other content: never read, never rewritten.
    decoys = {}
    for im in sorted(val_dir.glob("*.jpg")):
        decoy = im.with_suffix(".npy")
        np.save(decoy, np.full((192, 256, 3), 7, np.uint8))
        decoys[decoy] = decoy.read_bytes()
        os.utime(decoy, (im.stat().st_mtime - 100,) * 2)  # older than the image: stock would refresh it
        decoys[decoy] = (decoys[decoy], decoy.stat().st_mtime_ns)

    for cache in (False, "ram", "disk", "disk"):  # the second disk run reads the *.pair4.npy files written by the first
        ds = build_paired_dataset(cfg(imgsz=64, cache=cache), data["val"], 2, data, "val", 32)
        got = [ds[i]["img"] for i in range(len(ds))]
        for i, (a, b) in enumerate(zip(got, expected)):
            assert torch.equal(a, b), f"cache={cache!r}: sample {i} differs from the uncached sample"
        for decoy, (content, mtime) in decoys.items():
            untouched = decoy.read_bytes() == content and decoy.stat().st_mtime_ns == mtime
            assert untouched, f"cache={cache!r} touched {decoy}"

    pair_caches = sorted(val_dir.glob("*.pair4.npy"))
    assert [p.name.split(".")[0] for p in pair_caches] == [p.stem for p in sorted(val_dir.glob("*.jpg"))]
    for p in pair_caches:
        im = p.with_name(p.name.split(".")[0] + ".jpg")
        with open(p, "rb") as fh:
            np.load(fh)  # the header
            assert np.array_equal(np.load(fh), load_pair(im, 4, 64)[0]), "the pair is cached at training size"


def test_disk_cache_refreshed_when_ir_changes(tmp_path):
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=1, n_val=2)))
    build_paired_dataset(cfg(imgsz=256, cache="disk"), data["val"], 2, data, "val", 32)
    im = sorted(Path(data["val"]).glob("*.jpg"))[0]
    cache = im.with_suffix(".pair4.npy")
    assert cache.exists()
    ir = ir_path(im)
    cv2.imwrite(str(ir), np.full((192, 256), 201, np.uint8))  # new IR frame
    os.utime(ir, (cache.stat().st_mtime + 10,) * 2)
    ds = build_paired_dataset(cfg(imgsz=256, cache="disk"), data["val"], 2, data, "val", 32)
    i = ds.im_files.index(str(im))
    img = ds[i]["img"].numpy()
    h, w = 192, 256  # letterboxed into a rect shape, centred, the frame itself not resized
    top, left = (img.shape[1] - h) // 2, (img.shape[2] - w) // 2
    assert (img[3, top : top + h, left : left + w] == 201).all(), "a stale pair cache was used after the IR changed"


def disk_cached_val(tmp_path, imgsz: int = 256):
    """A 2-pair val split and a function that builds its dataset with CACHE="disk", as each launch does."""
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=1, n_val=2)))
    return data, lambda **kw: build_paired_dataset(
        cfg(imgsz=imgsz, cache="disk", **kw), data["val"], 2, data, "val", 32
    )


def file_ids(paths) -> dict:
    return {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_disk_cache_written_only_when_missing_or_stale(tmp_path):
    data, build = disk_cached_val(tmp_path)
    build()
    caches = sorted(Path(data["val"]).glob("*.pair4.npy"))
    assert len(caches) == 2
    before = file_ids(caches)
    build()
    assert file_ids(caches) == before, "a second launch with nothing changed rewrote the disk cache"

    # One IR frame replaced by another file that keeps an older mtime (cp -p, rsync -a): only its cache is rewritten.
    im = sorted(Path(data["val"]).glob("*.jpg"))[0]
    ir = ir_path(im)
    older = ir.stat().st_mtime_ns - 10**10
    cv2.imwrite(str(ir), np.full((192, 256), 201, np.uint8))
    os.utime(ir, ns=(older, older))
    ds = build()
    rewritten = [p for p, ids in file_ids(caches).items() if ids != before[p]]
    assert rewritten == [im.with_suffix(".pair4.npy")]
    img = ds[ds.im_files.index(str(im))]["img"].numpy()
    top, left = (img.shape[1] - 192) // 2, (img.shape[2] - 256) // 2
    assert (img[3, top : top + 192, left : left + 256] == 201).all(), "the stale cache was served"

    # Another training size is another cache: rewritten, and served at the new size.
    ds = build_paired_dataset(cfg(imgsz=128, cache="disk"), data["val"], 2, data, "val", 32)
    assert all(ids != before[p] for p, ids in file_ids(caches).items())
    assert ds.cached_pair(0)[0].shape == (96, 128, 4) and ds.load_image(0)[0].shape == (96, 128, 4)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_disk_cache_is_warned_deleted_and_read_again(tmp_path, monkeypatch, damage):
    """A cache file broken by a disk error never stops a launch: one warning, the file goes, the images are read."""
    data, build = disk_cached_val(tmp_path)
    expected = [s["img"] for s in build_paired_dataset(cfg(imgsz=256), data["val"], 2, data, "val", 32)]
    build()
    broken = sorted(Path(data["val"]).glob("*.pair4.npy"))[0]
    content = broken.read_bytes()
    broken.write_bytes({"truncated": content[: len(content) // 2], "garbage": b"\x93NUMPY?" * 40, "empty": b""}[damage])
    warnings = []
    monkeypatch.setattr(fdata.LOGGER, "warning", lambda msg, *a, **k: warnings.append(str(msg)))

    for cache in ("disk", False):  # the launch that finds it, then a launch without caching that reads the files
        ds = build_paired_dataset(cfg(imgsz=256, cache=cache), data["val"], 2, data, "val", 32)
        for i in range(len(ds)):
            sample = ds[i]
            assert torch.equal(sample["img"], expected[ds.im_files.index(sample["im_file"])])
    assert len([w for w in warnings if str(broken) in w]) == 1, warnings
    build()
    with open(broken, "rb") as fh:  # whole again after the next launch
        np.load(fh)
        assert np.load(fh).shape == (192, 256, 4)


def test_disk_cache_write_never_leaves_half_a_file(tmp_path, monkeypatch):
    data, build = disk_cached_val(tmp_path)
    build()
    cache = sorted(Path(data["val"]).glob("*.pair4.npy"))[0]
    old = cache.read_bytes()
    ir = ir_path(cache.with_name(cache.name.split(".")[0] + ".jpg"))
    cv2.imwrite(str(ir), np.full((192, 256), 201, np.uint8))  # stale now: this launch rewrites it
    save = np.save

    def disk_full_mid_write(fh, arr, *args, **kwargs):
        if arr.ndim == 3:  # the stack, after the header
            fh.write(b"\0" * 1000)
            raise OSError(28, "No space left on device")
        return save(fh, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", disk_full_mid_write)
    ds = build()
    assert cache.read_bytes() == old, "the cache file was replaced by a partial one"
    assert not list(cache.parent.glob("*.tmp")), "a temporary file was left behind"
    img = ds[ds.im_files.index(str(cache.with_name(cache.name.split(".")[0] + ".jpg")))]["img"].numpy()
    assert (img[3][img[3] != PAD] == 201).all(), "the stale cache was served"


# ------------------------------------------------------------------------------------------------------ label cache
def test_label_cache_hash_covers_ir_files(tmp_path):
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=3, n_val=1)))
    ds = build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    h0 = ds.get_cache_hash()
    stock = super(PairedDataset, ds).get_cache_hash()
    assert ds.get_cache_hash() == h0, "hash must be stable"
    ir = ir_path(ds.im_files[0])
    original = ir.read_bytes()
    mtime = ir.stat().st_mtime_ns

    cv2.imwrite(str(ir), np.zeros((100, 100), np.uint8))  # replaced by a frame of another size
    os.utime(ir, ns=(mtime, mtime))  # same mtime: the size alone must change the hash
    h1 = ds.get_cache_hash()
    assert h1 != h0

    ir.unlink()  # removed
    h2 = ds.get_cache_hash()
    assert h2 not in (h0, h1)

    ir.with_suffix(".jpg").write_bytes(original)  # back, under another suffix
    assert ds.get_cache_hash() not in (h0, h1, h2)

    # The stock hash alone would not have noticed any of this.
    assert super(PairedDataset, ds).get_cache_hash() == stock


def test_label_cache_rebuilt_after_ir_change(tmp_path):
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=3, n_val=1)))
    build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    cache_file = Path(data["path"]) / "labels" / "train.cache"
    assert cache_file.exists()
    stored = np.load(cache_file, allow_pickle=True).item()["hash"]
    ir = ir_path(sorted(Path(data["train"]).glob("*.jpg"))[0])
    cv2.imwrite(str(ir), np.zeros((50, 50), np.uint8))
    ds = build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    assert np.load(cache_file, allow_pickle=True).item()["hash"] == ds.get_cache_hash() != stored


# ------------------------------------------------------------------------------------------ every pair, before training
def break_ir(ir: Path, how: str) -> None:
    if how == "garbage":
        ir.write_bytes(b"not an image, " * 20)
    elif how == "empty":
        ir.write_bytes(b"")
    elif how == "16-bit":
        cv2.imwrite(str(ir), np.full((192, 256), 40000, np.uint16))
    else:  # 16-bit colour
        cv2.imwrite(str(ir), np.full((192, 256, 3), 40000, np.uint16))


@pytest.mark.parametrize("how", ["garbage", "empty", "16-bit", "16-bit colour"])
def test_bad_ir_in_the_middle_of_the_set_stops_before_training(tmp_path, how):
    """check_dataset decodes the first pair only; the dataset checks every IR header when it builds its label cache."""
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=8, n_val=2)))
    ir = sorted((tmp_path / "d" / "imagesIR" / "train").iterdir())[5]
    good = ir.read_bytes()
    break_ir(ir, how)
    with pytest.raises(DatasetError) as e:
        build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    assert_one_line_error(e, str(ir), "IR image")
    assert not (tmp_path / "d" / "labels" / "train.cache").exists(), "a bad set must not get a label cache"

    ir.write_bytes(good)  # fixed: builds, and caches the check with the labels
    build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    assert (tmp_path / "d" / "labels" / "train.cache").exists()
    break_ir(ir, how)  # broken after a good launch: the changed file invalidates the cache, so it is checked again
    with pytest.raises(DatasetError) as e:
        build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    assert_one_line_error(e, str(ir), "IR image")


# --------------------------------------------------------------------------------------------------- check_dataset
@pytest.fixture
def demo_copy(tmp_path):
    return make_dataset(tmp_path / "d", n_train=4, n_val=2)


def test_check_dataset_accepts_good_data(demo_copy):
    check_dataset(demo_copy)
    check_dataset(str(demo_copy))


def test_check_dataset_missing_ir(demo_copy):
    ir = sorted((demo_copy.parent / "imagesIR" / "val").iterdir())[1]
    ir.unlink()
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    # The expected IR path (same stem, any suffix) is named, with how many are missing and the fix.
    assert_one_line_error(e, str(demo_copy.parent / "imagesIR" / "val" / (ir.stem + ".*")), "1 of 2", "imagesIR")


@pytest.mark.parametrize("junk", ["hello world\n", "0 0.5 0.5 0.2\n", "7 0.5 0.5 0.2 0.2\n", "0 0.5 0.5 1.5 0.2\n"])
def test_check_dataset_junk_label(demo_copy, junk):
    label = sorted((demo_copy.parent / "labels" / "train").iterdir())[2]
    label.write_text(label.read_text().rstrip("\n") + "\n" + junk)
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    n = len(label.read_text().splitlines())
    assert_one_line_error(e, f"{label}:{n}", "class x y w h")


def test_check_dataset_path_does_not_exist(tmp_path, demo_copy):
    missing = tmp_path / "nowhere"
    demo_copy.write_text(demo_copy.read_text().replace(f"path: {demo_copy.parent}", f"path: {missing}"))
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    assert_one_line_error(e, str(demo_copy), str(missing / "images" / "train"), "does not exist", "path:")


def test_check_dataset_config_not_found(tmp_path):
    with pytest.raises(DatasetError) as e:
        check_dataset(tmp_path / "absent.yaml")
    assert_one_line_error(e, str(tmp_path / "absent.yaml"), "not found")


@pytest.mark.parametrize("channels", [5, 3, "null"])
def test_check_dataset_unsupported_channels(demo_copy, channels):
    demo_copy.write_text(demo_copy.read_text().replace("channels: 4", f"channels: {channels}"))
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    assert_one_line_error(e, str(demo_copy), "not supported", "4 (", "6 (")


def test_check_dataset_accepts_three_channel_ir_with_either_channels(tmp_path):
    """LLVIP-style data: 3-channel gray IR frames pass with channels: 4 and with channels: 6."""
    root = tmp_path / "llvip"
    for split in ("train", "val"):
        touch_image(root / "images" / split / "1.jpg", np.zeros((32, 32, 3), np.uint8))
        touch_image(root / "imagesIR" / split / "1.jpg", np.zeros((32, 32, 3), np.uint8) + 90)
    check_dataset(write_yaml(root, 6, names=("person",)))
    check_dataset(write_yaml(root, 4, names=("person",)))


@pytest.mark.parametrize("config", [folders_config, image_list_config])
def test_check_dataset_takes_a_list_of_folders_or_an_image_list(demo_copy, config):
    """Both are Ultralytics data configs; the pairing rule and the checks apply to every image they name."""
    data = config(demo_copy)
    check_dataset(data)
    rgb = sorted((demo_copy.parent / "images" / "train").iterdir())[-1]  # listed either way
    ir = ir_path(rgb)
    ir.unlink()
    with pytest.raises(DatasetError) as e:
        check_dataset(data)
    assert_one_line_error(e, str(ir.with_suffix(".*")), "IR image missing")


def test_an_image_list_naming_a_missing_file_is_one_line(demo_copy):
    data = image_list_config(demo_copy)
    train = demo_copy.parent / "train.txt"
    train.write_text(train.read_text() + "./images/train/gone.jpg\n")
    with pytest.raises(DatasetError) as e:
        check_dataset(data)
    n = len(train.read_text().splitlines())
    assert_one_line_error(e, f"{train}:{n}", "gone.jpg does not exist")


def test_two_ir_files_with_one_stem_are_refused(demo_copy):
    """One of them would be paired without a word, maybe another frame's IR under this frame's labels."""
    rgb = sorted((demo_copy.parent / "images" / "train").iterdir())[1]
    ir = ir_path(rgb)
    other = ir.with_suffix(".jpg")
    cv2.imwrite(str(other), cv2.imread(str(ir)))
    for find in (lambda: ir_path(rgb), lambda: fdata.ir_paths([rgb]), lambda: check_dataset(demo_copy)):
        with pytest.raises(DatasetError) as e:
            find()
        assert_one_line_error(e, str(other), str(ir), "two IR images", rgb.name)


def test_ir_paths_is_ir_path_for_a_whole_set(tmp_path):
    """The bulk form (one folder read) and the one-file form (stat calls) pair by the same rule."""
    rgb = [touch_image(tmp_path / "images" / "train" / f"{k}.jpg", np.zeros((8, 8, 3), np.uint8)) for k in range(4)]
    touch_image(tmp_path / "imagesIR" / "train" / "0.jpg", np.zeros((8, 8), np.uint8))
    touch_image(tmp_path / "imagesIR" / "train" / "1.png", np.zeros((8, 8), np.uint8))
    touch_image(tmp_path / "imagesIR" / "train" / "2.PNG", np.zeros((8, 8), np.uint8))
    (tmp_path / "imagesIR" / "train" / "3.txt").write_text("not an image")
    assert fdata.ir_paths(rgb) == [ir_path(p) for p in rgb]
    assert [p.name for p in fdata.ir_paths(rgb)] == ["0.jpg", "1.png", "2.PNG", "3.jpg"]  # 3: missing


def test_an_empty_rgb_image_is_dropped_saying_it_is_empty(tmp_path):
    """Stock drops an unreadable RGB image from the label cache; its reason was its HEIF plugin's ("pi_heif")."""
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=4, n_val=2)))
    rgb = sorted(Path(data["train"]).iterdir())[1]
    rgb.write_bytes(b"")
    ds = build_paired_dataset(cfg(), data["train"], 2, data, "train", 32)
    assert len(ds) == 3
    msgs = np.load(tmp_path / "d" / "labels" / "train.cache", allow_pickle=True).item()["msgs"]
    assert [m.partition(str(rgb))[2] for m in msgs] == [": ignoring corrupt image/label: the file is empty (0 bytes)"]


def test_paired_datasets_take_every_argument_from_stock(tmp_path):
    """The dataset is built by stock's build_yolo_dataset: e.g. its split fraction, and no fraction for a set
    downloaded `complete` (both missed by the copy of its arguments this replaced)."""
    data = check_det_dataset(str(make_dataset(tmp_path / "d", n_train=8, n_val=4)))
    assert len(build_paired_dataset(cfg(fraction=0.5), data["train"], 2, data, "train", 32)) == 4
    assert len(build_paired_dataset(cfg(fraction=0.5), data["train"], 2, {**data, "complete": True}, "train", 32)) == 8
    assert len(build_paired_dataset(cfg(fraction=[1.0, 0.5]), data["val"], 2, data, "val", 32)) == 2
    assert type(build_paired_dataset(cfg(), data["val"], 2, data, "val", 32)) is PairedDataset


@pytest.mark.parametrize("ir_kind", ["gray", "equal channels", "colour-mapped"])
@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_video_frames_stack_as_image_files_do(tmp_path, ir_kind, suffix):
    """One rule turns IR into the stack's layers (`ir_layers`): the pair read from its files, and the same frames as a
    video decoder hands them over (BGR), stack alike, for 4 and 6 channels. Files are decoded straight to gray for
    4 channels (faster): the same values for gray and equal-channel IR (LLVIP's), up to 3 levels off for a
    colour-mapped one (which gets a warning to use 6)."""
    from yolofuse.source import stack_frames

    rng = np.random.default_rng(0)
    gray = cv2.GaussianBlur(rng.integers(0, 256, (64, 80), dtype=np.uint8), (9, 9), 3)
    ir_frame = {"gray": gray, "equal channels": cv2.merge([gray] * 3)}.get(ir_kind)
    ir_frame = cv2.applyColorMap(gray, cv2.COLORMAP_JET) if ir_frame is None else ir_frame
    rgb = touch_image(tmp_path / "images" / "v" / f"a{suffix}", rng.integers(0, 256, (64, 80, 3), dtype=np.uint8))
    ir = touch_image(tmp_path / "imagesIR" / "v" / f"a{suffix}", ir_frame)
    for channels in (4, 6):
        from_files = load_pair(rgb, channels)[0].astype(int)
        from_video = stack_frames(cv2.imread(str(rgb)), cv2.imread(str(ir)), channels).astype(int)
        assert from_files.shape == from_video.shape == (64, 80, channels)
        assert np.array_equal(from_files[..., :3], from_video[..., :3])
        gap = np.abs(from_files[..., 3:] - from_video[..., 3:]).max()
        assert gap <= (3 if ir_kind == "colour-mapped" and channels == 4 else 0), gap


@pytest.mark.parametrize(
    "junk", ["nan 0.5 0.5 0.1 0.1\n", "0 inf 0.5 0.1 0.1\n", "0 0.5 0.5 nan 0.1\n", "inf 0.5 0.5 0.1 0.1\n"]
)
def test_check_dataset_label_with_nan_or_inf(demo_copy, junk):
    label = sorted((demo_copy.parent / "labels" / "val").iterdir())[0]
    label.write_text(junk + label.read_text())
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    assert_one_line_error(e, f"{label}:1", "class x y w h")


# ----------------------------------------------------------------------------------------- every error, in one line
def _yaml_syntax_error(data: Path):
    data.write_text(data.read_text() + "names: [person, sign\n")
    return [f"{data}:", "not valid YAML", "fix it"]


def _yaml_list(data: Path):
    data.write_text("- images/train\n- images/val\n")
    return [str(data), "top level is a list", "data_config.yaml"]


def _binary_config(data: Path):
    data.write_bytes(b"\xff\xfe\x00junk")
    return [str(data), "not valid YAML"]


def _quoted_channels(data: Path):
    data.write_text(data.read_text().replace("channels: 4", 'channels: "4"'))
    return [str(data), "channels: '4' is text", "without quotes: 4 (", "6 ("]


def _no_names(data: Path):
    data.write_text(data.read_text().split("names:")[0])
    return [str(data), "names:"]


def _no_val(data: Path):
    data.write_text(data.read_text().replace("val: images/val\n", ""))
    return [str(data), "'val:' is missing"]


def _split_not_a_path(data: Path):
    data.write_text(data.read_text().replace("train: images/train", "train: {a: 1}"))
    return [str(data), "'train: {'a': 1}' is not a folder or an image list"]


def _missing_image_list(data: Path):
    data.write_text(data.read_text().replace("train: images/train", "train: train.txt"))
    return [str(data), "image list", "train.txt does not exist"]


def _empty_folder(data: Path):
    (data.parent / "images" / "empty").mkdir()
    data.write_text(data.read_text().replace("val: images/val", "val: images/empty"))
    return [str(data.parent / "images" / "empty"), "no images found"]


def _image_outside_images(data: Path):
    elsewhere = touch_image(data.parent / "frames" / "x.jpg", np.zeros((32, 32, 3), np.uint8))
    (data.parent / "train.txt").write_text(f"{elsewhere}\n")
    data.write_text(data.read_text().replace("train: images/train", "train: train.txt"))
    return [str(elsewhere), "not inside an 'images/' folder"]


def _unreadable_first_rgb(data: Path):
    rgb = sorted((data.parent / "images" / "train").iterdir())[0]
    rgb.write_bytes(b"junk")
    return [str(rgb), "RGB image is missing or unreadable"]


def _sixteen_bit_first_ir(data: Path):
    ir = sorted((data.parent / "imagesIR" / "train").iterdir())[0]
    cv2.imwrite(str(ir), np.full((32, 32), 40000, np.uint16))
    return [str(ir), "8 bits"]


@pytest.mark.parametrize(
    "breaks",
    [
        _yaml_syntax_error,
        _yaml_list,
        _binary_config,
        _quoted_channels,
        _no_names,
        _no_val,
        _split_not_a_path,
        _missing_image_list,
        _empty_folder,
        _image_outside_images,
        _unreadable_first_rgb,
        _sixteen_bit_first_ir,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_every_check_dataset_error_is_one_line(demo_copy, breaks):
    """Each way check_dataset refuses a set (these, and the single-case tests above): a DatasetError whose whole
    message is the one line users see, naming the file."""
    expected = breaks(demo_copy)
    with pytest.raises(DatasetError) as e:
        check_dataset(demo_copy)
    assert_one_line_error(e, *expected)
