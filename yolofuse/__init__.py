"""Dual-stream (RGB + IR) YOLO training on stock Ultralytics.

`from yolofuse import YOLO` gives a YOLO whose train/val/predict use paired RGB+IR data. Importing the package
keeps Ultralytics offline. The API below is loaded on first use (PEP 562): torch and Ultralytics take seconds to
import, and tools that only move files (`cleanup.py`) need neither.
"""

from importlib import import_module

from yolofuse import offline  # noqa: F401  (must run before ultralytics is imported)

_API = {  # name -> the module that defines it
    "YOLO": "engine",
    "FuseTrainer": "engine",
    "FuseValidator": "engine",
    "FusePredictor": "engine",
    "DatasetError": "data",
}
__all__ = list(_API)


def __getattr__(name):
    if name not in _API:
        raise AttributeError(f"module 'yolofuse' has no attribute {name!r}")
    return getattr(import_module(f"yolofuse.{_API[name]}"), name)
