"""Keep Ultralytics off the network: no downloads, no auto-installs, no update or telemetry checks.

Imported by the package before anything from ultralytics, because Ultralytics reads these at import time.
"""

import os
import shutil
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")  # is_online() answers False at once instead of probing DNS
os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # a missing module is an error, not a pip install
os.environ.setdefault("ULTRALYTICS_SKIP_REQUIREMENTS_CHECKS", "1")


def install_fonts() -> None:
    """Plots ask for Arial and download it when absent; give them matplotlib's bundled DejaVu Sans instead."""
    import matplotlib
    from ultralytics.utils import USER_CONFIG_DIR

    dejavu = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = Path(USER_CONFIG_DIR) / name
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(dejavu, target)
