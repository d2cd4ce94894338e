"""Any stock Ultralytics detector made RGB+IR (yolofuse.fuse), from scratch and from its stock weights.

Architecture checks build every family and scale on torch's meta device (shapes and parameter counts, no memory, no
arithmetic); the n scale is built for real. The stock checkpoints are made by a 1-epoch stock training run
(conftest.stock_weights). The launcher is run as a user runs it.
"""

import os
import signal
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import ultralytics
import yaml
from conftest import ROOT, killer_cmd, make_dataset, run_train_dual
from ultralytics.nn.tasks import parse_model, yaml_model_load
from ultralytics.utils.torch_utils import get_flops

import yolofuse
from yolofuse import checkpoint, fuse, pretrained
from yolofuse.checkpoint import CheckpointError
from yolofuse.engine import FuseDetectionModel
from yolofuse.fuse import FuseError

FAMILIES = ["yolov8", "yolo11", "yolo12", "yolo26", "yolov10"]
TRAINED = ["yolov8n", "yolo11n", "yolo12n", "yolo26n"]  # the families a pretrained start is tested for
MID, EARLY = ROOT / "yolov8n-fuse.yaml", ROOT / "models" / "yolov8n-fuse-early.yaml"


def stock(name: str) -> dict:
    return yaml_model_load(name)


def params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def layers_of(cfg: dict) -> list:
    return cfg["backbone"] + cfg["head"]


