"""`python -m yolofuse predict|val|export`, run as a user runs it: a process of its own, in a scratch working folder.

The model is conftest's `trained`. Each run gets Ultralytics settings of its own whose `runs_dir` is `runs`, so the
default output folders (`runs/detect/predict`, ...) land in the working folder, as for a pip-installed Ultralytics
outside a git checkout. Each CLI result is compared with the Python call that the CLI stands for.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import ultralytics
from conftest import ROOT, write_video

from yolofuse import YOLO, DatasetError, sensors
from yolofuse.data import ir_path

IMGSZ = 64
CONF = 0.01  # a few boxes per image
FRAMES = 6  # length of the test videos
VAL_IMGSZ = 96  # not the training size, which a CLI that dropped its arguments would validate at


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    """The environment of a CLI run: the repository importable, as from its folder; Ultralytics settings whose
    runs_dir is `runs` under the working folder; and no PYTEST_CURRENT_TEST, with which Ultralytics would write its
    runs into its own package folder instead."""
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}
    env.update(PYTHONPATH=str(ROOT), YOLO_CONFIG_DIR=str(tmp_path_factory.mktemp("config")), YOLO_OFFLINE="1")
    settings = "from ultralytics.utils import SETTINGS; SETTINGS.update(runs_dir='runs')"
    subprocess.run([sys.executable, "-c", settings], env=env, check=True, capture_output=True, timeout=120)
    return env


def cli(env: dict, cwd: Path, *args) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "yolofuse", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def files_in(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def assert_refused(run: subprocess.CompletedProcess, starts_with: str) -> None:
    """Exit status 2 and one line on stderr, which starts with `starts_with` (the file it names)."""
    assert run.returncode == 2, run.stdout + run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert run.stderr.startswith(starts_with), run.stderr


def val_images(trained) -> list[Path]:
    return sorted((trained.data.parent / "images" / "val").glob("*.jpg"))


def boxes_of(results) -> list[np.ndarray]:
    """Per image or frame: class, x y w h normalized, conf; as predict's save_txt with save_conf writes them."""
    return [np.column_stack([r.boxes.cls, r.boxes.xywhn, r.boxes.conf]).reshape(-1, 6) for r in results]


def saved_boxes(labels: Path, names: list[str]) -> list[np.ndarray]:
    return [np.loadtxt(labels / f"{name}.txt", ndmin=2).reshape(-1, 6) for name in names]


def assert_same_boxes(expected: list[np.ndarray], got: list[np.ndarray]) -> None:
    assert len(expected) == len(got) and sum(map(len, expected)), "no boxes to compare"
    for a, b in zip(expected, got):
        assert a.shape == b.shape and np.allclose(a, b, atol=1e-5), (a, b)  # save_txt keeps 6 digits


