"""When one sensor fails: modality dropout in training, and validation with one sensor blanked (yolofuse.sensors).

Blanked means: every pixel of the sensor's channels is 114 (sensors.BLANK). A real demo frame is never one flat value,
so a sample whose RGB or IR channels all read 114 was blanked.
"""

import torch
from conftest import ROOT, make_dataset

from yolofuse import sensors
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
