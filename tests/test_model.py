"""The dual-stream models, the Modality layer, a real (tiny) training run, a fresh-process predict, and offline use.

CPU only, no network: the training run is 2 epochs on 8 demo pairs at imgsz 64 (about 10 s).
"""

import json
import math
import os
import subprocess
import sys
import threading
from copy import copy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, make_dataset, refuse_network
from ultralytics.nn import tasks
from ultralytics.utils.torch_utils import get_flops

import yolofuse
from yolofuse.engine import FuseDetectionModel, FuseTrainer, FuseValidator, side_by_side
from yolofuse.nn import Modality

MID = ROOT / "yolov8n-fuse.yaml"
EARLY = ROOT / "models" / "yolov8n-fuse-early.yaml"
RGB_CONV, IR_CONV = 2, 13  # first conv of each stream in yolov8n-fuse.yaml


def first_conv(model) -> torch.nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def tensors(out):
    """All tensors of a model output (tensor, tuple/list or dict, nested)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in tensors(o)] if isinstance(out, (list, tuple)) else []


# ---------------------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("cfg", [MID, EARLY], ids=["mid", "early"])
def test_yaml_builds_through_yolo_with_four_channels(cfg):
    model = yolofuse.YOLO(str(cfg))
    assert isinstance(model.model, FuseDetectionModel)
    assert model.model.yaml["channels"] == 4
    assert first_conv(model.model).in_channels == 4
    assert get_flops(model.model, 640) > 0, "GFLOPs must be measurable (a wrong input-channel guess gives 0)"
    model.model.eval()
    with torch.no_grad():
        y = model.model(torch.zeros(1, 4, 128, 128))
    y = y[0] if isinstance(y, (tuple, list)) else y
    assert y.shape == (1, 4 + 80, 16 * 16 + 8 * 8 + 4 * 4)


@pytest.mark.parametrize("cfg, params, gflops", [(MID, 4.46, 11.8), (EARLY, 3.01, 8.2)], ids=["mid", "early"])
def test_model_size_is_as_documented(cfg, params, gflops):
    """The figures in docs/models.md: parameters and GFLOPs at 640 of each architecture with the demo's 3 classes."""
    model = FuseDetectionModel(str(cfg), ch=4, nc=3, verbose=False)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == params
    assert round(get_flops(model, 640), 1) == gflops


@pytest.mark.parametrize("cfg", [MID, EARLY], ids=["mid", "early"])
def test_six_channel_build_and_forward(cfg):
    model = FuseDetectionModel(str(cfg), ch=6, nc=3, verbose=False).eval()
    assert model.yaml["channels"] == 6 and first_conv(model).in_channels == 6
    assert get_flops(model, 640) > 0
    with torch.no_grad():
        y = model(torch.zeros(1, 6, 128, 128))
    y = y[0] if isinstance(y, (tuple, list)) else y
    assert y.shape == (1, 4 + 3, 336)
    assert torch.isfinite(y).all()


def rel_change(a, b) -> float:
    """Largest relative change over all output tensors (train-mode outputs: raw box, class and feature maps)."""
    return max(((p - q).abs().max() / p.abs().max().clamp_min(1e-12)).item() for p, q in zip(tensors(a), tensors(b)))


@pytest.mark.parametrize("ch", [4, 6])
@pytest.mark.parametrize("cfg", [MID, EARLY], ids=["mid", "early"])
def test_both_modalities_change_the_output(cfg, ch):
    torch.manual_seed(0)
    # Train mode: BatchNorm uses batch statistics, so an untrained net passes signals on at full strength
    # (with fresh running stats, eval-mode activations shrink layer after layer to ~1e-7).
    model = FuseDetectionModel(str(cfg), ch=ch, nc=3, verbose=False).train()
    x = torch.rand(2, ch, 128, 128)
    no_ir, no_rgb = x.clone(), x.clone()
    no_ir[:, 3:] = 0
    no_rgb[:, :3] = 0
    with torch.no_grad():
        out, out_no_ir, out_no_rgb = (model(t) for t in (x, no_ir, no_rgb))
        again = model(x)
    assert rel_change(out, again) == 0, "forward must be deterministic for this comparison to mean anything"
    assert rel_change(out, out_no_ir) > 0.05, "the IR channels are ignored"
    assert rel_change(out, out_no_rgb) > 0.05, "the RGB channels are ignored"


