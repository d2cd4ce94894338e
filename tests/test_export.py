"""Using the trained model outside training: export, then paired predict and val on each format.

CPU only, offline. The 4-channel model is conftest's `trained` (13 epochs at imgsz 64: predictions that depend on
the input, so parity and IR checks on it can fail). The 6-channel model is made from it by spreading the IR weights
of each stream's first conv over three channels: on gray IR saved as 3 channels it must predict what the 4-channel
model predicts. The YOLO26n made RGB+IR (mid fusion, NMS-free end-to-end head) is conftest's `trained26`, trained the
same way. All are exported to TorchScript and ONNX.
"""

import copy
import logging
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from conftest import make_dataset, write_video
from ultralytics.nn.backends.base import BaseBackend
from ultralytics.utils import LOGGER

from yolofuse import YOLO, DatasetError, sensors
from yolofuse.data import ir_path
from yolofuse.engine import PairResults

IMGSZ = 64
CONF = 0.01  # a few boxes per image, each well above the threshold
FORMATS = ("pt", "torchscript", "onnx")
FRAMES = 6  # length of the paired test video


def export(pt: Path, data: Path, channels: int) -> SimpleNamespace:
    model = YOLO(str(pt))
    weights = {"pt": pt, "torchscript": Path(model.export(format="torchscript", imgsz=IMGSZ))}
    # onnxslim is optional (not in requirements): simplify=False exports without it and without a warning.
    weights["onnx"] = Path(model.export(format="onnx", imgsz=IMGSZ, simplify=False))
    images = sorted((data.parent / "images" / "val").glob("*.jpg"))
    return SimpleNamespace(data=data, weights=weights, images=images, channels=channels)


@pytest.fixture(scope="module")
def four(trained):
    return export(trained.pt, trained.data, 4)


@pytest.fixture(scope="module")
def four26(trained26):
    return export(trained26.pt, trained26.data, 4)