def tensors(out) -> list[torch.Tensor]:
    """All tensors of a model output (tensor, tuple/list or dict, nested)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in tensors(o)] if isinstance(out, (list, tuple)) else []


# ---------------------------------------------------------------------------------------------------- architecture
def test_mid_fusion_of_yolov8n_is_the_shipped_yaml():
    for fusion, shipped in (("mid", MID), ("early", EARLY)):
        made, ours = fuse.fuse(stock("yolov8n.yaml"), fusion), yaml_model_load(shipped)
        assert layers_of(made) == layers_of(ours), fusion
        built = [FuseDetectionModel(deepcopy(cfg), ch=4, nc=3, verbose=False) for cfg in (made, ours)]
        assert params(built[0]) == params(built[1])
        assert round(params(built[0]) / 1e6, 2) == (4.46 if fusion == "mid" else 3.01)  # the README's figures


@pytest.mark.parametrize("scale", "nsmlx")
@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_and_scale_fuses_as_the_rule_says(family, scale):
    """Parameters: mid = stock + a second backbone + the fusion convs; p3 = stock + the second stream up to the first
    level the neck reads + one fusion conv; early = stock. Each fusion conv maps 2c channels (the two streams) to c."""
    cfg = stock(f"{family}{scale}.yaml")
    read = fuse.levels(cfg)
    for ch in (4, 6):
        with torch.device("meta"):  # shapes only: the l and x scales build in a fraction of a second
            base, _ = parse_model(deepcopy(cfg), ch=ch, verbose=False)
            fused = {f: parse_model(deepcopy(fuse.fuse(cfg, f)), ch=ch, verbose=False)[0] for f in fuse.FUSIONS}
        for fusion, model in fused.items():
            convs = [m for m in model if type(m).__name__ == "Conv" and isinstance(m.act, torch.nn.Identity)]
            stream = read if fusion == "mid" else read[:1] if fusion == "p3" else []
            assert [c.conv.in_channels for c in convs] == [2 * c.conv.out_channels for c in convs], fusion
            assert len(convs) == len(stream), fusion
            widths = [c.conv.out_channels for c in convs]
            second = sum(params(base[i]) for i in range(max(stream, default=-1) + 1))
            fusions = sum(2 * c * c + 2 * c for c in widths)  # 1x1 conv without bias, BatchNorm weight and bias
            assert params(model) == params(base) + second + fusions, (fusion, ch)
            first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
            assert first.in_channels == ch


@pytest.mark.parametrize(
    "family, fusion", [(family, "mid") for family in FAMILIES] + [("yolo26", "p3"), ("yolo26", "early")]
)
def test_n_scale_builds_runs_and_sees_both_modalities(family, fusion):
    """Real builds (the meta-device test above covers every scale, fusion and channel count without arithmetic)."""
    cfg = fuse.fuse(stock(f"{family}n.yaml"), fusion)
    flops = {}
    for ch in (4, 6) if fusion == "mid" else (4,):
        torch.manual_seed(0)
        model = FuseDetectionModel(deepcopy(cfg), ch=ch, nc=3, verbose=False)
        assert model.yaml["channels"] == ch
        assert (getattr(model.model[-1], "one2one_cv2", None) is not None) == (family in ("yolo26", "yolov10"))
        flops[ch] = get_flops(model, 640)
        model.train()  # BatchNorm on batch statistics: an untrained net passes signals on at full strength
        x = torch.rand(2, ch, 64, 64)
        no_ir, no_rgb = x.clone(), x.clone()
        no_ir[:, 3:], no_rgb[:, :3] = 0, 0
        with torch.no_grad():
            out, out_no_ir, out_no_rgb = ([t.clone() for t in tensors(model(t))] for t in (x, no_ir, no_rgb))

        def change(a, b):
            return max(((p - q).abs().max() / p.abs().max().clamp_min(1e-12)).item() for p, q in zip(a, b))

        assert change(out, out_no_ir) > 0.01 and change(out, out_no_rgb) > 0.01, f"{ch} channels: a modality is ignored"
    # The model summary's GFLOPs at 640: the 2 channels more of a 6-channel input cost exactly the first convs' MACs
    # on them (one first conv per stream), so the profiler must have fed the model its own channel count.
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    extra = 2 * first.out_channels * 2 * 9 * (640 // 2) ** 2 * 2 / 1e9  # two streams, 2 channels more, 3x3, stride 2
    assert flops[4] > 0 and flops.get(6, flops[4] + extra) == pytest.approx(flops[4] + extra)


def test_top_level_keys_are_kept_and_provenance_added():
    cfg = stock("yolo26s.yaml")
    for fusion in fuse.FUSIONS:
        made = fuse.fuse(cfg, fusion)
        assert (made["end2end"], made["reg_max"], made["scales"], made["scale"]) == (True, 1, cfg["scales"], "s")
        assert (made["fusion"], made["fused_from"]) == (fusion, "yolo26s.yaml")
        assert made["yaml_file"] == {"mid": "yolo26s-fuse.yaml", "p3": "yolo26s-fuse-p3.yaml"}.get(
            fusion, "yolo26s-fuse-early.yaml"
        )


def test_the_run_folder_yaml_is_archived_with_the_run(tmp_path):
    """train_dual.py writes the model's yaml into the run folder; archiving a finished run takes it along."""
    written = fuse.write(fuse.resolve(Path("yolo26s.yaml"), "p3"), tmp_path)
    assert written.name == "model-yolo26s-fuse-p3.yaml" and checkpoint.run_files(tmp_path) == [written]
    assert yaml_model_load(written)["scale"] == "s", "the scale letter stays in the name, where Ultralytics reads it"


@pytest.mark.parametrize(
    "name, says",
    [
        ("yolo11n-seg.yaml", "a segmentation model (Segment head)"),
        ("yolo26n-pose.yaml", "a pose model (Pose26 head)"),
        ("yolov8n-obb.yaml", "an OBB model (OBB head)"),
        ("yolo11n-cls.yaml", "a classification model (Classify head)"),
        ("rtdetr-l.yaml", "an RT-DETR model (RTDETRDecoder head)"),
        ("yolov8n-fuse.yaml", "already an RGB+IR model"),
    ],
)
def test_what_the_rule_cannot_fuse_is_refused_in_one_line(name, says):
    cfg = yaml_model_load(ROOT / name if name == "yolov8n-fuse.yaml" else name)
    with pytest.raises(FuseError) as refused:
        fuse.fuse(cfg, "mid")
    message = str(refused.value)
    assert message.startswith(f"{cfg['yaml_file']}: ") and says in message and "\n" not in message
    assert "detection" in message or "already" in message


def test_a_neck_that_picks_backbone_features_by_index_layer_is_refused():
    cfg = stock("yolo11n.yaml")  # a TorchVision backbone read through Index layers, as Ultralytics' docs show
    cfg["backbone"] = [[-1, 1, "TorchVision", [768, "convnext_tiny", "DEFAULT", True, 2, True]]]
    cfg["head"] = [[0, 1, "Index", [192, 4]], [0, 1, "Index", [384, 6]], [0, 1, "Index", [768, 8]]] + cfg["head"]
    with pytest.raises(FuseError, match="takes backbone features through TorchVision, not by layer index"):
        fuse.fuse(cfg, "mid")