def test_mid_fusion_has_two_separate_streams():
    model = FuseDetectionModel(str(MID), ch=4, nc=3, verbose=False)
    layers = model.model
    assert isinstance(layers[1], Modality) and layers[1].modality == "rgb"
    assert isinstance(layers[12], Modality) and layers[12].modality == "ir"
    rgb_conv, ir_conv = layers[RGB_CONV].conv, layers[IR_CONV].conv
    assert rgb_conv.in_channels == ir_conv.in_channels == 4
    assert rgb_conv.weight.data_ptr() != ir_conv.weight.data_ptr()
    # Each stream's first conv only learns from its own modality: no gradient through the zeroed channels.
    model.train()
    loss = sum(t.float().sum() for t in tensors(model(torch.rand(2, 4, 64, 64))))
    loss.backward()
    assert rgb_conv.weight.grad[:, 3:].abs().sum() == 0 and rgb_conv.weight.grad[:, :3].abs().sum() > 0
    assert ir_conv.weight.grad[:, :3].abs().sum() == 0 and ir_conv.weight.grad[:, 3:].abs().sum() > 0


# -------------------------------------------------------------------------------------------------------- Modality
@pytest.mark.parametrize("ch", [4, 6])
def test_modality_layer(ch):
    x = torch.rand(2, ch, 5, 7) + 0.5
    rgb, ir = Modality("rgb")(x), Modality("ir")(x)
    assert rgb.shape == ir.shape == x.shape
    assert torch.equal(rgb[:, :3], x[:, :3]) and (rgb[:, 3:] == 0).all()
    assert torch.equal(ir[:, 3:], x[:, 3:]) and (ir[:, :3] == 0).all()
    assert torch.equal(rgb + ir, x)
    assert Modality().modality == "rgb"
    with pytest.raises(ValueError, match="thermal"):
        Modality("thermal")
    assert tasks.Modality is Modality, "registered where parse_model looks layers up"