# ------------------------------------------------------------------------------------------------------------ help
def test_no_arguments_or_help_prints_each_mode_with_an_example(tmp_path):
    for args in ([], ["help"]):
        run = subprocess.run([sys.executable, "-m", "yolofuse", *args], cwd=ROOT, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        for mode in ("predict", "val", "export"):
            assert f"python -m yolofuse {mode} model=" in run.stdout


# --------------------------------------------------------------------------------------------------------- predict
def test_predict_folder_saves_rgb_and_ir_with_boxes_as_the_python_call(trained, env, tmp_path):
    source = trained.data.parent / "images" / "val"
    run = cli(env, tmp_path, "predict", f"model={trained.pt}", f"source={source}", f"imgsz={IMGSZ}", f"conf={CONF}")
    assert run.returncode == 0, run.stderr
    api = YOLO(str(trained.pt)).predict(
        str(source), imgsz=IMGSZ, conf=CONF, save=True, project=str(tmp_path / "api"), name="predict", verbose=False
    )
    assert all(len(r.boxes) for r in api)
    for r in api:
        name = Path(r.path).stem + ".jpg"
        saved = cv2.imread(str(tmp_path / "runs" / "detect" / "predict" / name))  # `yolo predict`'s default folder
        h, w = r.orig_shape
        assert saved.shape == (h, 2 * w, 3), "RGB | IR side by side"
        assert (saved == cv2.imread(str(tmp_path / "api" / "predict" / name))).all(), "the image the API saves"


def test_predict_paired_video_with_explicit_ir(trained, env, tmp_path):
    """`source=rgb.avi ir=thermal.avi`, names outside the pairing rule: the boxes of the same videos paired by the
    rule, from the CLI (save_txt) and from the Python call; the saved video is RGB | IR, every frame."""
    images = val_images(trained)
    rgb = [cv2.imread(str(p)) for p in images]
    ir = [cv2.imread(str(ir_path(p))) for p in images]
    flat = tmp_path / "camera"
    write_video(flat / "rgb.avi", [rgb[k % len(rgb)] for k in range(FRAMES)])
    write_video(flat / "thermal.avi", [ir[k % len(ir)] for k in range(FRAMES)])
    (tmp_path / "images").mkdir()
    (tmp_path / "imagesIR").mkdir()
    shutil.copyfile(flat / "rgb.avi", tmp_path / "images" / "clip.avi")
    shutil.copyfile(flat / "thermal.avi", tmp_path / "imagesIR" / "clip.avi")
    model = YOLO(str(trained.pt))
    by_rule = boxes_of(model.predict(str(tmp_path / "images" / "clip.avi"), imgsz=IMGSZ, conf=CONF, verbose=False))
    given = model.predict(str(flat / "rgb.avi"), ir=str(flat / "thermal.avi"), imgsz=IMGSZ, conf=CONF, verbose=False)
    assert_same_boxes(by_rule, boxes_of(given))

    args = f"source={flat / 'rgb.avi'}", f"ir={flat / 'thermal.avi'}", "save_txt=True", "save_conf=True"
    run = cli(env, tmp_path, "predict", f"model={trained.pt}", f"imgsz={IMGSZ}", f"conf={CONF}", *args)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "runs" / "detect" / "predict"
    assert_same_boxes(by_rule, saved_boxes(out / "labels", [f"rgb_{k}" for k in range(1, FRAMES + 1)]))
    saved = cv2.VideoCapture(str(out / "rgb.avi"))
    h, w = rgb[0].shape[:2]
    assert (saved.get(cv2.CAP_PROP_FRAME_WIDTH), saved.get(cv2.CAP_PROP_FRAME_HEIGHT)) == (2 * w, h)
    assert saved.get(cv2.CAP_PROP_FRAME_COUNT) == FRAMES


def test_explicit_ir_image_file_and_folder_pair_as_the_rule_does(trained, tmp_path):
    """`source=rgb.jpg ir=thermal.png`, and an RGB folder with an IR folder of the same names (any image suffix)."""
    images = val_images(trained)
    rgb_dir, ir_dir = tmp_path / "rgb", tmp_path / "thermal"
    for folder in (rgb_dir, ir_dir):
        folder.mkdir()
    for image in images:
        shutil.copyfile(image, rgb_dir / image.name)
        shutil.copyfile(ir_path(image), ir_dir / ir_path(image).name)
    model = YOLO(str(trained.pt))
    kwargs = dict(imgsz=IMGSZ, conf=CONF, verbose=False)
    by_rule = boxes_of(model.predict([str(p) for p in images], **kwargs))
    assert_same_boxes(by_rule, boxes_of(model.predict(str(rgb_dir), ir=str(ir_dir), **kwargs)))
    one = model.predict(str(rgb_dir / images[1].name), ir=str(ir_dir / ir_path(images[1]).name), **kwargs)
    assert_same_boxes(by_rule[1:2], boxes_of(one))
    assert (one[0].ir == cv2.imread(str(ir_path(images[1])))).all()


# ------------------------------------------------------------------------------------------------------------- val
def test_val_prints_the_map_of_the_python_call(trained, env, tmp_path):
    run = cli(env, tmp_path, "val", f"model={trained.pt}", f"data={trained.data}", f"imgsz={VAL_IMGSZ}", "plots=False")
    assert run.returncode == 0, run.stderr
    printed = next(line.split() for line in run.stdout.splitlines() if line.split()[:1] == ["all"])
    kwargs = dict(data=str(trained.data), imgsz=VAL_IMGSZ, plots=False, project=str(tmp_path / "api"))
    metrics = YOLO(str(trained.pt)).val(**kwargs)
    box = metrics.box
    assert box.map50 > 0.05, "a model that finds nothing would print the same zeros either way"
    assert printed[3:] == [f"{v:.3g}" for v in (box.mp, box.mr, box.map50, box.map)]
    assert (tmp_path / "runs" / "detect" / "val").is_dir()


def test_val_with_sensors_prints_the_per_sensor_table_of_the_python_call(trained, env, tmp_path):
    args = (f"model={trained.pt}", f"data={trained.data}", f"imgsz={VAL_IMGSZ}", "plots=False")
    run = cli(env, tmp_path, "val", *args, "sensors=True")
    assert run.returncode == 0, run.stderr
    model = YOLO(str(trained.pt))
    model.val(data=str(trained.data), imgsz=VAL_IMGSZ, plots=False, project=str(tmp_path / "api"), sensors=True)
    assert sensors.table(model.sensor_metrics) in run.stdout + run.stderr
    assert (tmp_path / "runs" / "detect" / "val" / sensors.CSV_NAME).is_file()


# ---------------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("fmt, options", [("torchscript", []), ("onnx", ["simplify=False"])])
def test_export_then_predict_through_the_cli(fmt, options, trained, env, tmp_path):
    pt = shutil.copyfile(trained.pt, tmp_path / "best.pt")
    run = cli(env, tmp_path, "export", f"model={pt}", f"format={fmt}", f"imgsz={IMGSZ}", *options)
    assert run.returncode == 0, run.stderr
    exported = tmp_path / f"best.{fmt}"
    assert exported.is_file()
    images = val_images(trained)
    args = f"source={images[0].parent}", f"imgsz={IMGSZ}", f"conf={CONF}", "save_txt=True", "save_conf=True"
    run = cli(env, tmp_path, "predict", f"model={exported}", *args)
    assert run.returncode == 0, run.stderr
    expected = boxes_of(YOLO(str(exported)).predict(str(images[0].parent), imgsz=IMGSZ, conf=CONF, verbose=False))
    got = saved_boxes(tmp_path / "runs" / "detect" / "predict" / "labels", [p.stem for p in images])
    assert_same_boxes(expected, got)


# ------------------------------------------------------------------------------------------------------- bad input
def missing_ir_partner(trained, tmp_path):
    rgb = tmp_path / "lone" / "images" / "0000.jpg"
    rgb.parent.mkdir(parents=True)
    shutil.copyfile(val_images(trained)[0], rgb)
    return ["predict", f"model={trained.pt}", f"source={rgb.parent}"], str(tmp_path / "lone" / "imagesIR" / "0000.*")


def stock_checkpoint(trained, tmp_path):
    """A stock 3-channel yolov8n, in Ultralytics' checkpoint format; exported, it would land beside itself."""
    pt = tmp_path / "yolov8n.pt"
    ultralytics.YOLO("yolov8n.yaml").save(pt)
    return ["export", f"model={pt}", "format=torchscript"], str(pt)


def data_with_other_channels(trained, tmp_path):
    data = tmp_path / "data6.yaml"
    data.write_text(trained.data.read_text().replace("channels: 4", "channels: 6"))
    return ["val", f"model={trained.pt}", f"data={data}"], str(data)


def ir_video_two_frames_short(trained, tmp_path):
    frame = cv2.imread(str(val_images(trained)[0]))
    rgb = write_video(tmp_path / "rgb.avi", [frame] * FRAMES)
    ir = write_video(tmp_path / "thermal.avi", [frame] * (FRAMES - 2))
    return ["predict", f"model={trained.pt}", f"source={rgb}", f"ir={ir}"], f"{ir}: IR video has {FRAMES - 2} frames"


def unknown_key(trained, tmp_path):
    return ["predict", f"model={trained.pt}", "source=x.jpg", "confidence=0.5"], "'confidence' is not a valid YOLO"


def bad_value(trained, tmp_path):
    return ["predict", f"model={trained.pt}", "source=x.jpg", "conf=high"], "'conf=high' is of invalid type str"


@pytest.mark.parametrize(
    "bad",
    [missing_ir_partner, stock_checkpoint, data_with_other_channels, ir_video_two_frames_short, unknown_key, bad_value],
)
def test_bad_input_is_refused_in_one_line_with_status_2_and_nothing_written(bad, trained, env, tmp_path):
    args, starts_with = bad(trained, tmp_path)
    before = files_in(tmp_path)
    assert_refused(cli(env, tmp_path, *args), starts_with)
    assert files_in(tmp_path) == before


def test_python_calls_refuse_a_stock_checkpoint_in_one_line(trained, tmp_path):
    pt = tmp_path / "yolov8n.pt"
    ultralytics.YOLO("yolov8n.yaml").save(pt)
    source = val_images(trained)[0]
    for call in (
        lambda model: model.predict(str(source), save=True, project=str(tmp_path / "runs")),
        lambda model: model.val(data=str(trained.data), project=str(tmp_path / "runs")),
    ):
        with pytest.raises(DatasetError) as e:
            call(YOLO(str(pt)))
        assert "\n" not in str(e.value) and str(e.value).startswith(f"{pt}: takes 3-channel images")
    assert not (tmp_path / "runs").exists()