def test_command_line_writes_the_fused_yaml(tmp_path):
    out = tmp_path / "yolov8n-fuse.yaml"
    env = {**os.environ, "YOLO_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "yolofuse.fuse", "yolov8n.yaml", "--fusion", "mid", "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert layers_of(yaml_model_load(out)) == layers_of(yaml_model_load(MID))
    assert yaml.safe_load(out.read_text())["fusion"] == "mid"
    assert params(yolofuse.YOLO(str(out)).model) == params(yolofuse.YOLO(str(MID)).model)

    refused = tmp_path / "seg.yaml"
    cmd = [sys.executable, "-m", "yolofuse.fuse", "yolo11n-seg.yaml", "-o", str(refused)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert done.returncode == 1 and done.stderr.startswith("error: yolo11n-seg.yaml: a segmentation model")
    assert len(done.stderr.strip().splitlines()) == 1 and not refused.exists()


# ------------------------------------------------------------------------------------------------- pretrained start
@pytest.mark.parametrize("fusion", fuse.FUSIONS)
@pytest.mark.parametrize("family", TRAINED)
def test_pretrained_start_computes_what_the_stock_model_computes(family, fusion, stock_weights, tmp_path):
    """End to end, in eval mode: with the IR image equal to the RGB one (4 channels: a gray image, IR = its gray), both
    streams compute the stock backbone and the fusion their mean, so the fused model gives the stock model's output;
    early fusion does with a black IR image. Every transferred tensor that reaches the output is checked this way."""
    weights = stock_weights(family)
    channels = 6 if fusion == "mid" else 4
    data = make_dataset(tmp_path / "data", n_train=0, n_val=1, channels=channels)
    architecture = fuse.resolve(weights, fusion)
    model = yolofuse.YOLO(str(fuse.write(architecture, tmp_path)))
    summary = pretrained.start_from(model, weights, data)
    assert summary.startswith(f"Transferred from {weights.name}: ") and "not transferred" not in summary, summary
    theirs = ultralytics.YOLO(str(weights)).model.float().eval()
    ours = model.model.eval()
    gray = torch.rand(1, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    rgb = gray.expand(-1, 3, -1, -1)
    ir = torch.zeros_like(gray if channels == 4 else rgb) if fusion == "early" else gray if channels == 4 else rgb
    with torch.no_grad():
        expected, got = tensors(theirs(rgb)), tensors(ours(torch.cat([rgb, ir], 1)))
    assert len(expected) == len(got) > 0
    for a, b in zip(expected, got):  # relative to each output's scale: a barely trained model's features are ~0.01
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * a.abs().max().item())


def test_checkpoint_of_another_family_or_scale_is_refused_in_one_line(stock_weights):
    weights = stock_weights("yolo26n")
    for model, says in (
        ("yolo11n.yaml", "does not fit MODEL yolo11n-fuse.yaml: its layer 11 is SPPF reading -1"),
        ("yolo26s.yaml", "scale n (yolo26n.yaml), but MODEL yolo26s-fuse.yaml is scale s"),
    ):
        with pytest.raises(CheckpointError) as refused:
            pretrained.check(weights, fuse.resolve(Path(model), "mid").cfg)
        assert str(refused.value).startswith(f"{weights}: ") and says in str(refused.value)
        assert "\n" not in str(refused.value)


# -------------------------------------------------------------------------------------------------------- launcher
def test_launcher_trains_yolo26n_pt_as_an_rgb_ir_model_from_its_weights(stock_weights, tmp_path):
    """MODEL=yolo26n.pt: its own yaml fused (mid), its weights transferred; the fused yaml is in the run folder and
    in the checkpoint, and a resume rebuilds from the checkpoint even with the .pt and the run folder's yaml gone."""
    weights = tmp_path / "yolo26n.pt"
    weights.write_bytes(stock_weights("yolo26n").read_bytes())
    runs, data = tmp_path / "runs", make_dataset(tmp_path / "data")
    settings = (f"MODEL={weights}", f"DATA={data}", f"RUNS_DIR={runs}", "EPOCHS=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_AFTER_SAVE": "1"}
    first = subprocess.run(killer_cmd(*settings), capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Transferred from yolo26n.pt: RGB stream 240/240, IR stream 240/240" in first.stdout
    written = runs / "model-yolo26n-fuse.yaml"
    expected = fuse.fuse(stock("yolo26n.yaml"), "mid")
    assert layers_of(yaml_model_load(written)) == layers_of(expected) and yaml.safe_load(written.read_text())["end2end"]

    weights.unlink()
    written.unlink()
    second = run_train_dual(*settings)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "Unfinished run" in second.stdout and "resuming with the checkpoint's architecture" in second.stdout
    trained = checkpoint.load(runs / "weights" / "last.pt")["model"]
    assert layers_of(trained.yaml) == layers_of(expected) and trained.yaml["fused_from"] == "yolo26n.yaml"
    assert sum(type(m).__name__ == "Modality" for m in trained.modules()) == 2, "not two streams"


def test_launcher_fuses_a_stock_yaml_and_a_resume_never_reads_it_again(stock_weights, tmp_path):
    """MODEL=<a stock yaml> FUSION=p3 WEIGHTS=<its stock checkpoint>; killed after epoch 1, the yaml changed (now a
    YOLOv8n): the resumed run goes on with the architecture in its checkpoint."""
    source, weights = tmp_path / "yolo11n.yaml", tmp_path / "yolo11n.pt"
    source.write_text(yaml.safe_dump({k: v for k, v in stock("yolo11n.yaml").items() if k != "yaml_file"}))
    weights.write_bytes(stock_weights("yolo11n").read_bytes())
    runs, data = tmp_path / "runs", make_dataset(tmp_path / "data")
    settings = (f"MODEL={source}", "FUSION=p3", f"WEIGHTS={weights}", f"DATA={data}", f"RUNS_DIR={runs}", "EPOCHS=2")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_AFTER_SAVE": "1"}
    first = subprocess.run(killer_cmd(*settings), capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == -signal.SIGKILL, first.stdout[-2000:] + first.stderr[-2000:]
    assert "Transferred from yolo11n.pt: RGB stream 66/66, IR stream 66/66" in first.stdout, first.stdout[-2000:]
    expected = fuse.fuse(stock("yolo11n.yaml"), "p3")
    assert layers_of(yaml_model_load(runs / "model-yolo11n-fuse-p3.yaml")) == layers_of(expected)

    source.write_text(yaml.safe_dump({k: v for k, v in stock("yolov8n.yaml").items() if k != "yaml_file"}))
    second = run_train_dual(*settings)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "differs from the checkpoint's architecture; resuming with the checkpoint's" in second.stdout
    assert "Transferred from" not in second.stdout
    trained = checkpoint.load(runs / "weights" / "last.pt")["model"]
    assert layers_of(trained.yaml) == layers_of(expected)


@pytest.mark.parametrize(
    "setting, says",
    [
        ("MODEL=yolo11n-seg.yaml", "error: yolo11n-seg.yaml: a segmentation model (Segment head); yolofuse fuses"),
        ("MODEL=rtdetr-l.yaml", "error: rtdetr-l.yaml: an RT-DETR model"),
        ("FUSION=late", "error: FUSION='late': must be one of 'mid', 'p3', 'early'"),
        ("MODEL=yolo26n.pt", "yolo26n.pt: MODEL not found; download it from https://github.com/ultralytics/assets"),
    ],
    ids=["segment", "rtdetr", "fusion", "missing-pt"],
)
def test_launcher_refuses_before_any_change(setting, says, tmp_path, tiny_data):
    runs = tmp_path / "runs"
    broken = runs / "weights" / "last.pt"  # a corrupt run, which a launch that goes ahead archives as exp1
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    done = run_train_dual(f"DATA={tiny_data}", f"RUNS_DIR={runs}", "EPOCHS=1", setting)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and says in errors[0], errors
    assert broken.read_bytes() == b"not a checkpoint" and not (runs / "exp1").exists(), "refused after a change"
    assert not list(runs.glob("*.yaml")) and not (runs / "results.csv").exists(), "a refused launch wrote its model"
