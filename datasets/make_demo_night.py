"""Deterministic synthetic night-scene dataset (RGB + IR) in the LLVIP/YOLOFuse layout.

The scenes are built so that *each modality alone misses a class*:

- ``person`` (0): warm and bright in IR, but only a few gray levels above the dark RGB background,
  well below the RGB sensor noise -> invisible to an RGB-only detector.
- ``sign`` (1): bright, saturated retro-reflective road sign in RGB, but at ambient temperature
  in IR (not drawn at all) -> invisible to an IR-only detector.
- ``car`` (2): visible in both (headlights/body in RGB, warm hood/wheels in IR).

Unlabeled distractors make the single-modality shortcuts ambiguous: street lamps (bright glowing
discs, RGB only) and warm non-person blobs (engine blocks, heated manholes, small animals; IR only).

Layout written under ``root``::

    images/{train,val}/NNNN.jpg     RGB frames (3-channel JPEG, quality 90)
    imagesIR/{train,val}/NNNN.png   IR frames (1-channel 8-bit PNG), paired by file stem
    labels/{train,val}/NNNN.txt     YOLO labels shared by both modalities

Regenerate with ``python datasets/make_demo_night.py [OUT_DIR]`` (default: ``demo_night`` beside this script).
A build tool for the committed demo data, not part of the training package: it needs only numpy and OpenCV.
"""

import sys
from pathlib import Path

import cv2
import numpy as np

W, H = 256, 192
CLASSES = ("person", "sign", "car")
JPEG_QUALITY = 90

# Sensor noise is drawn at reduced resolution and bilinearly upsampled (film-like grain; it also
# keeps the committed JPEG/PNG files small: the dataset is ~2 MB). Bilinear upsampling shrinks the
# per-pixel std to ~0.65x of the drawn sigma, so the effective per-pixel noise is RGB ~6 gray levels
# (+ a little chroma; ~7.5 measured around objects, with the background texture), IR ~0.8.
RGB_NOISE_SIGMA = 9.0  # drawn at half resolution
RGB_CHROMA_FRACTION = 0.15
IR_NOISE_SIGMA = 1.2  # drawn at quarter resolution (thermal imagers are blurry)
# A person only lifts the dark RGB background by this many gray levels: below the noise.
PERSON_RGB_DELTA = (1.5, 3.0)


# --------------------------------------------------------------------------- helpers


