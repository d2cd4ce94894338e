"""Dual-stream (RGB + IR) YOLO training on stock Ultralytics.

`from yolofuse import YOLO` gives a YOLO whose train/val/predict use paired RGB+IR data. Importing the package
also registers the fusion layer with Ultralytics' model parser and keeps Ultralytics offline.
"""

from yolofuse import (
    nn,  # noqa: F401  (registers the Modality layer so yamls build and checkpoints load)
    offline,  # noqa: F401  (must run before ultralytics is imported)
)
from yolofuse.data import DatasetError
from yolofuse.engine import YOLO, FusePredictor, FuseTrainer, FuseValidator

offline.install_fonts()

__all__ = ["YOLO", "FuseTrainer", "FuseValidator", "FusePredictor", "DatasetError"]
