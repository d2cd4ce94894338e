"""`python -m yolofuse MODE key=value ...`: the `yolo` command for a trained RGB+IR model (predict, val, export).

Arguments are read and checked by stock's own CLI functions, with the same keys, defaults and output folders as
`yolo`; then our YOLO runs the mode. (Stock's `entrypoint` builds stock's YOLO, which reads 3-channel images.)
Run it from the repository folder, or with that folder on PYTHONPATH: a trained checkpoint imports `yolofuse`.
"""

import logging
import sys
from pathlib import Path

MODES = ("predict", "val", "export")
OURS = {"predict": ("ir",), "val": ("sensors",)}  # each mode's arguments that `yolo` does not have
REFUSED = 2  # exit status of a refused call (bad argument or input file), as argparse uses for bad arguments
HELP = """Use a trained RGB+IR model as the `yolo` command does, with the same key=value arguments and defaults:

    python -m yolofuse MODE key=value ...

predict: RGB images, folders, globs or videos; each IR partner is found by the pairing rule (images/ -> imagesIR/,
         same name), or given with ir= (a file for a file, a folder of the same names for a folder). Saves RGB | IR
         with the boxes to runs/detect/predict unless save=False.
    python -m yolofuse predict model=runs/fuse/weights/best.pt source=datasets/demo_night/images/val
    python -m yolofuse predict model=runs/fuse/weights/best.pt source=rgb.mp4 ir=thermal.mp4
val:     mAP on a paired data yaml whose channels: match the model's. sensors=True: also with the IR input blanked
         (RGB only), then the RGB input (IR only), as a table saved to sensors.csv in the val folder.
    python -m yolofuse val model=runs/fuse/weights/best.pt data=data_config.yaml
export:  any format of `yolo export`; the exported file then predicts and validates here too.
    python -m yolofuse export model=runs/fuse/weights/best.pt format=onnx simplify=False

All arguments: https://docs.ultralytics.com/usage/cfg"""


def parse(args: list[str]) -> tuple[str, dict]:
    """(mode, arguments) from `MODE key=value ...`, read and checked by stock's CLI functions. OURS are ours; the
    rest must be valid `yolo` arguments with valid values."""
    from ultralytics.cfg import get_cfg, merge_equals_args, parse_key_value_pair

    mode, *pairs = merge_equals_args(args)
    if mode not in MODES:
        raise SyntaxError(f"'{mode}' is not a mode here; use {', '.join(MODES)} (train with python train_dual.py)")
    overrides = dict(parse_key_value_pair(a) if "=" in a else (a, None) for a in pairs)  # a bare key has no value
    stock = {k: v for k, v in overrides.items() if k not in OURS.get(mode, ())}  # a copy: stock edits it
    logging.disable(logging.INFO)  # on an unknown key stock logs its `yolo` usage first; ours is in HELP
    try:
        get_cfg(overrides=stock)  # stock's key and value checks, as `yolo` runs them
    finally:
        logging.disable(logging.NOTSET)
    for key in ("model", "source") if mode == "predict" else ("model",):
        if overrides.get(key) is None:
            raise SyntaxError(f"{key}= is missing (python -m yolofuse help)")
    return mode, overrides


def run(mode: str, overrides: dict) -> None:
    """Load the model and run the mode, as `yolo` does; a model that does not take RGB+IR pairs is refused first."""
    from yolofuse.engine import YOLO, check_pair_model, model_channels

    model_file = overrides.pop("model")
    if not Path(model_file).exists():  # checked here: stock would look for a downloadable asset of that name
        raise FileNotFoundError(f"{model_file}: model not found; give model= a trained .pt or an export of one")
    model = YOLO(model_file)
    check_pair_model(model_channels(model.model), model_file)
    if mode == "predict":
        for _ in model.predict(stream=True, **{"save": True, **overrides}):  # as `yolo predict`: saved, not kept
            pass
    elif mode == "val":
        model.val(**overrides)
    else:
        model.export(**overrides)


def refuse(error: Exception) -> int:
    print(" ".join(str(error).split()), file=sys.stderr)  # stock's messages may end in a newline or hold several
    return REFUSED


def main(args: list[str]) -> int:
    """The exit status: 0 done, 2 refused (one line on stderr; nothing written)."""
    if not args or args[0].lstrip("-") in ("help", "h"):
        print(HELP)
        return 0
    try:
        mode, overrides = parse(args)
    except (SyntaxError, TypeError, ValueError, AssertionError) as e:  # what stock's parsing and checks raise
        return refuse(e)
    from yolofuse import DatasetError

    try:
        run(mode, overrides)
    except (DatasetError, FileNotFoundError) as e:
        return refuse(e)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