def _overlap(a, b):
    """(IoU, intersection over the smaller box's area) of two x0, y0, x1, y1 boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    if inter <= 0:
        return 0.0, 0.0
    area_a = (a[2] - a[0]) * (a[3] - a[1])
    area_b = (b[2] - b[0]) * (b[3] - b[1])
    return inter / (area_a + area_b - inter), inter / min(area_a, area_b)


MAX_IOU = 0.1  # placement is rejected above this IoU with any earlier object ...
MAX_COVER = 0.3  # ... or when it covers more than this of the smaller box (no sign painted on a car)


def _place(rng, w, h, boxes, y_range=(0.0, 1.0), tries=50):
    """Random w x h box fully inside the frame that overlaps no box in `boxes` heavily (else None)."""
    ymin = int(y_range[0] * (H - h))
    ymax = max(ymin, int(y_range[1] * (H - h)))
    for _ in range(tries):
        x0 = int(rng.integers(1, W - w - 1))
        y0 = int(rng.integers(max(1, ymin), max(2, min(ymax, H - h - 1))))
        box = (x0, y0, x0 + w, y0 + h)
        if all(iou <= MAX_IOU and cover <= MAX_COVER for iou, cover in (_overlap(box, b) for b in boxes)):
            return box
    return None


def _soft(mask, k):
    """Blur a float mask (soft edges); k is an odd kernel size."""
    return cv2.GaussianBlur(mask, (k, k), 0)


def _blend(img, mask, value):
    """img += mask * (value - img) for float images; `value` is scalar or per-channel."""
    if img.ndim == 3:
        m = mask[..., None]
        img += m * (np.asarray(value, np.float32)[None, None, :] - img)
    else:
        img += mask * (np.float32(value) - img)


# --------------------------------------------------------------------------- backgrounds


def _backgrounds(rng):
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)

    # RGB: very dark sky/buildings, slightly brighter road, low-frequency mottling (a few levels,
    # comparable to a person's RGB contrast so the latter cannot be found by averaging either).
    horizon = float(rng.uniform(0.40, 0.55)) * H
    rgb = np.full((H, W, 3), 14.0, np.float32)
    rgb += np.where(yy > horizon, 10.0 + 8.0 * (yy - horizon) / (H - horizon), 0.0)[..., None]
    for _ in range(int(rng.integers(2, 5))):  # dim building silhouettes above the horizon
        bw, bh = int(rng.integers(25, 70)), int(rng.integers(25, int(horizon) - 5))
        bx = int(rng.integers(0, W - bw))
        by = int(horizon) - bh
        rgb[by : int(horizon), bx : bx + bw] += float(rng.uniform(5, 12))
        for _ in range(int(rng.integers(0, 4))):  # a few dim lit windows
            wx = bx + int(rng.integers(2, max(3, bw - 6)))
            wy = by + int(rng.integers(2, max(3, bh - 6)))
            rgb[wy : wy + 4, wx : wx + 3] += np.array([6, 14, 18], np.float32) * rng.uniform(0.6, 1.2)
    # dashed lane marking on the road (dim)
    lane_y = int(horizon + (H - horizon) * rng.uniform(0.45, 0.7))
    for x0 in range(int(rng.integers(0, 20)), W, 32):
        rgb[lane_y : lane_y + 2, x0 : x0 + 14] += 8.0
    mott = cv2.resize(rng.normal(0, 1, (6, 8)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    rgb += 3.0 * mott[..., None]

    # IR: smooth gradient (warm road near the camera), large soft temperature blobs.
    g0, g1 = rng.uniform(60, 75), rng.uniform(80, 100)
    ir = g0 + (g1 - g0) * (yy / (H - 1))
    ir += float(rng.uniform(-8, 8)) * (xx / (W - 1) - 0.5)
    low = cv2.resize(rng.normal(0, 1, (4, 5)).astype(np.float32), (W, H), interpolation=cv2.INTER_CUBIC)
    ir += 5.0 * low
    # buildings are slightly cooler than the sky-facing road, with soft edges
    cool = np.zeros((H, W), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        bw, bh = int(rng.integers(30, 80)), int(rng.integers(20, 70))
        bx, by = int(rng.integers(0, W - bw)), int(rng.integers(0, max(1, int(horizon) - 10)))
        cool[by : by + bh, bx : bx + bw] = 1.0
    ir -= 6.0 * _soft(cool, 9)
    return rgb, ir.astype(np.float32)


# --------------------------------------------------------------------------- objects


def _person(rng, rgb, ir, boxes):
    ph = int(rng.integers(35, 71))
    pw = min(int(rng.integers(14, 25)), max(14, int(ph * 0.45)))  # upright: at most ~0.45 w/h
    box = _place(rng, pw, ph, boxes, y_range=(0.25, 1.0))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    cx = (x0 + x1) / 2.0
    head_r = max(3, int(round(pw * 0.28)))
    mask = np.zeros((H, W), np.float32)
    cv2.circle(mask, (int(round(cx)), y0 + head_r), head_r, 1.0, -1, cv2.LINE_AA)
    body_top = y0 + 2 * head_r
    body_h = (y1 - body_top) / 2.0
    cv2.ellipse(
        mask,
        (int(round(cx)), int(round(body_top + body_h))),
        (max(3, pw // 2), max(5, int(body_h))),
        0,
        0,
        360,
        1.0,
        -1,
        cv2.LINE_AA,
    )
    soft = _soft(mask, 5)
    # RGB: a few gray levels, i.e. below the sensor noise (sigma RGB_NOISE_SIGMA)
    rgb += soft[..., None] * float(rng.uniform(*PERSON_RGB_DELTA))
    # IR: warm body, hotter head
    t_body = float(rng.uniform(200, 235))
    _blend(ir, soft, t_body)
    head = np.zeros((H, W), np.float32)
    cv2.circle(head, (int(round(cx)), y0 + head_r), max(2, head_r - 1), 1.0, -1, cv2.LINE_AA)
    _blend(ir, _soft(head, 3), min(255.0, t_body + float(rng.uniform(10, 25))))
    return box


def _sign(rng, rgb, ir, boxes):
    s = int(rng.integers(16, 31))
    diamond = bool(rng.integers(0, 2))
    sw, sh = (s, s) if diamond else (s, int(s * rng.uniform(0.65, 0.9)))
    box = _place(rng, sw, sh, boxes, y_range=(0.05, 0.75))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    fill = [(0, 215, 255), (245, 245, 245), (40, 200, 255), (60, 200, 60)][int(rng.integers(0, 4))]  # BGR
    fill = np.array(fill, np.float32) * rng.uniform(0.85, 1.0)
    border = np.array((20, 20, 20), np.float32) if fill.mean() > 150 else np.array((230, 230, 230), np.float32)
    outer = np.zeros((H, W), np.float32)
    inner = np.zeros((H, W), np.float32)
    b = max(2, s // 8)
    if diamond:
        cx, cy = (x0 + x1 - 1) / 2.0, (y0 + y1 - 1) / 2.0
        r = (s - 1) / 2.0

        def poly(rr):
            return np.array([[cx, cy - rr], [cx + rr, cy], [cx, cy + rr], [cx - rr, cy]], np.int32)

        cv2.fillConvexPoly(outer, poly(r), 1.0, cv2.LINE_AA)
        cv2.fillConvexPoly(inner, poly(r - b * 1.4), 1.0, cv2.LINE_AA)
    else:
        cv2.rectangle(outer, (x0, y0), (x1 - 1, y1 - 1), 1.0, -1)
        cv2.rectangle(inner, (x0 + b, y0 + b), (x1 - 1 - b, y1 - 1 - b), 1.0, -1)
    _blend(rgb, outer, border)
    _blend(rgb, inner, fill)
    # IR: ambient temperature, i.e. nothing is drawn.
    return box


def _car(rng, rgb, ir, boxes):
    cw = int(rng.integers(40, 81))
    ch = int(cw * rng.uniform(0.45, 0.6))
    box = _place(rng, cw, ch, boxes, y_range=(0.45, 1.0))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    facing = bool(rng.integers(0, 2))  # True: headlights (front), False: tail lights (rear)
    body = np.zeros((H, W), np.float32)
    cabin_h = int(ch * 0.4)
    cv2.rectangle(body, (x0, y0 + cabin_h), (x1 - 1, y1 - 4), 1.0, -1)
    cv2.rectangle(body, (x0 + cw // 5, y0), (x1 - 1 - cw // 5, y0 + cabin_h), 1.0, -1)
    wheels = np.zeros((H, W), np.float32)
    wr = max(3, ch // 6)
    for wx in (x0 + wr + 2, x1 - wr - 3):
        cv2.circle(wheels, (wx, y1 - wr - 1), wr, 1.0, -1, cv2.LINE_AA)
    body_col = np.array([rng.uniform(40, 90) for _ in range(3)], np.float32)
    _blend(rgb, _soft(body, 3), body_col)
    _blend(rgb, wheels, (15, 15, 15))
    # windows: slightly lighter band in the cabin
    win = np.zeros((H, W), np.float32)
    cv2.rectangle(win, (x0 + cw // 5 + 2, y0 + 2), (x1 - 3 - cw // 5, y0 + cabin_h - 1), 1.0, -1)
    _blend(rgb, win, body_col * 0.6 + 15)
    lr = max(2, cw // 14)
    ly = y0 + cabin_h + max(2, ch // 8)
    lights = np.zeros((H, W), np.float32)
    for lx in (x0 + lr + 2, x1 - lr - 3):
        cv2.circle(lights, (lx, ly), lr, 1.0, -1, cv2.LINE_AA)
    if facing:
        _blend(rgb, np.clip(_soft(lights, 9) * 1.8, 0, 1), (200, 235, 255))
        _blend(rgb, lights, (245, 252, 255))
    else:
        _blend(rgb, np.clip(_soft(lights, 7) * 1.5, 0, 1), (30, 30, 220))
    # IR: warm body, hot hood/engine (front) or exhaust (rear), warm tires
    _blend(ir, _soft(body, 5), float(rng.uniform(120, 150)))
    hot = np.zeros((H, W), np.float32)
    if facing:
        cv2.rectangle(hot, (x0 + 3, y0 + cabin_h + 2), (x1 - 4, y1 - 6), 1.0, -1)
    else:
        cv2.ellipse(hot, (x0 + cw // 4, y1 - 5), (max(3, cw // 10), 3), 0, 0, 360, 1.0, -1)
    _blend(ir, _soft(hot, 7), float(rng.uniform(185, 225)))
    _blend(ir, _soft(wheels, 3), float(rng.uniform(160, 190)))
    return box


def _lamp(rng, rgb, ir, boxes):
    """RGB distractor: street lamp (glowing disc with halo on a dim pole). Unlabeled."""
    r = int(rng.integers(4, 9))
    pole_h = int(rng.integers(15, 60)) if rng.random() < 0.75 else 0
    bw, bh = 4 * r, 4 * r + pole_h
    box = _place(rng, bw, min(bh, H - 4), boxes, y_range=(0.0, 0.8))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) // 2, y0 + 2 * r
    if pole_h:
        cv2.line(rgb, (cx, cy + r), (cx, y1 - 1), (32, 32, 32), 2)
    halo = np.zeros((H, W), np.float32)
    cv2.circle(halo, (cx, cy), 2 * r, 1.0, -1, cv2.LINE_AA)
    _blend(rgb, _soft(halo, 2 * (2 * r) + 1) * 0.8, (120, 200, 240))
    disc = np.zeros((H, W), np.float32)
    cv2.circle(disc, (cx, cy), r, 1.0, -1, cv2.LINE_AA)
    _blend(rgb, _soft(disc, 3), (215, 245, 255))
    return box


def _warm_blob(rng, rgb, ir, boxes):
    """IR distractor: warm thing that is not a person (wide, not upright). Unlabeled."""
    kind = int(rng.integers(0, 3))
    if kind == 0:  # engine block / generator / heated box: wide rectangle
        bw, bh = int(rng.integers(20, 40)), int(rng.integers(10, 18))
    elif kind == 1:  # heated manhole: flat ellipse on the road
        bw, bh = int(rng.integers(18, 34)), int(rng.integers(6, 11))
    else:  # small animal: small horizontal oval with a little head
        bw, bh = int(rng.integers(10, 18)), int(rng.integers(6, 10))
    box = _place(rng, bw, bh, boxes, y_range=(0.35, 1.0))
    if box is None:
        return None
    x0, y0, x1, y1 = box
    m = np.zeros((H, W), np.float32)
    if kind == 0:
        cv2.rectangle(m, (x0, y0), (x1 - 1, y1 - 1), 1.0, -1)
    elif kind == 1:
        cv2.ellipse(m, ((x0 + x1) // 2, (y0 + y1) // 2), (bw // 2, bh // 2), 0, 0, 360, 1.0, -1, cv2.LINE_AA)
    else:
        cv2.ellipse(
            m, (x0 + bw * 2 // 5, (y0 + y1) // 2 + 1), (bw * 2 // 5, bh // 2 - 1), 0, 0, 360, 1.0, -1, cv2.LINE_AA
        )
        cv2.circle(m, (x1 - 3, y0 + 3), 3, 1.0, -1, cv2.LINE_AA)
    _blend(ir, _soft(m, 5), float(rng.uniform(175, 245)))
    return box


# --------------------------------------------------------------------------- frames


def _grain(rng, sigma, channels, scale=2):
    """Gaussian noise drawn at 1/scale resolution, bilinearly upsampled to (H, W[, channels])."""
    shape = (H // scale, W // scale) + ((channels,) if channels else ())
    n = cv2.resize(rng.normal(0, sigma, shape).astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    return n.reshape(H, W, channels) if channels else n


def _frame(rng):
    """One (rgb_uint8_bgr, ir_uint8, labels) triple; labels are (cls, x0, y0, x1, y1) pixel boxes."""
    rgb, ir = _backgrounds(rng)
    boxes, labels = [], []

    def add(fn, n, cls=None):
        for _ in range(n):
            box = fn(rng, rgb, ir, boxes)
            if box is not None:
                boxes.append(box)
                if cls is not None:
                    labels.append((cls,) + tuple(box))

    # cars first (largest), then signs, persons; distractors last so they fill gaps
    add(_car, int(rng.integers(0, 3)), 2)
    add(_sign, int(rng.integers(0, 3)), 1)
    n_person = int(rng.integers(1, 5))
    add(_person, n_person, 0)
    if not any(lb[0] == 0 for lb in labels):  # guarantee >= 1 person
        for _ in range(20):
            before = len(labels)
            add(_person, 1, 0)
            if len(labels) > before:
                break
    add(_lamp, int(rng.integers(1, 4)))
    add(_warm_blob, int(rng.integers(1, 4)))

    # sensor noise (see the constants at the top)
    rgb += _grain(rng, RGB_NOISE_SIGMA, 1) + _grain(rng, RGB_NOISE_SIGMA * RGB_CHROMA_FRACTION, 3)
    ir += _grain(rng, IR_NOISE_SIGMA, 0, scale=4)
    rgb8 = np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    ir8 = np.clip(np.rint(ir), 0, 255).astype(np.uint8)
    return rgb8, ir8, labels


def _label_text(labels):
    lines = []
    for cls, x0, y0, x1, y1 in labels:
        cx, cy = (x0 + x1) / 2.0 / W, (y0 + y1) / 2.0 / H
        w, h = (x1 - x0) / W, (y1 - y0) / H
        lines.append(f"{cls} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return "\n".join(lines) + ("\n" if lines else "")


DEFAULT_ROOT = Path(__file__).resolve().parent / "demo_night"


def make_demo(root=DEFAULT_ROOT, n_train=64, n_val=32, seed=0):
    """Write the synthetic RGB+IR night dataset under `root`; returns `root` as a Path.

    Deterministic: the same (n_train, n_val, seed) gives identical pixels and label files.
    Every class is guaranteed to appear in each split (frames are regenerated from the same
    stream until it does, which is itself deterministic).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        for sub in ("images", "imagesIR", "labels"):
            d = root / sub / split
            d.mkdir(parents=True, exist_ok=True)
            for old in d.iterdir():  # drop stale frames from a previous, larger run
                if old.is_file() and old.suffix in (".jpg", ".png", ".txt"):
                    old.unlink()
        frames = [_frame(rng) for _ in range(n)]
        for attempt in range(100):
            seen = {lb[0] for f in frames for lb in f[2]}
            if seen >= set(range(len(CLASSES))) or n < len(CLASSES):
                break
            frames[attempt % n] = _frame(rng)
        for i, (rgb8, ir8, labels) in enumerate(frames):
            stem = f"{i:04d}"
            jpeg_args = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_OPTIMIZE, 1]
            cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), rgb8, jpeg_args)
            cv2.imwrite(str(root / "imagesIR" / split / f"{stem}.png"), ir8, [cv2.IMWRITE_PNG_COMPRESSION, 9])
            (root / "labels" / split / f"{stem}.txt").write_text(_label_text(labels))
    return root


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = argv[0] if argv else DEFAULT_ROOT
    root = make_demo(out)
    n = {s: len(list((root / "labels" / s).glob("*.txt"))) for s in ("train", "val")}
    print(f"wrote {root}: {n['train']} train / {n['val']} val pairs, classes {list(CLASSES)}")


if __name__ == "__main__":
    main()