# ------------------------------------------------------------------------------------------------ side-by-side plots
@pytest.mark.parametrize("ch", [4, 6])
def test_side_by_side_doubles_width_and_boxes(ch):
    img = torch.rand(2, ch, 8, 10)
    batch = {
        "img": img,
        "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.4], [0.1, 0.2, 0.1, 0.1], [0.9, 0.8, 0.2, 0.2]]),
        "cls": torch.tensor([[0.0], [1.0], [2.0]]),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
        "im_file": ["a.jpg", "b.jpg"],
    }
    original = {k: v.clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    wide = side_by_side(batch)
    assert wide["img"].shape == (2, 3, 8, 20)
    assert torch.equal(wide["img"][..., :10], img[:, :3])
    ir = img[:, 3:].expand(-1, 3, -1, -1) if ch == 4 else img[:, 3:]
    assert torch.equal(wide["img"][..., 10:], ir)
    b = original["bboxes"]
    left, right = wide["bboxes"][:3], wide["bboxes"][3:]
    assert torch.allclose(left, torch.stack([b[:, 0] / 2, b[:, 1], b[:, 2] / 2, b[:, 3]], 1))
    assert torch.allclose(right, left + torch.tensor([0.5, 0, 0, 0]))
    assert torch.equal(wide["cls"], torch.cat([original["cls"]] * 2))
    assert torch.equal(wide["batch_idx"], torch.cat([original["batch_idx"]] * 2))
    assert wide["im_file"] == ["a.jpg", "b.jpg"]
    for k, v in original.items():
        assert torch.equal(batch[k], v), f"side_by_side modified the batch's {k}"


# ------------------------------------------------------------------------------------------ training and prediction
PREDICT = """
import json, sys
from yolofuse import YOLO
best, rgb, orphan = sys.argv[1:4]
model = YOLO(best)
# conf 0.001: a 2-epoch model's confidences are about 0.004 (its boxes span the frame; test_export.py's better-trained
# model checks that predictions follow the IR frame)
r = model.predict(rgb, imgsz=64, device="cpu", verbose=False, conf=0.001)
out = {"n": len(r), "shape": list(r[0].orig_img.shape), "predictor": type(model.predictor).__name__,
       "channels": model.model.yaml.get("channels"), "boxes": r[0].boxes.data.tolist()}
try:
    model.predict(orphan, imgsz=64, device="cpu", verbose=False)
    out["orphan_error"] = None
except Exception as e:
    out["orphan_error"] = type(e).__name__ + ": " + str(e)
print("RESULT " + json.dumps(out))
"""
LABEL_ROWS = 26  # Ultralytics writes each tile's file name along its top, in an 18-px font
PLOTTED = {}  # plot file name -> the batch (and predictions) it was drawn from, kept by the classes below


def wait_for_plots():
    """Ultralytics writes plots on background threads: wait for them before reading the files."""
    for thread in threading.enumerate():
        if thread.name.endswith("(plot_images)"):  # Python names a thread after its target
            thread.join(timeout=60)


def keep(batch: dict) -> dict:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class PlotKeepingValidator(FuseValidator):
    def plot_val_samples(self, batch, ni):
        PLOTTED[f"val_batch{ni}_labels"] = keep(batch)
        super().plot_val_samples(batch, ni)

    def plot_predictions(self, batch, preds, ni, max_det=None):
        PLOTTED[f"val_batch{ni}_pred"] = keep(batch), [keep(p) for p in preds]
        super().plot_predictions(batch, preds, ni, max_det)


class PlotKeepingTrainer(FuseTrainer):
    """FuseTrainer that keeps each batch it plots, so the plot files' pixels can be checked against it."""

    def plot_training_samples(self, batch, ni):
        PLOTTED[f"train_batch{ni}"] = keep(batch)
        super().plot_training_samples(batch, ni)

    def get_validator(self):
        return PlotKeepingValidator(
            self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One 2-epoch run on a tiny copy of the demo data, with every network attempt recorded (and refused)."""
    tmp = tmp_path_factory.mktemp("train")
    data = make_dataset(tmp / "data", n_train=8, n_val=4)
    mp = pytest.MonkeyPatch()
    attempts = refuse_network(mp)
    try:
        yolofuse.YOLO(str(MID)).train(
            trainer=PlotKeepingTrainer,
            data=str(data),
            epochs=2,
            imgsz=64,
            batch=4,
            nbs=4,
            workers=0,
            device="cpu",
            save_dir=str(tmp / "run"),
            plots=True,
            exist_ok=True,
        )
    finally:
        mp.undo()
    wait_for_plots()
    return tmp, data, attempts


def test_training_writes_best_and_never_touches_network(trained):
    tmp, _, attempts = trained
    run = tmp / "run"
    assert (run / "weights" / "best.pt").is_file() and (run / "weights" / "last.pt").is_file()
    assert len((run / "results.csv").read_text().strip().splitlines()) == 1 + 2  # header + 2 epochs
    assert attempts == [], f"training tried to reach the network: {attempts}"


def tile_boxes(boxes: torch.Tensor, h: int, w: int) -> np.ndarray:
    """x1 y1 x2 y2 in a tile's pixels, from normalized xywh (labels) or pixel xyxy (predictions)."""
    boxes = boxes.numpy().copy()
    if boxes.size and boxes.max() <= 1.1:
        boxes *= [w, h, w, h]
        return np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2], 1)
    return boxes


