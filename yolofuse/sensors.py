"""When one sensor fails: what a blanked sensor is, modality dropout in training, and validation per sensor.

A blanked sensor's channels hold `BLANK`, the gray (114) that Ultralytics' letterbox and mosaic put wherever there
is no image: a model sees it in every padded border, so it already reads it as "nothing here". It is written into
the uint8 image, before the /255 every format's preprocess applies, so training, validation and every export format
see the very same value.

- Training: `drop_modality` blanks one sensor, picked at random, of a fraction of the training samples, after the
  augmentations, under the sample's own seed (`replay.sample`): exact resume replays it.
- Validation: the validator blanks a sensor of each batch before its preprocess (`FuseValidator.blank`), so one
  code path serves `.pt`, TorchScript, ONNX and any other format. `validate` runs the two one-sensor cases beside
  the usual one; the three rows go to `sensors.csv` in the run folder and to best.pt's `sensor_metrics`.
"""

import random
from copy import copy
from pathlib import Path

from ultralytics.utils import LOGGER, RANK

from yolofuse import checkpoint
from yolofuse.nn import RGB_CHANNELS

BLANK = 114  # a missing sensor's pixel value (uint8), the letterbox fill
SENSORS = ("rgb", "ir")
CASES = {"both": None, "rgb only": "ir", "ir only": "rgb"}  # what the model is given -> the sensor blanked
DROPOUT_ARG = "modality_dropout"  # the trainer's argument (stock's own checks of training arguments don't know it)
CSV_NAME = "sensors.csv"  # beside results.csv in the run folder
CKPT_KEY = "sensor_metrics"  # best.pt's {case: {"mAP50": .., "mAP50-95": ..}}
METRICS = {"mAP50": "metrics/mAP50(B)", "mAP50-95": "metrics/mAP50-95(B)"}  # ours -> Ultralytics' metric keys


def blank(img, sensor: str):
    """Fill `sensor`'s channels of `img` with BLANK, in place, and return it.

    `img` is uint8, channels third from last: a (C, H, W) sample or an (N, C, H, W) batch, tensor or array.
    """
    channels = slice(None, RGB_CHANNELS) if sensor == "rgb" else slice(RGB_CHANNELS, None)
    img[..., channels, :, :] = BLANK
    return img


def drop_modality(img, fraction: float) -> None:
    """Modality dropout on one training sample: with probability `fraction`, blank one sensor, each as likely.

    Draws from Python's `random`, which `replay.sample` seeds per sample.
    """
    if fraction and random.random() < fraction:
        blank(img, random.choice(SENSORS))


def validate(validator, model, both: dict) -> dict | None:
    """{case: {"mAP50": .., "mAP50-95": ..}} of `model` (as for a validator call: a path or a model).

    `both` is `validator`'s stats of `model` with both sensors; each one-sensor case is then validated with its
    loader and settings, the sensor blanked, no plots or saved labels. Under DDP every rank must call it, as for any
    validation; ranks above 0 get None.
    """
    args = copy(validator.args)
    args.plots = args.save_txt = args.save_json = False
    stats = {"both": both}
    for case, sensor in CASES.items():
        if sensor:
            blanked = type(validator)(validator.dataloader, validator.save_dir, args)
            blanked.blank = sensor
            stats[case] = blanked(model=model)
    if RANK > 0:
        return None
    return {case: {ours: float(stats[case][key]) for ours, key in METRICS.items()} for case in CASES}


def table(rows: dict) -> str:
    """The rows as a few lines of text."""
    lines = [f"{'sensors':<10}{'blanked':<9}" + "".join(f"{m:>10}" for m in METRICS)]
    for case, sensor in CASES.items():
        values = "".join(f"{rows[case][m]:>10.3f}" for m in METRICS)
        lines.append(f"{case:<10}{(sensor or 'none'):<9}{values}")
    return "\n".join(lines)


def report(rows: dict, folder: Path, model_name: str) -> Path:
    """Write `folder/sensors.csv` durably (columns sensors, blanked, mAP50, mAP50-95) and print the table."""
    lines = [",".join(["sensors", "blanked", *METRICS])]
    for case, sensor in CASES.items():
        lines.append(",".join([case, sensor or "none", *(f"{rows[case][m]:.5f}" for m in METRICS)]))
    path = Path(folder) / CSV_NAME
    checkpoint.write_durably(path, ("\n".join(lines) + "\n").encode())
    LOGGER.info(f"\nPer sensor, {model_name} (a blanked sensor's pixels are {BLANK}; saved to {path}):\n{table(rows)}")
    return path


def add_to_checkpoint(path: Path, rows: dict) -> None:
    """Store the rows in the checkpoint file at `path` as its `sensor_metrics` key (a staged file: this rewrites it)."""
    from ultralytics.utils.patches import torch_save

    torch_save({**checkpoint.load(path), CKPT_KEY: rows}, path)
