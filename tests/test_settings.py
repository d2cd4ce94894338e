"""yolofuse.settings: train_dual.py's settings read from its source, checked, and what may change on resume.

Fast unit tests; the launcher itself refusing bad settings (before it changes anything) is in test_train_dual.py.
"""

import ast
from pathlib import Path

import pytest
import torch

import cleanup
import train_dual
from yolofuse import settings
from yolofuse.settings import SettingsError

ROOT = Path(__file__).resolve().parents[1]


def one_line(exc: pytest.ExceptionInfo, *must_contain: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg, f"error must be one line: {msg!r}"
    for part in must_contain:
        assert part in msg, f"{part!r} not in error {msg!r}"
    return msg


def test_every_constant_of_the_launcher_has_a_check():
    """The constants written at the top of train_dual.py, in order, are the checked ones (and the only ones the
    command line may set)."""
    constants = []
    for node in ast.parse(settings.LAUNCHER.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "SETTINGS":
                break
            constants.append(node.targets[0].id)
    assert constants == list(settings.CHECKS) == train_dual.SETTINGS
    defaults = settings.read(*train_dual.SETTINGS)  # the file's own values pass (DEVICE None: no GPU needed)
    assert settings.check(defaults) == defaults


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("EPOCHS", 0, "whole number >= 1"),
        ("EPOCHS", -1, "whole number >= 1"),
        ("EPOCHS", "ten", "whole number >= 1"),
        ("EPOCHS", 10.5, "whole number >= 1"),
        ("EPOCHS", True, "whole number >= 1"),
        ("BATCH", 0, "-1"),
        ("BATCH", 1.5, "fraction of GPU memory"),
        ("NBS", 0, ">= 1"),
        ("IMGSZ", 16, ">= 32"),
        ("WORKERS", -1, ">= 0"),
        ("SEED", "x", ">= 0"),
        ("PATIENCE", None, ">= 0"),
        ("CLOSE_MOSAIC", -2, ">= 0"),
        ("CACHE", "yes", "False, True, 'ram', 'disk'"),
        ("CACHE", 0, "False, True, 'ram', 'disk'"),
        ("PLOTS", "no", "True, False"),
        ("KEEP_LATEST", -1, ">= 0"),
        ("MAP_WHITELIST", 80, "looks like a percentage: use 0.8"),
        ("MAP_WHITELIST", 2, "looks like a percentage: use 0.02"),
        ("MAP_WHITELIST", -0.1, "fraction from 0 to 1"),
        ("MAP_WHITELIST", "high", "fraction from 0 to 1"),
        ("CLEANUP_EVERY", 0, ">= 1"),
        ("TRASH_HOURS", -1, ">= 0"),
        ("MIN_FREE_GB", float("nan"), ">= 0"),
        ("DATA", 3, "path"),
        ("RUNS_DIR", "", "path"),
        ("ARCHIVE_DIR", 1, "path"),
        ("DEVICE", "gpu", "'cpu', or GPU numbers"),
        ("DEVICE", 7, "no GPU 7 here"),
        ("DEVICE", "0,0", "twice"),
        ("MODALITY_DROPOUT", 1.5, "must be a number from 0.0 to 1.0"),
        ("MODALITY_DROPOUT", -0.1, "must be a number from 0.0 to 1.0"),
        ("MODALITY_DROPOUT", "0.3", "must be a number from 0.0 to 1.0"),
        ("FUSION_INIT", "thermal", "must be one of 'mean', 'rgb', 'ir'"),
        ("FUSION_INIT", None, "must be one of 'mean', 'rgb', 'ir'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_setting_its_value_and_what_it_may_be(name, value, expected):
    with pytest.raises(SettingsError) as e:
        settings.check({name: value})
    one_line(e, f"{name}={value!r}", expected)


def test_good_values_pass_and_are_normalized(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    values = dict(EPOCHS=3, BATCH=-1, CACHE=True, MAP_WHITELIST=1, TRASH_HOURS=0.5, WEIGHTS=None, DEVICE=(0, 1))
    assert settings.check(values) == {**values, "CACHE": "ram", "DEVICE": "0,1"}
    more = {"BATCH": 0.7, "DEVICE": "CPU", "CACHE": "disk"}
    assert settings.check(more) == {**more, "DEVICE": "cpu"}
    assert settings.check({"DEVICE": 1}) == {"DEVICE": "1"}
    with pytest.raises(SettingsError, match="no GPU 2 here \\(GPUs 0..1 found\\)"):
        settings.check({"DEVICE": "0,2"})


# ----------------------------------------------------------------------------------------------------------------------
# The run folder


@pytest.mark.parametrize("where", [".", "..", str(ROOT)])
def test_a_runs_dir_holding_the_launcher_is_refused(where):
    with pytest.raises(SettingsError) as e:
        settings.check_run_folder(where)
    one_line(e, f"RUNS_DIR={where!r} is {ROOT if where != '..' else ROOT.parent}", "holds train_dual.py", "runs/fuse")


def test_a_runs_dir_that_is_or_is_under_a_file_is_refused(tmp_path):
    file = tmp_path / "runs"
    file.write_text("not a folder")
    with pytest.raises(SettingsError) as e:
        settings.check_run_folder(str(file))
    one_line(e, str(file), "is a file")
    with pytest.raises(SettingsError) as e:
        settings.check_run_folder(str(file / "fuse"))
    one_line(e, str(file / "fuse"), f"inside {file}, which is a file")


def test_writable_tries_a_file_as_root_too(tmp_path):
    """Root passes os.access on any folder: `writable` also creates (and removes) a file. /proc takes no new files,
    not even from root."""
    assert settings.writable(tmp_path) and list(tmp_path.iterdir()) == []
    assert not settings.writable(Path("/proc"))
    settings.check_run_folder(str(tmp_path / "new" / "runs"))  # created later, under a writable folder
    with pytest.raises(SettingsError) as e:
        settings.check_run_folder("/proc/yolofuse-runs")
    one_line(e, "/proc is not writable")


@pytest.mark.parametrize("read_only", ["runs", "runs/weights"])
def test_a_read_only_run_folder_or_weights_folder_is_refused(tmp_path, monkeypatch, read_only):
    """Read-only to the probe (as root, chmod would not stop the process; `writable` is what the launcher asks)."""
    runs = tmp_path / "runs"
    (runs / "weights").mkdir(parents=True)
    monkeypatch.setattr(settings, "writable", lambda folder: folder != tmp_path / read_only)
    with pytest.raises(SettingsError) as e:
        settings.check_run_folder(str(runs))
    one_line(e, f"{tmp_path / read_only} is not writable", "RUNS_DIR")


# ----------------------------------------------------------------------------------------------------------------------
# Reading train_dual.py's source (cleanup.py), and the cleanup command line


def test_read_takes_plain_values_and_names_what_it_cannot_read(tmp_path):
    source = tmp_path / "train_dual.py"
    source.write_text("import torch\nRUNS_DIR = 'elsewhere/runs'  # a comment\nKEEP_LATEST = 7\nEPOCHS = 10 * 10\n")
    assert settings.read("RUNS_DIR", "KEEP_LATEST", source=source) == dict(RUNS_DIR="elsewhere/runs", KEEP_LATEST=7)
    with pytest.raises(SettingsError) as e:
        settings.read("RUNS_DIR", "ARCHIVE_DIR", source=source)
    one_line(e, f"{source} has no constant ARCHIVE_DIR")
    with pytest.raises(SettingsError) as e:
        settings.read("EPOCHS", source=source)
    one_line(e, f"{source}:4: EPOCHS = 10 * 10 is not a plain value", "write the value itself")


@pytest.mark.parametrize(
    "line, expected",
    [
        ("KEEP_LATEST = int(os.environ.get('KEEP', 3))", "KEEP_LATEST = int(os.environ.get('KEEP', 3)) is not a plain"),
        ("MAP_WHITELIST = 80", "MAP_WHITELIST=80: mAP50 is a fraction from 0 to 1; 80 looks like a percentage"),
        ("KEEP_LATEST = (", "train_dual.py:4:"),
    ],
    ids=["not-a-literal", "percentage", "syntax-error"],
)
def test_cleanup_cli_says_what_is_wrong_with_train_dual_in_one_line(tmp_path, monkeypatch, capsys, line, expected):
    source = tmp_path / "train_dual.py"
    source.write_text(
        "import os\nRUNS_DIR = 'runs/fuse'\nMAP_WHITELIST = 0.8\n"
        f"{line}\nKEEP_LATEST = 3\nTRASH_HOURS = 24.0\nMIN_FREE_GB = 5.0\nARCHIVE_DIR = None\nBACKUP_DIR = None\n"
    )
    monkeypatch.setattr(settings, "LAUNCHER", source)
    assert cleanup.main(["--dry-run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and expected in err, err


@pytest.mark.parametrize(
    "value, expected", [("2", "2: mAP50 is a fraction from 0 to 1; 2 looks like a percentage: use 0.02"), ("x", "'x'")]
)
def test_cleanup_cli_refuses_a_map_outside_0_to_1(tmp_path, capsys, value, expected):
    with pytest.raises(SystemExit) as e:
        cleanup.main(["--map", value, "--dry-run", str(tmp_path)])
    assert e.value.code == 2
    assert f"argument --map: {expected}" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------------------
# What may change on resume

RUN = dict(epochs=3, batch=16, nbs=64, imgsz=640, seed=0, patience=100, close_mosaic=10, cache=False, workers=8)
RUN.update(device="0", modality_dropout=0.0, plots=True)
CURRENT = dict(EPOCHS=3, BATCH=16, NBS=64, IMGSZ=640, SEED=0, PATIENCE=100, CLOSE_MOSAIC=10, CACHE=False, WORKERS=8)
CURRENT.update(DEVICE="0", MODALITY_DROPOUT=0.0, PLOTS=True)


def test_nothing_changed_says_nothing():
    assert settings.resume_changes(CURRENT, set(CURRENT), RUN) == ({}, [])


def test_settings_given_on_the_command_line_take_effect_each_with_a_line():
    current = {**CURRENT, "BATCH": 8, "PATIENCE": 5, "CLOSE_MOSAIC": 0, "CACHE": "ram", "WORKERS": 2, "DEVICE": "1"}
    current.update(MODALITY_DROPOUT=0.3, PLOTS=False)
    changes, lines = settings.resume_changes(current, set(current), RUN)
    expected = dict(batch=8, patience=5, close_mosaic=0, cache="ram", plots=False, modality_dropout=0.3, workers=2)
    assert changes == expected
    assert "BATCH: 16 -> 8 from here on; the batches differ from here on, so the run is no longer an exact" in lines[1]
    assert lines[0] == "DEVICE: the run trained on '0', now on '1'"
    assert {line.split(":")[0] for line in lines} == {
        "DEVICE", "BATCH", "PATIENCE", "CLOSE_MOSAIC", "CACHE", "PLOTS", "MODALITY_DROPOUT", "WORKERS"
    }  # fmt: skip


@pytest.mark.parametrize("name, value", [("IMGSZ", 320), ("SEED", 1), ("NBS", 32)])
def test_a_setting_that_cannot_change_mid_run_is_refused_on_the_command_line(name, value):
    with pytest.raises(SettingsError) as e:
        settings.resume_changes({**CURRENT, name: value}, {name}, RUN)
    one_line(e, f"{name}={value!r}", "can't change mid-run", "leave", "new experiment")


def test_epochs_may_grow_not_shrink():
    assert settings.resume_changes({**CURRENT, "EPOCHS": 5}, {"EPOCHS"}, RUN) == ({}, [])  # the trainer extends
    with pytest.raises(SettingsError) as e:
        settings.resume_changes({**CURRENT, "EPOCHS": 2}, {"EPOCHS"}, RUN)
    one_line(e, "EPOCHS=2", "trains to 3 epochs", "extended, not shortened")
    assert settings.resume_changes({**CURRENT, "EPOCHS": 2}, set(), RUN) == ({}, [])  # the file's: the run's 3


def test_a_value_edited_in_the_launcher_leaves_the_run_as_it_was_with_a_line():
    """Only the command line changes a resumed run: a plain re-run after a BATCH=8 launch must not go back to 16."""
    current = {**CURRENT, "BATCH": 8, "IMGSZ": 320, "WORKERS": 2}
    changes, lines = settings.resume_changes(current, set(), RUN)
    assert changes == {}
    assert lines == [
        "BATCH=8 in train_dual.py differs from the run's 16: the run keeps 16 "
        "(give BATCH=8 on the command line to change it)",
        "IMGSZ=320 in train_dual.py differs from the run's 640: the run keeps 640 (the model has learned at its size; "
        "lower BATCH instead to save memory)",
    ]  # WORKERS describes this machine: the launcher passes it as it is set