@pytest.fixture(scope="module")
def six(four, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("six")
    data = make_dataset(tmp / "data", n_train=0, n_val=4, channels=6)
    for ir in (tmp / "data" / "imagesIR").rglob("*.png"):  # LLVIP-style IR: gray frames saved as 3 channels
        cv2.imwrite(str(ir), cv2.cvtColor(cv2.imread(str(ir), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR))
    ckpt = torch.load(four.weights["pt"], map_location="cpu", weights_only=False)
    model = copy.deepcopy(ckpt["model"]).float()
    for conv in (m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels == 4):
        w = conv.weight.data
        conv.weight = torch.nn.Parameter(torch.cat([w[:, :3], w[:, 3:].repeat(1, 3, 1, 1) / 3], 1))
        conv.in_channels = 6
    model.yaml["channels"] = 6
    torch.save({**ckpt, "model": model}, tmp / "best6.pt")
    return export(tmp / "best6.pt", data, 6)


def paired_video(models, root: Path, ir_frames: int = FRAMES) -> Path:
    """images/clip.avi and imagesIR/clip.avi from the val pairs, as a camera pair would record them."""
    rgb = [cv2.imread(str(p)) for p in models.images]
    ir = [cv2.imread(str(ir_path(p))) for p in models.images]
    write_video(root / "imagesIR" / "clip.avi", [ir[k % len(ir)] for k in range(ir_frames)])
    return write_video(root / "images" / "clip.avi", [rgb[k % len(rgb)] for k in range(FRAMES)])


def predict(weights, source, **kwargs):
    return YOLO(str(weights)).predict(source, imgsz=IMGSZ, conf=CONF, verbose=False, **kwargs)


def assert_rows_found(expected, got, tol, what, rtol=1e-3):
    """Each row (class, 4 coordinates, conf) of `expected` has one of the same class in `got` within `tol` in every
    coordinate and `rtol` in confidence (the order of near-equal confidences may differ between formats)."""
    for row in expected:
        same = got[got[:, 0] == row[0]]
        assert len(same), f"{what}: no class {int(row[0])} box"
        gap = np.abs(same[:, 1:5] - row[1:5]).max(1)
        assert gap.min() <= tol, f"{what}: box {row[1:5].tolist()} is {gap.min():.3g} away"
        close = same[gap <= tol, 5]  # weak boxes of one class can overlap: any of them may be this one
        assert (np.abs(close - row[5]) <= rtol * row[5]).any(), f"{what}: conf {close.tolist()} vs {row[5]}"


def assert_same_boxes(expected, got, what):
    """Same number of boxes per image, each within 1 px and 0.1% confidence of one of the same class."""
    assert len(expected) == len(got), what
    for k, (a, b) in enumerate(zip(expected, got)):
        a, b = (r.boxes.data.numpy()[:, [5, 0, 1, 2, 3, 4]] for r in (a, b))  # class, x1 y1 x2 y2, conf
        assert len(a) == len(b), f"{what}, image {k}: {len(b)} boxes, not {len(a)}"
        assert_rows_found(a, b, tol=1, what=f"{what}, image {k}")


# ---------------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("models", ["four", "six", "four26"])
def test_exports_take_the_model_channels(models, request):
    models = request.getfixturevalue(models)
    onnx = pytest.importorskip("onnx")
    graph_input = onnx.load(str(models.weights["onnx"])).graph.input[0]
    dims = [d.dim_value for d in graph_input.type.tensor_type.shape.dim]
    assert dims == [1, models.channels, IMGSZ, IMGSZ]
    for fmt in FORMATS[1:]:
        assert int(BaseBackend.read_metadata(models.weights[fmt])["channels"]) == models.channels


# --------------------------------------------------------------------------------------------------------- predict
@pytest.mark.parametrize("models", ["four", "four26"])
def test_predict_on_pairs_same_boxes_in_every_format(models, request):
    four = request.getfixturevalue(models)
    images = [str(p) for p in four.images[:3]]
    results = {fmt: predict(four.weights[fmt], images) for fmt in FORMATS}
    for r, image in zip(results["pt"], images):
        h, w = cv2.imread(image).shape[:2]
        assert r.orig_img.shape == (h, w, 3) and r.ir.shape == (h, w, 3)
        assert len(r.boxes), "no boxes at all: nothing to compare"
        xyxy = r.boxes.xyxy
        assert (xyxy >= 0).all() and (xyxy[:, [0, 2]] <= w).all() and (xyxy[:, [1, 3]] <= h).all()
    assert max(float(r.boxes.xyxy[:, 2].max()) for r in results["pt"]) > IMGSZ, "boxes in the frame's pixels"
    for fmt in FORMATS[1:]:
        assert_same_boxes(results["pt"], results[fmt], f"{fmt} vs pt")
    if models != "four":
        return
    # The 6-channel model reads each IR file as 3 channels (the model says 6) and predicts what the 4-channel one does.
    six = request.getfixturevalue("six")
    for fmt in FORMATS:
        assert_same_boxes(results["pt"], predict(six.weights[fmt], [str(p) for p in six.images[:3]]), f"6-ch {fmt}")


@pytest.mark.parametrize("models", ["four", "four26"])
def test_predict_reads_the_ir_frame(models, request, tmp_path):
    """The same RGB frame with a black IR frame gives other predictions: the IR file reaches the network."""
    four = request.getfixturevalue(models)
    rgb = four.images[0]
    dark = tmp_path / "images" / rgb.name
    dark.parent.mkdir(parents=True)
    shutil.copyfile(rgb, dark)
    (tmp_path / "imagesIR").mkdir()
    cv2.imwrite(str(ir_path(dark)), np.zeros_like(cv2.imread(str(ir_path(rgb)), cv2.IMREAD_UNCHANGED)))
    for fmt in ("pt", "onnx"):
        by_path = {r.path: r for r in predict(four.weights[fmt], [str(rgb), str(dark)])}  # stock sorts the list
        with_ir, without_ir = by_path[str(rgb)], by_path[str(dark)]
        assert (without_ir.ir == 0).all() and (with_ir.ir > 0).any()
        assert len(with_ir.boxes)
        a, b = with_ir.boxes.data, without_ir.boxes.data
        assert a.shape != b.shape or not torch.allclose(a, b, rtol=0.01), f"{fmt}: the IR frame made no difference"


@pytest.mark.parametrize("models", ["four", "four26"])
def test_paired_video_same_boxes_in_every_format_and_saved_side_by_side(models, request, tmp_path):
    four = request.getfixturevalue(models)
    video = paired_video(four, tmp_path / "clip")
    results = {}
    for fmt in FORMATS:
        results[fmt] = predict(four.weights[fmt], str(video), save=True, project=str(tmp_path / "out"), name=fmt)
        assert len(results[fmt]) == FRAMES
        saved = cv2.VideoCapture(str(tmp_path / "out" / fmt / "clip.avi"))
        assert saved.get(cv2.CAP_PROP_FRAME_WIDTH) == 2 * 256 and saved.get(cv2.CAP_PROP_FRAME_HEIGHT) == 192
        assert saved.get(cv2.CAP_PROP_FRAME_COUNT) == FRAMES
    assert all(len(r.boxes) for r in results["pt"])
    for fmt in FORMATS[1:]:
        assert_same_boxes(results["pt"], results[fmt], f"video, {fmt} vs pt")
    # Frame k is val pair k % 4, through the video's JPEG compression: same boxes as the images, give or take.
    from_images = predict(four.weights["pt"], [str(p) for p in four.images])
    top = [r.boxes.data[0] for r in from_images]  # the most confident box of each image
    for k, r in enumerate(results["pt"]):
        assert (r.boxes.data[:, 5] == top[k % 4][5]).any()
        assert (r.boxes.xyxy - top[k % 4][:4]).abs().max(1).values.min() < 8, f"frame {k} is not pair {k % 4}"


def test_paired_video_frame_counts(four, tmp_path):
    one_short = paired_video(four, tmp_path / "a", ir_frames=FRAMES - 1)
    assert len(predict(four.weights["pt"], str(one_short))) == FRAMES - 1  # a one-frame gap is tolerated
    two_short = paired_video(four, tmp_path / "b", ir_frames=FRAMES - 2)
    with pytest.raises(DatasetError) as e:
        predict(four.weights["onnx"], str(two_short))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'b' / 'imagesIR' / 'clip.avi'}:")
    assert f"{FRAMES - 2} frames" in msg and f"has {FRAMES}" in msg


def test_paired_video_that_ends_early_stops_there_with_one_line(four, tmp_path):
    video = paired_video(four, tmp_path / "c")
    ir = tmp_path / "c" / "imagesIR" / "clip.avi"
    ir.write_bytes(ir.read_bytes()[: ir.stat().st_size // 2])  # cut short: its header still says 6 frames
    assert cv2.VideoCapture(str(ir)).get(cv2.CAP_PROP_FRAME_COUNT) == FRAMES
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        results = predict(four.weights["pt"], str(video))
    finally:
        LOGGER.removeHandler(handler)
    assert 0 < len(results) < FRAMES
    ended = [line for line in lines if "ended" in line]
    assert len(ended) == 1 and f"{ir}: video ended after frame {len(results)}," in ended[0], lines


def test_missing_ir_partner_is_one_line_naming_the_file(four, tmp_path):
    rgb = tmp_path / "images" / "val" / four.images[0].name
    rgb.parent.mkdir(parents=True)
    shutil.copyfile(four.images[0], rgb)
    video = paired_video(four, tmp_path / "v")
    (tmp_path / "v" / "imagesIR" / "clip.avi").unlink()
    for source, missing in (
        (rgb, tmp_path / "imagesIR" / "val" / f"{rgb.stem}.*"),  # any image suffix would do
        (video, tmp_path / "v" / "imagesIR" / "clip.avi"),
    ):
        for fmt in ("pt", "onnx"):
            with pytest.raises(DatasetError) as e:
                predict(four.weights[fmt], str(source))
            msg = str(e.value)
            assert "\n" not in msg and msg.startswith(f"{missing}:"), msg


def test_predict_refuses_sources_without_ir_partners(four):
    for source, shown in ((np.zeros((192, 256, 4), np.uint8), "a ndarray"), ("rtsp://camera/stream", "'rtsp://")):
        with pytest.raises(DatasetError) as e:
            predict(four.weights["pt"], source)
        assert "\n" not in str(e.value) and str(e.value).startswith(f"predict got {shown}")


def test_predict_on_a_stacked_tensor(four):
    """An N x C x H x W tensor in 0..1, R, G, B, then IR: the results split it back into the RGB and IR frames."""
    pair = torch.rand(1, 4, IMGSZ, IMGSZ)
    (r,) = predict(four.weights["onnx"], pair)
    frame = (pair[0] * 255).round().byte().permute(1, 2, 0).numpy()  # stock's tensor-to-image conversion
    assert np.abs(r.orig_img.astype(int) - frame[..., 2::-1]).max() <= 1  # BGR, as stock
    assert np.abs(r.ir.astype(int) - frame[..., 3:]).max() <= 1


# -------------------------------------------------------------------------------------------------- saved results
@pytest.mark.parametrize("models", ["four", "four26"])
def test_saved_prediction_is_rgb_and_ir_side_by_side(models, request, tmp_path):
    four = request.getfixturevalue(models)
    image = four.images[0]
    (r,) = predict(four.weights["onnx"], str(image), save=True, project=str(tmp_path), name="wide")
    h, w = r.orig_shape
    saved = cv2.imread(str(tmp_path / "wide" / f"{image.stem}.jpg")).astype(int)
    assert saved.shape == (h, 2 * w, 3)
    left, right = np.abs(saved[:, :w] - r.orig_img).max(2), np.abs(saved[:, w:] - r.ir).max(2)
    assert np.median(left) < 8 and np.median(right) < 8, "RGB frame on the left, IR frame on the right"
    drawn_left, drawn_right = left > 64, right > 64  # box lines and labels
    assert drawn_left.sum() > 100, "no boxes drawn"
    assert (drawn_left & drawn_right).sum() > 0.5 * drawn_left.sum(), "the same boxes on both halves"
    (r,) = predict(four.weights["onnx"], str(image), save=True, project=str(tmp_path), name="rgb", side_by_side=False)
    assert cv2.imread(str(tmp_path / "rgb" / f"{image.stem}.jpg")).shape == (h, w, 3)
    assert r.plot().shape == (h, w, 3)


def test_pair_results_draw_each_box_on_both_halves():
    h, w = 60, 80
    pair = np.zeros((h, w, 4), np.uint8)
    pair[..., 3] = 100  # IR grey, RGB black
    box = torch.tensor([[20.0, 10.0, 60.0, 50.0, 0.9, 1.0]])
    r = PairResults.from_pair(pair, "x.jpg", {0: "a", 1: "b"}, box)
    wide = r.plot(labels=False, conf=False, line_width=2).astype(int)
    assert wide.shape == (h, 2 * w, 3)
    for x0, background in ((0, 0), (w, 100)):
        half = wide[:, x0 : x0 + w]
        assert (half[30, 5] == background).all() and (half[30, 40] == background).all()
        for y, x in ((30, 20), (30, 59), (10, 40), (49, 40)):  # the box's four edges
            assert (half[y, x] != background).any(), f"no box edge at ({y}, {x}) of the half at x={x0}"
        assert (half[30, 20] == wide[30, 20]).all(), "the same colour on both halves"
    r_cpu = r[0].cpu()  # indexing and device moves keep the IR frame and the side-by-side look
    assert isinstance(r_cpu, PairResults) and r_cpu.plot().shape == (h, 2 * w, 3)


# ------------------------------------------------------------------------------------------------------------- val
@pytest.mark.parametrize("models", ["four", "six", "four26"])
def test_val_parity_across_formats(models, request, tmp_path):
    models = request.getfixturevalue(models)
    metrics, predictions = {}, {}
    for fmt in FORMATS:
        m = YOLO(str(models.weights[fmt])).val(
            data=str(models.data),
            imgsz=IMGSZ,
            batch=1,
            rect=False,  # as the fixed-size exports must: stock .pt val pads to rectangles (see docs/use.md, Val)
            save_txt=True,
            save_conf=True,
            plots=False,
            project=str(tmp_path),
            name=fmt,
            verbose=False,
        )
        metrics[fmt] = m.box.map50, m.box.map
        predictions[fmt] = {f.name: np.loadtxt(f, ndmin=2) for f in (tmp_path / fmt / "labels").glob("*.txt")}
    assert metrics["pt"][0] > 0.05, f"a model that finds nothing cannot show parity: {metrics}"
    assert len(predictions["pt"]) == len(models.images), "val wrote a prediction file per image"
    for fmt in FORMATS[1:]:
        assert math.isclose(metrics[fmt][0], metrics["pt"][0], abs_tol=0.005), (fmt, metrics)
        assert math.isclose(metrics[fmt][1], metrics["pt"][1], abs_tol=0.005), (fmt, metrics)
        # Every prediction val made (class, x y w h normalized to the 256-px frame, conf), both ways round; the
        # margin keeps a box that sits on the 0.001 threshold in one format out of the comparison.
        assert predictions[fmt].keys() == predictions["pt"].keys()
        for name, a in predictions["pt"].items():
            b = predictions[fmt][name]
            assert_rows_found(a[a[:, 5] > 0.0011], b, tol=1 / 256, what=f"val, {fmt} vs pt, {name}")
            assert_rows_found(b[b[:, 5] > 0.0011], a, tol=1 / 256, what=f"val, pt vs {fmt}, {name}")


def flat_frames(data: Path, sensor: str, root: Path) -> Path:
    """A copy of the val pairs of `data` whose `sensor` frames are flat BLANK images, as a dead camera whose feed is
    filled in with the blank would give; returns its data yaml."""
    shutil.copytree(data.parent / "labels" / "val", root / "labels" / "val")
    for rgb in sorted((data.parent / "images" / "val").iterdir()):
        pair = {"images": rgb, "imagesIR": ir_path(rgb)}
        for folder, src in pair.items():
            dst = root / folder / "val" / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if folder == ("images" if sensor == "rgb" else "imagesIR"):
                im = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
                dst = dst.with_suffix(".png")  # lossless: every pixel stays 114
                cv2.imwrite(str(dst), np.full_like(im, sensors.BLANK))
            else:
                shutil.copyfile(src, dst)
    config = data.read_text().replace(f"path: {data.parent}", f"path: {root}")
    (root / "data.yaml").write_text(config)
    return root / "data.yaml"


@pytest.mark.parametrize("models", ["four", "six"])
def test_per_sensor_val_blanks_like_flat_frames_in_every_format(models, request, tmp_path):
    """`val(sensors=True)` gives the mAP of both sensors, of RGB only and of IR only: for the .pt exactly what plain
    val gives on copies of the val set with flat 114 IR, then RGB, frames; for the exports the same within 0.005."""
    models = request.getfixturevalue(models)
    kwargs = dict(imgsz=IMGSZ, batch=1, rect=False, plots=False, verbose=False, project=str(tmp_path))
    reference = {}
    for case, data in {
        "both": models.data,
        "rgb only": flat_frames(models.data, "ir", tmp_path / "ir_flat"),
        "ir only": flat_frames(models.data, "rgb", tmp_path / "rgb_flat"),
    }.items():
        box = YOLO(str(models.weights["pt"])).val(data=str(data), **kwargs).box
        reference[case] = {"mAP50": box.map50, "mAP50-95": box.map}
    assert len({row["mAP50-95"] for row in reference.values()}) == 3, f"blanking a sensor changed nothing: {reference}"
    for fmt in FORMATS:
        model = YOLO(str(models.weights[fmt]))
        metrics = model.val(data=str(models.data), sensors=True, name=fmt, **kwargs)
        rows = model.sensor_metrics
        assert metrics.box.map == rows["both"]["mAP50-95"]  # the return value is stock's, both sensors
        assert (tmp_path / fmt / sensors.CSV_NAME).is_file()
        for case, row in reference.items():
            for key, value in row.items():
                tol = 0 if fmt == "pt" else 0.005
                assert math.isclose(rows[case][key], value, abs_tol=tol), (fmt, case, key, rows[case][key], value)


def test_training_stores_the_per_sensor_rows_in_best_pt(four):
    """The fixture's training ended with the per-sensor validation of best.pt: in best.pt and sensors.csv, the rows
    val(sensors=True) gives with the trainer's val settings."""
    best = four.weights["pt"]
    stored = torch.load(best, map_location="cpu", weights_only=False)[sensors.CKPT_KEY]
    model = YOLO(str(best))
    model.val(data=str(four.data), imgsz=IMGSZ, batch=8, sensors=True, plots=False, verbose=False)
    assert stored.keys() == model.sensor_metrics.keys() == sensors.CASES.keys()
    for case, row in stored.items():
        assert row == pytest.approx(model.sensor_metrics[case], abs=1e-9), case
    csv = (best.parent.parent / sensors.CSV_NAME).read_text().splitlines()
    assert csv[0] == "sensors,blanked,mAP50,mAP50-95"
    assert [line.split(",")[:2] for line in csv[1:]] == [["both", "none"], ["rgb only", "ir"], ["ir only", "rgb"]]
    for line, row in zip(csv[1:], stored.values()):
        assert [float(x) for x in line.split(",")[2:]] == pytest.approx(list(row.values()), abs=1e-5)


def test_openvino_where_installed(four):
    """OpenVINO's CPU plugin computes in bf16 where the CPU has it (this one does): confident boxes within 1 px and
    10% confidence."""
    pytest.importorskip("openvino")
    ov = YOLO(str(four.weights["pt"])).export(format="openvino", imgsz=IMGSZ)
    images = [str(p) for p in four.images[:3]]
    for k, (a, b) in enumerate(zip(predict(four.weights["pt"], images), predict(ov, images))):
        a, b = (r.boxes.data.numpy()[:, [5, 0, 1, 2, 3, 4]] for r in (a, b))  # class, x1 y1 x2 y2, conf
        assert len(a[a[:, 5] > 0.05]), "no confident boxes to compare"
        assert_rows_found(a[a[:, 5] > 0.05], b, tol=1, what=f"openvino vs pt, image {k}", rtol=0.1)
        assert_rows_found(b[b[:, 5] > 0.05], a, tol=1, what=f"pt vs openvino, image {k}", rtol=0.1)
    # bf16 moves a weak model's borderline boxes across IoU thresholds: its val mAP is checked loosely here (on the
    # demo's well-trained model OpenVINO is within 0.004 of ONNX: docs/use.md).
    kwargs = dict(data=str(four.data), imgsz=IMGSZ, rect=False, plots=False, verbose=False)
    expected, got = YOLO(str(four.weights["pt"])).val(**kwargs).box, YOLO(ov).val(**kwargs).box
    assert got.map50 > 0 and math.isclose(got.map50, expected.map50, abs_tol=0.1), (got.map50, expected.map50)


def test_val_refuses_data_with_other_channels(four, six):
    with pytest.raises(DatasetError) as e:
        YOLO(str(six.weights["onnx"])).val(data=str(four.data), imgsz=IMGSZ, plots=False, verbose=False)
    msg = str(e.value)
    assert "\n" not in msg and str(four.data) in msg and "takes 6" in msg and "channels: 6" in msg
