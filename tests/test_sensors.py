"""When one sensor fails: modality dropout in training, and validation with one sensor blanked (yolofuse.sensors).

Blanked means: every pixel of the sensor's channels is 114 (sensors.BLANK). A real demo frame is never one flat value,
so a sample whose RGB or IR channels all read 114 was blanked.
"""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, killer_cmd, make_dataset, run_train_dual

from yolofuse import YOLO, checkpoint, fuse, sensors
from yolofuse.engine import FuseTrainer

MID = ROOT / "yolov8n-fuse.yaml"


def trainer_for(data, **overrides) -> FuseTrainer:
    trainer = FuseTrainer(overrides=dict(model=str(MID), data=str(data), imgsz=64, batch=4, device="cpu", **overrides))
    trainer.setup_model()
    return trainer


def samples(loader, epochs: int) -> list[torch.Tensor]:
    """Every image the loader gives in `epochs` passes, one (C, H, W) uint8 tensor each, in order."""
    return [img.clone() for _ in range(epochs) for batch in loader for img in batch["img"]]


def blanked(img: torch.Tensor) -> str | None:
    rgb, ir = (img[:3] == sensors.BLANK).all(), (img[3:] == sensors.BLANK).all()
    assert not (rgb and ir), "both sensors blanked"
    return "rgb" if rgb else "ir" if ir else None


def test_dropout_blanks_one_sensor_of_about_the_fraction_of_training_samples_after_augmentation(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=16, n_val=4)
    dropped = trainer_for(data, modality_dropout=0.5)
    plain = trainer_for(data)
    loaders = [t.get_dataloader(t.data["train"], batch_size=4, rank=-1, mode="train") for t in (dropped, plain)]
    with_dropout, without = (samples(loader, 4) for loader in loaders)  # 64 samples, mosaic on

    picked = [blanked(img) for img in with_dropout]
    assert all(blanked(img) is None for img in without)
    assert 0.35 <= sum(p is not None for p in picked) / len(picked) <= 0.65, picked
    assert picked.count("rgb") >= 8 and picked.count("ir") >= 8, picked
    # The same seeds: each sample is the augmented one without dropout, with one sensor at most replaced by the blank.
    for img, same, sensor in zip(with_dropout, without, picked):
        kept = slice(3, None) if sensor == "rgb" else slice(None, 3)
        assert torch.equal(img[kept], same[kept])
        if sensor is None:
            assert torch.equal(img, same)


def test_dropout_is_never_applied_in_validation(tmp_path):
    data = make_dataset(tmp_path / "data", n_train=4, n_val=8)
    trainer = trainer_for(data, modality_dropout=1.0)
    val_loader = trainer.get_dataloader(trainer.data["val"], batch_size=4, rank=-1, mode="val")
    assert all(blanked(img) is None for img in samples(val_loader, 2))
    train_loader = trainer.get_dataloader(trainer.data["train"], batch_size=4, rank=-1, mode="train")
    assert all(blanked(img) is not None for img in samples(train_loader, 1))  # the same trainer does drop in training


def test_launcher_ends_with_the_per_sensor_table_and_a_resume_takes_a_new_dropout(tmp_path, tiny_data):
    runs = tmp_path / "runs"
    settings = (f"DATA={tiny_data}", f"RUNS_DIR={runs}", "EPOCHS=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_AFTER_SAVE": "1"}
    first = subprocess.run(killer_cmd(*settings, "MODALITY_DROPOUT=0.5"), capture_output=True, text=True, env=env)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert checkpoint.load(runs / "weights" / "last.pt")["train_args"][sensors.DROPOUT_ARG] == 0.5

    second = run_train_dual(*settings, "MODALITY_DROPOUT=0.25")  # given on the command line: takes effect
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "MODALITY_DROPOUT: 0.5 -> 0.25 from here on; other samples are blanked, so the run is no longer" in out
    assert yaml.safe_load((runs / "args.yaml").read_text())[sensors.DROPOUT_ARG] == 0.25

    rows = checkpoint.load(runs / "weights" / "best.pt")[sensors.CKPT_KEY]
    assert list(rows) == list(sensors.CASES) and all(row.keys() == {"mAP50", "mAP50-95"} for row in rows.values())
    assert f"Per sensor, best.pt (a blanked sensor's pixels are 114; saved to {runs / sensors.CSV_NAME})" in out
    assert sensors.table(rows) in out
    done = re.search(r"^Done\. best\.pt: \S+  mAP50 (\S+)  mAP50-95 (\S+)$", second.stdout, re.MULTILINE)
    assert [float(x) for x in done.groups()] == pytest.approx(list(rows["both"].values()), abs=5e-4)
    csv = (runs / sensors.CSV_NAME).read_text().splitlines()
    assert [float(x) for x in csv[2].split(",")[2:]] == pytest.approx(list(rows["rgb only"].values()), abs=1e-5)


@pytest.mark.parametrize(
    "setting, says",
    [
        ("MODALITY_DROPOUT=1.5", "MODALITY_DROPOUT=1.5: must be a number from 0.0 to 1.0"),
        ("FUSION_INIT=thermal", "FUSION_INIT='thermal': must be one of 'mean', 'rgb', 'ir'"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_before_anything_changes(tmp_path, tiny_data, setting, says):
    runs = tmp_path / "runs"
    done = run_train_dual(f"DATA={tiny_data}", f"RUNS_DIR={runs}", "EPOCHS=1", setting)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {says}"]
    assert not runs.exists()


@pytest.mark.parametrize(
    "family, fusion",
    [
        ("yolov8n", "mid"),
        ("yolo11n", "mid"),
        ("yolo12n", "mid"),
        ("yolo26n", "mid"),
        ("yolo26n", "p3"),
        ("yolo26n", "early"),
    ],
)
def test_per_sensor_val_blanks_the_input_of_every_family(family, fusion, tmp_path):
    """Each family fuse.py makes RGB+IR (untrained: its mAP is 0, what matters is its input): val(sensors=True) gives
    the model the pairs, then the pairs with IR blanked, then with RGB blanked, and reports the three rows."""
    data = make_dataset(tmp_path / "data", n_train=0, n_val=2)
    model = YOLO(str(fuse.write(fuse.resolve(Path(f"{family}.yaml"), fusion), tmp_path)))
    seen = []  # per forward pass: which sensor's channels are all blank

    def record(module, inputs):
        x = inputs[0]
        if x.shape[-2] != 64:  # the model summary's FLOPs passes (32 high) when a validator fuses it: not images
            return
        blank = sensors.BLANK / 255
        seen.append("rgb" if (x[:, :3] == blank).all() else "ir" if (x[:, 3:] == blank).all() else None)

    model.model.register_forward_pre_hook(record)
    model.val(data=str(data), imgsz=64, batch=1, sensors=True, plots=False, verbose=False, project=str(tmp_path))
    assert seen == [None, None, "ir", "ir", "rgb", "rgb"], seen  # 2 val pairs, one at a time
    assert list(model.sensor_metrics) == list(sensors.CASES)
    assert (tmp_path / "val" / sensors.CSV_NAME).is_file()


def test_sensors_csv_is_archived_with_its_run(tmp_path):
    (tmp_path / sensors.CSV_NAME).write_text("sensors,blanked,mAP50,mAP50-95\n")
    assert checkpoint.run_files(tmp_path) == [tmp_path / sensors.CSV_NAME]