def assert_plot_shows_pairs(file: Path, img: torch.Tensor, boxes: list[np.ndarray]):
    """Each tile of Ultralytics' plot grid is RGB | IR of one image of `img` (the batch, N x C x h x w), and each
    box (x1 y1 x2 y2 in the image's pixels) is drawn at the same place on both halves."""
    plot = cv2.imread(str(file))[..., ::-1].astype(int)  # plotted in RGB
    n, _, h, w = img.shape
    ns = math.ceil(n**0.5)
    assert plot.shape[:2] == (ns * h, ns * 2 * w), plot.shape
    frames = (img * 255).round().int().permute(0, 2, 3, 1).numpy()
    told_apart = edges = 0  # images whose RGB and IR differ enough to tell the halves apart; box edges checked
    for i in range(n):
        x, y = 2 * w * (i // ns), h * (i % ns)  # the grid fills columns first
        rgb, ir = frames[i, ..., :3], frames[i, ..., 3:]
        ir = np.repeat(ir, 3, axis=2) if ir.shape[2] == 1 else ir
        left, right = plot[y : y + h, x : x + w], plot[y : y + h, x + w : x + 2 * w]
        off_left, off_right = np.abs(left - rgb).max(2), np.abs(right - ir).max(2)  # > 40: drawn on (or JPEG)
        # Pixels where IR and RGB differ (a pedestrian in IR, a sign in RGB), away from what is drawn on the left half
        # and from the file-name label along the top: there the right half must show IR, not RGB.
        drawn = cv2.dilate((off_left > 40).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        drawn[:LABEL_ROWS] = True
        differ = (np.abs(ir - rgb).max(2) > 40) & ~drawn
        if differ.sum() >= 30:
            told_apart += 1
            assert np.median(off_right[differ]) < 16, f"{file.name}, image {i}: the right half is not the IR frame"
            assert np.median(np.abs(right - rgb).max(2)[differ]) > 40, f"{file.name}, image {i}: right half is RGB"
        for x1, y1, x2, y2 in boxes[i].round().astype(int):
            rows = np.arange(max(y1, LABEL_ROWS) + 2, min(y2, h - 3) - 2)  # off the labels and the tile border
            if not 3 <= x1 < w - 3 or len(rows) < 3:
                continue
            edges += 1
            for half, off in (("left", off_left), ("right", off_right)):
                seen = (off[rows, x1 : x1 + 2] > 40).any(1).mean()  # the box's left edge, 2 px wide
                assert seen > 0.5, f"{file.name}, image {i}: box {(x1, y1, x2, y2)} is not drawn on the {half} half"
    assert told_apart, f"{file.name}: RGB and IR look alike in every image, so the halves cannot be told apart"
    assert edges or not sum(map(len, boxes)), f"{file.name}: no box large enough to check"


def test_training_and_val_plots_show_rgb_and_ir_with_each_box_on_both(trained, tmp_path):
    tmp, _, _ = trained
    run = tmp / "run"
    batch = PLOTTED["train_batch0"]  # 4 mosaic images of 64 x 64, tiles of 64 x 128
    h, w = batch["img"].shape[2:]
    boxes = [tile_boxes(batch["bboxes"][batch["batch_idx"] == i], h, w) for i in range(len(batch["img"]))]
    assert sum(map(len, boxes)), "no labelled boxes in the batch: nothing to check"
    assert_plot_shows_pairs(run / "train_batch0.jpg", batch["img"], boxes)

    batch = PLOTTED["val_batch0_labels"]  # 4 val frames letterboxed into a 64 x 96 rect batch
    h, w = batch["img"].shape[2:]
    boxes = [tile_boxes(batch["bboxes"][batch["batch_idx"] == i], h, w) for i in range(len(batch["img"]))]
    assert_plot_shows_pairs(run / "val_batch0_labels.jpg", batch["img"], boxes)

    batch, preds = PLOTTED["val_batch0_pred"]
    # A 2-epoch model's predictions are all under the plot's 0.25 threshold: the frames are checked, and the boxes
    # below with confident predictions (the labels), drawn by the same validator.
    assert all((p["conf"] < 0.25).all() for p in preds)
    assert_plot_shows_pairs(run / "val_batch0_pred.jpg", batch["img"], [np.zeros((0, 4))] * len(batch["img"]))
    validator = FuseValidator(save_dir=tmp_path)
    validator.names = {0: "person", 1: "sign", 2: "car"}
    confident = [
        {"bboxes": torch.tensor(b, dtype=torch.float32), "conf": torch.full((len(b),), 0.9), "cls": c}
        for b, c in zip(
            (tile_boxes(batch["bboxes"][batch["batch_idx"] == i], h, w) for i in range(len(batch["img"]))),
            (batch["cls"][batch["batch_idx"] == i].view(-1) for i in range(len(batch["img"]))),
        )
    ]
    validator.plot_predictions(batch, confident, 0)
    wait_for_plots()
    assert_plot_shows_pairs(tmp_path / "val_batch0_pred.jpg", batch["img"], [p["bboxes"].numpy() for p in confident])


def test_best_pt_predicts_in_fresh_process(trained, tmp_path):
    tmp, data, _ = trained
    rgb = sorted((data.parent / "images" / "val").glob("*.jpg"))[0]
    # An RGB frame whose IR partner is gone.
    orphan = tmp_path / "o" / "images" / "val" / rgb.name
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(rgb.read_bytes())
    (tmp_path / "o" / "imagesIR" / "val").mkdir(parents=True)

    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_OFFLINE")}
    env["PYTHONPATH"] = str(ROOT)  # importable, but run from elsewhere: nothing depends on the working directory
    proc = subprocess.run(
        [sys.executable, "-c", PREDICT, str(tmp / "run" / "weights" / "best.pt"), str(rgb), str(orphan)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT ") :])
    assert out["predictor"] == "FusePredictor" and out["channels"] == 4
    assert out["n"] == 1
    h, w = cv2.imread(str(rgb)).shape[:2]
    assert out["shape"] == [h, w, 3]
    boxes = np.array(out["boxes"])  # x1 y1 x2 y2 conf cls, in the RGB frame's pixels
    assert len(boxes) and ((boxes[:, 4] >= 0.001) & (boxes[:, 4] <= 1)).all()
    assert (boxes[:, :4] >= 0).all() and (boxes[:, [0, 2]] <= w).all() and (boxes[:, [1, 3]] <= h).all()
    assert boxes[:, 2].max() > 64, "boxes must be in the original frame's pixels, not the 64-px model input's"
    missing_ir = tmp_path / "o" / "imagesIR" / "val" / f"{rgb.stem}.*"  # any image suffix
    assert out["orphan_error"] and out["orphan_error"].startswith("DatasetError")
    assert str(missing_ir) in out["orphan_error"]


# ---------------------------------------------------------------------------------------------------------- offline
def test_import_sets_offline():
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert os.environ["YOLO_AUTOINSTALL"] == "false"
    from ultralytics.utils import ONLINE, is_online

    assert not ONLINE and not is_online()


def test_fonts_are_local(no_network):
    from ultralytics.utils import USER_CONFIG_DIR
    from ultralytics.utils.checks import check_font

    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        font = check_font(name)
        assert font is not None and Path(font).is_file()
        assert Path(font).parent == Path(USER_CONFIG_DIR)
    assert no_network == [], f"check_font tried the network: {no_network}"


def test_import_offline_in_fresh_process(tmp_path):
    """A fresh interpreter: importing yolofuse before ultralytics makes Ultralytics see itself offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL")}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import os, yolofuse; from ultralytics.utils import ONLINE; from ultralytics.utils.checks import check_font;"
        "print(os.environ['YOLO_OFFLINE'], ONLINE, check_font('Arial.ttf'))"
    )
    cmd = [sys.executable, "-c", code]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    offline, online, font = proc.stdout.split()[-3:]
    assert offline == "1" and online == "False" and Path(font).is_file()
