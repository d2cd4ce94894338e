"""Starting a fused model from a stock single-stream Ultralytics checkpoint (yolofuse.pretrained, WEIGHTS=...).

The stock checkpoints are built here, offline, from Ultralytics' own yamls and saved with Ultralytics' own
`Model.save`. Their BatchNorm and bias tensors, 0 or 1 in a fresh model, get random values first (conv weights are
random already), so a comparison can only pass for the right source tensor. Where each fused layer should come from
is written out below for the project's two yamls: the expected result, which the module derives from the yamls.
"""

import math
import os
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import ultralytics
from conftest import ROOT, killer_cmd, make_dataset, run_train_dual, train_dual_cmd
from ultralytics.utils import ROOT as ULTRALYTICS_ROOT
from ultralytics.utils import YAML

import yolofuse
from yolofuse import fuse, pretrained
from yolofuse.checkpoint import CheckpointError
from yolofuse.data import load_pair

MID = ROOT / "yolov8n-fuse.yaml"
EARLY = ROOT / "models" / "yolov8n-fuse-early.yaml"
COCO_NAMES = YAML.load(ULTRALYTICS_ROOT / "cfg" / "datasets" / "coco.yaml")["names"]  # person 0, car 2; no sign

# fused layer -> stock YOLOv8 layer: RGB stream, IR stream, neck/head (yolov8n-fuse.yaml); the same layers (early)
MID_SOURCE = {**{2 + p: p for p in range(10)}, **{13 + p: p for p in range(10)}, **{29 + k: 10 + k for k in range(13)}}
MID_FIRST_CONVS = {2: "rgb", 13: "ir"}
MID_FUSIONS = {24: (6, 17), 26: (8, 19), 28: (11, 22)}  # fusion conv: (RGB layer, IR layer) it fuses
EARLY_SOURCE = {j: j for j in range(23)}
DETECT = 22  # the stock model's Detect layer


def stock_checkpoint(path: Path, cfg: str = "yolov8n.yaml", channels: int = 3) -> Path:
    """A freshly built stock model with COCO's class names, saved in Ultralytics' checkpoint format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = ultralytics.YOLO(cfg)
    if channels != 3:  # as a model trained on `channels: 1` data is built
        model.model = type(model.model)(cfg, ch=channels, verbose=False)
    generator = torch.Generator().manual_seed(len(str(path)))
    with torch.no_grad():  # conv weights are random already; BatchNorm and bias tensors start as 0 or 1
        for key, tensor in model.model.state_dict().items():
            if key.endswith(("bn.weight", "running_var")):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif key.endswith(("bias", "running_mean")):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(int(torch.randint(1, 10**6, (), generator=generator)))
    if len(model.model.names) == len(COCO_NAMES):
        model.model.names = dict(COCO_NAMES)
    model.save(path)
    return path


def saved_source(path: Path) -> dict:
    """The checkpoint's tensors as the file holds them (FP16 there, as float here)."""
    return torch.load(path, map_location="cpu", weights_only=False)["model"].float().state_dict()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pretrained")


@pytest.fixture(scope="module")
def checkpoints(work):
    """name -> checkpoint path, each stock model built once for the module."""
    made = {}

    def get(cfg: str, channels: int = 3) -> Path:
        if (cfg, channels) not in made:
            made[cfg, channels] = stock_checkpoint(work / f"{channels}ch" / cfg.replace(".yaml", ".pt"), cfg, channels)
        return made[cfg, channels]

    return get


@pytest.fixture(scope="module")
def datasets(work):
    """channels -> a tiny demo copy; for 6 channels its IR frames are saved as 3-channel images, as LLVIP's are."""
    made = {}

    def get(channels: int) -> Path:
        if channels not in made:
            made[channels] = make_dataset(work / f"data{channels}", n_train=4, n_val=2, channels=channels)
            for ir in (made[channels].parent / "imagesIR").rglob("*.*") if channels == 6 else ():
                cv2.imwrite(str(ir), cv2.cvtColor(cv2.imread(str(ir), cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2BGR))
        return made[channels]

    return get


def scale_s_model(folder: Path) -> Path:
    """yolov8n-fuse.yaml at scale s: as in Ultralytics, the scale letter comes from the file name."""
    path = folder / "yolov8s-fuse.yaml"
    shutil.copyfile(MID, path)
    return path


# ---------------------------------------------------------------------------------------------------------- transfer
@pytest.mark.parametrize(
    "model_cfg, channels, scale",
    [(MID, 4, "n"), (MID, 6, "s"), (EARLY, 4, "n"), (EARLY, 6, "n")],
    ids=["mid-4ch", "mid-6ch-scale-s", "early-4ch", "early-6ch"],
)
def test_every_mapped_tensor_equals_its_source(model_cfg, channels, scale, checkpoints, datasets, work):
    weights = checkpoints(f"yolov8{scale}.yaml")
    model_cfg = scale_s_model(work) if scale == "s" else model_cfg
    model = yolofuse.YOLO(str(model_cfg))
    summary = pretrained.start_from(model, weights, datasets(channels))
    fused, src = model.model.state_dict(), saved_source(weights)
    mid = model_cfg != EARLY
    source_of = MID_SOURCE if mid else EARLY_SOURCE
    first_convs = MID_FIRST_CONVS if mid else {0: "both"}
    fusions = MID_FUSIONS if mid else {}
    assert fused[f"model.{next(iter(first_convs))}.conv.weight"].shape[1] == channels
    assert model.model.yaml["scale"] == scale and model.model.names == {0: "person", 1: "sign", 2: "car"}

    checked = set()
    for key, tensor in fused.items():
        j, rest = int(key.split(".")[1]), key.split(".", 2)[2]
        if j in fusions:
            continue
        assert j in source_of, f"{key} belongs to no mapped layer"
        theirs = src[f"model.{source_of[j]}.{rest}"]
        checked.add(key)
        if j in first_convs and rest == "conv.weight":
            rgb, ir = tensor[:, :3], tensor[:, 3:]
            want_ir = theirs.sum(1, keepdim=True) if channels == 4 else theirs
            assert torch.equal(rgb, theirs if first_convs[j] in ("rgb", "both") else torch.zeros_like(theirs))
            assert torch.equal(ir, want_ir if first_convs[j] in ("ir", "both") else torch.zeros_like(want_ir)), key
        elif source_of[j] == DETECT and tensor.shape != theirs.shape:  # the class-output convs: 80 classes there
            assert key.split(".")[2] == "cv3" and tensor.shape[0] == 3 and theirs.shape[0] == 80, key
            # as stock does: rows of same-named classes are kept (person, car), the new one (sign) starts afresh
            assert torch.equal(tensor[[0, 2]], theirs[[0, 2]]) and not torch.equal(tensor[1], theirs[1])
            if key.endswith("bias"):
                stride = model.model.stride[int(key.split(".")[3])]
                assert tensor[1].item() == pytest.approx(math.log(5 / 3 / (640 / stride) ** 2), rel=1e-6)
        else:
            assert torch.equal(tensor, theirs), key
    assert len(checked) + 6 * len(fusions) == len(fused)

    for j, (rgb_layer, ir_layer) in fusions.items():
        conv, bn = model.model.model[j].conv, model.model.model[j].bn
        c = conv.out_channels
        half = torch.eye(c)[:, :, None, None] / 2
        assert torch.equal(conv.weight, torch.cat([half, half], 1))
        assert torch.equal(bn.weight, torch.ones(c)) and torch.equal(bn.bias, torch.zeros(c))
        assert torch.equal(bn.running_mean, torch.zeros(c)) and torch.equal(bn.running_var + bn.eps, torch.ones(c))

    note = f"(first conv: IR = {'sum' if channels == 4 else 'copy'} of the RGB filters)"
    parts = ["RGB stream 162/162", f"IR stream 162/162 {note}"] if mid else [f"backbone 162/162 {note}"]
    assert summary.startswith(f"Transferred from {weights.name}: " + ", ".join([*parts, "neck/head 187/193"]))
    assert ("fusion: 3 1x1 convs start as the mean of the two streams" in summary) == mid
    assert summary.endswith(
        "not transferred: 6 class-output tensors (80 classes there, 3 here), re-initialized as stock does, "
        "keeping the rows of person, car"
    )
    assert "\n" not in summary


@pytest.mark.parametrize("channels", [4, 6])
def test_streams_compute_what_the_checkpoint_computes_and_fusion_starts_as_their_mean(channels, checkpoints, datasets):
    """Features, not tensors: RGB stream on RGB = stock backbone on RGB; IR stream on IR = stock backbone on the IR
    image as RGB (gray: R=G=B); each fusion conv's output = the mean of the two streams (eval mode)."""
    weights = checkpoints("yolov8n.yaml")
    model = yolofuse.YOLO(str(MID))
    pretrained.start_from(model, weights, datasets(channels))
    stock = ultralytics.YOLO(str(weights)).model.float().eval()
    fused = model.model.eval()
    generator = torch.Generator().manual_seed(0)
    rgb, ir = torch.rand(1, 3, 64, 64, generator=generator), torch.rand(1, channels - 3, 64, 64, generator=generator)

    def features(net, x, layers):
        seen = {}
        hooks = [net.model[i].register_forward_hook(lambda m, a, y, i=i: seen.__setitem__(i, y)) for i in layers]
        with torch.no_grad():
            net(x)
        for hook in hooks:
            hook.remove()
        return seen

    got = features(fused, torch.cat([rgb, ir], 1), [6, 8, 11, 17, 19, 22, *MID_FUSIONS])
    on_rgb = features(stock, rgb, [4, 6, 9])
    on_ir = features(stock, ir.expand(-1, 3, -1, -1), [4, 6, 9])
    for ours, theirs in zip((6, 8, 11), (4, 6, 9)):
        torch.testing.assert_close(got[ours], on_rgb[theirs], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got[ours + 11], on_ir[theirs], rtol=1e-4, atol=1e-4)
    for j, (rgb_layer, ir_layer) in MID_FUSIONS.items():
        torch.testing.assert_close(got[j], (got[rgb_layer] + got[ir_layer]) / 2, rtol=1e-5, atol=1e-5)


def head_inputs_and_outputs(model, x: torch.Tensor) -> list[torch.Tensor]:
    """The feature maps the Detect head reads (P3, P4, P5), then every tensor of its output (eval mode)."""
    seen = []
    hook = model.model[-1].register_forward_hook(lambda m, inputs, output: seen.extend(inputs[0]))
    with torch.no_grad():
        outputs = model(x)
    hook.remove()
    return [t.clone() for t in seen] + tensors(outputs)


def tensors(out) -> list[torch.Tensor]:
    """All tensors of a model output (a tensor, or tuples, lists and dicts of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else []
    return [t for o in values for t in tensors(o)]


def real_pairs(data: Path, channels: int, split: str = "val") -> torch.Tensor:
    """The pairs of `data` as the model takes them: N x channels x 64 x 64 in 0..1, padded with 114 as stock's
    letterbox pads."""
    stacks = []
    for rgb in sorted((data.parent / "images" / split).glob("*.jpg")):
        stack, _ = load_pair(rgb, channels, 64)
        h, w = stack.shape[:2]
        stacks.append(torch.from_numpy(np.pad(stack, ((0, 64 - h), (0, 64 - w), (0, 0)), constant_values=114)))
    return torch.stack(stacks).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def calibrated(work, datasets):
    """family -> a stock checkpoint of it (n scale) with the demo's classes, random conv weights, and the BatchNorm
    statistics of the demo's train frames (RGB and IR). A fresh or briefly trained model computes nearly the same
    whatever its input, because its activations fade layer after layer (a stock YOLOv8n trained 1 epoch on 4 pairs:
    outputs 1.5e-5 apart between two fusion starts), so a comparison of outputs on it could hardly fail; on this one
    the features, and so the outputs, depend on the input as a trained model's do."""
    made = {}

    def get(family: str) -> Path:
        if family not in made:
            model = ultralytics.YOLO(f"{family}.yaml")
            model.model = type(model.model)(f"{family}.yaml", nc=3, verbose=False)
            model.model.names = {0: "person", 1: "sign", 2: "car"}
            x = real_pairs(datasets(4), 4, "train")
            for bn in (m for m in model.model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
                bn.reset_running_stats()
                bn.momentum = None  # the statistics of the next batch, exactly
            with torch.no_grad():
                model.model.train()(torch.cat([x[:, :3], x[:, 3:].expand(-1, 3, -1, -1)]))
            made[family] = work / f"calibrated-{family}.pt"
            model.save(made[family])
        return made[family]

    return get


@pytest.mark.parametrize("sensor", ["rgb", "ir"])
@pytest.mark.parametrize(
    "family, fusion, channels",
    [
        ("yolov8n", "mid", 4),
        ("yolov8n", "mid", 6),
        ("yolov8n", "early", 4),
        ("yolov8n", "early", 6),
        ("yolo11n", "mid", 4),
        ("yolo12n", "mid", 4),
        ("yolo26n", "mid", 4),
        ("yolo26n", "p3", 4),
        ("yolo26n", "early", 4),
    ],
    ids=lambda v: str(v) if not isinstance(v, int) else f"{v}ch",
)
def test_fusion_init_from_one_sensor_computes_what_the_checkpoint_computes_on_that_sensor(
    family, fusion, channels, sensor, calibrated, datasets, tmp_path
):
    """FUSION_INIT="rgb" ("ir"): before the first step the fused model (eval mode) computes on the demo's val pairs
    what the stock checkpoint computes on their RGB frames (their IR frames as RGB: gray, R=G=B): the same feature
    maps into the Detect head, and the same outputs. The checkpoint has the demo's classes, so its head is taken
    whole. (fuse.py's mid and early fusion of yolov8n are the project's two yamls.)

    Exactly, but for "ir" with 1 IR channel: there the first conv's IR filter is the sum of the checkpoint's three RGB
    filters, so it computes (w_r + w_g + w_b) * g where the stock model computes w_r * g + w_g * g + w_b * g: the same
    number, rounded differently, and the layers after it carry that on: measured up to 1.3e-5 of each tensor's largest
    value, 1e-4 allowed. The default start, the mean of the two streams, is more than 0.1 of it away."""
    weights, data = calibrated(family), datasets(channels)
    stock = ultralytics.YOLO(str(weights)).model.float().eval()
    x = real_pairs(data, channels)
    expected = head_inputs_and_outputs(stock, x[:, :3] if sensor == "rgb" else x[:, 3:].expand(-1, 3, -1, -1))
    model_cfg = fuse.write(fuse.resolve(weights, fusion), tmp_path)
    got, summary = {}, ""
    for init in ("mean", sensor):
        model = yolofuse.YOLO(str(model_cfg))
        summary = pretrained.start_from(model, weights, data, init=init)
        got[init] = head_inputs_and_outputs(model.model.eval(), x)
    assert len(got[sensor]) == len(expected) > 3
    for ours, theirs in zip(got[sensor], expected):
        if sensor == "ir" and channels == 4:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4 * theirs.abs().max().item())
        else:
            assert torch.equal(ours, theirs)
    for mean, theirs in zip(got["mean"][:3], expected):  # the maps: an end-to-end head's outputs may saturate
        assert (mean - theirs).abs().max() > 0.1 * theirs.abs().max(), "the default start computes the same"
    other = "IR" if sensor == "rgb" else "RGB"
    if fusion != "early":
        assert f"as the {sensor.upper()} stream alone ({other} weights at zero)" in summary
    else:
        assert f"(first conv: {'the RGB filters, IR at zero' if sensor == 'rgb' else 'IR = '}" in summary
        assert summary.count("at zero") == 1 and f"{other} at zero" in summary


@pytest.mark.parametrize("model_cfg, channels", [(MID, 4), (EARLY, 6)], ids=["mid-4ch", "early-6ch"])
def test_training_starts_from_the_transferred_weights(model_cfg, channels, checkpoints, datasets, tmp_path):
    """Ultralytics' trainer builds its own model; at its first step it (and its EMA) must hold every transferred
    tensor, not a fresh random init from the yaml."""
    data = datasets(channels)
    model = yolofuse.YOLO(str(model_cfg))
    pretrained.start_from(model, checkpoints("yolov8n.yaml"), data)
    transferred = {k: v.clone() for k, v in model.model.state_dict().items()}
    started = {}

    class Started(Exception):
        pass

    def record(trainer):
        started["model"] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        started["ema"] = {k: v.float() for k, v in trainer.ema.ema.state_dict().items()}
        raise Started

    model.add_callback("on_train_start", record)
    with pytest.raises(Started):
        model.train(data=str(data), epochs=1, imgsz=64, batch=2, nbs=2, workers=0, device="cpu", plots=False,
                    save_dir=str(tmp_path / "run"))  # fmt: skip
    for which in ("model", "ema"):
        assert started[which].keys() == transferred.keys()
        differ = [k for k, v in transferred.items() if not torch.equal(started[which][k].float(), v.float())]
        assert not differ, f"the trainer's {which} does not start from the transferred weights: {differ[:5]}"


# ------------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "cfg, channels, says",
    [
        ("yolov8n-seg.yaml", 3, "a segment checkpoint (yolov8n-seg.yaml)"),
        ("yolov8n-pose.yaml", 3, "a pose checkpoint (yolov8n-pose.yaml)"),
        ("yolov8s.yaml", 3, "scale s (yolov8s.yaml), but MODEL yolov8n-fuse.yaml is scale n"),
        ("yolo11n.yaml", 3, "its layer 4 is C2f reading -1, the checkpoint's (yolo11n.yaml) layer 2 is C3k2"),
        ("yolov8n.yaml", 1, "its first conv takes 1 input channel(s); WEIGHTS needs a checkpoint trained on RGB"),
    ],
    ids=["segment", "pose", "scale", "family", "gray"],
)
def test_mismatched_checkpoint_is_refused_in_one_line(cfg, channels, says, checkpoints, datasets):
    weights = checkpoints(cfg, channels)
    model = yolofuse.YOLO(str(MID))
    built = model.model
    with pytest.raises(CheckpointError) as refused:
        pretrained.start_from(model, weights, datasets(4))
    message = str(refused.value)
    assert message.startswith(f"{weights}: ") and says in message and "\n" not in message
    assert model.model is built and not model.ckpt, "a refused checkpoint must leave the model as it was built"


@pytest.fixture
def downloads(monkeypatch, checkpoints):
    """Ultralytics' asset download, replaced: it records the file asked for and writes a stock checkpoint there."""
    asked = []

    def download(file, *args, **kwargs):
        asked.append(Path(file))
        shutil.copyfile(checkpoints("yolov8n.yaml"), file)
        return str(file)

    monkeypatch.setattr(pretrained, "attempt_download_asset", download)
    return asked


def test_missing_stock_weights_are_never_downloaded_offline(tmp_path, downloads, no_network, monkeypatch):
    missing = tmp_path / "yolov8n.pt"
    assert os.environ["YOLO_OFFLINE"] == "1"  # yolofuse's default
    with pytest.raises(CheckpointError) as refused:
        pretrained.locate(missing)
    assert str(refused.value) == (
        f"{missing}: WEIGHTS not found; download it from https://github.com/ultralytics/assets/releases and put it "
        "there (or run with YOLO_OFFLINE=0 to let Ultralytics download it)"
    )
    assert not downloads and not no_network, "YOLO_OFFLINE=1 must not even look the network up"

    monkeypatch.setenv("YOLO_OFFLINE", "0")  # allowed, but the machine has no network: same line, no download
    with pytest.raises(CheckpointError, match="WEIGHTS not found; download it from"):
        pretrained.locate(missing)
    assert no_network and not downloads and not missing.exists()


def test_missing_stock_weights_are_downloaded_there_when_online(tmp_path, downloads, monkeypatch):
    monkeypatch.setattr(pretrained, "is_online", lambda: True)
    missing = tmp_path / "yolov8n.pt"
    assert pretrained.locate(missing) == missing and downloads == [missing]

    other = tmp_path / "my_weights.pt"  # not a stock asset: nothing to download, one line says what to do
    with pytest.raises(CheckpointError) as refused:
        pretrained.locate(other)
    assert str(refused.value) == (
        f"{other}: WEIGHTS not found; put an Ultralytics detection checkpoint there (e.g. yolov8n.pt), or fix WEIGHTS"
    )
    assert downloads == [missing]

    def broken(file, *args, **kwargs):
        raise ConnectionError("connection reset")

    monkeypatch.setattr(pretrained, "attempt_download_asset", broken)  # a failed download: the same one line
    with pytest.raises(
        CheckpointError, match=r"yolov8s.pt: WEIGHTS not found \(the download failed: ConnectionError\); "
    ):
        pretrained.locate(tmp_path / "yolov8s.pt")


# -------------------------------------------------------------------------------------------------------- launcher
def test_launcher_starts_a_fresh_run_from_weights_and_a_resumed_run_ignores_them(checkpoints, datasets, tmp_path):
    runs, weights = tmp_path / "runs", checkpoints("yolov8n.yaml")
    settings = (f"DATA={datasets(4)}", f"RUNS_DIR={runs}", "EPOCHS=2", f"WEIGHTS={weights}", "FUSION_INIT=ir")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILLER_AFTER_SAVE": "1"}
    first = subprocess.run(killer_cmd(*settings), capture_output=True, text=True, timeout=600, env=env)
    assert first.returncode == -9, first.stdout[-2000:] + first.stderr[-2000:]  # killed after epoch 1, unfinished
    assert "Transferred from yolov8n.pt: RGB stream 162/162, IR stream 162/162" in first.stdout
    assert "fusion: 3 1x1 convs start as the IR stream alone (RGB weights at zero)" in first.stdout

    second = run_train_dual(*settings)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert f"WEIGHTS={weights} ignored: a resumed run goes on from its own checkpoint's weights" in second.stdout
    assert "Transferred from" not in second.stdout


@pytest.mark.parametrize("which", ["segment", "missing"])
def test_launcher_refuses_bad_weights_before_training(which, checkpoints, datasets, tmp_path):
    weights = checkpoints("yolov8n-seg.yaml") if which == "segment" else tmp_path / "yolov8n.pt"
    runs = tmp_path / "runs"
    broken = runs / "weights" / "last.pt"  # a corrupt run, which a launch that goes ahead archives as exp1
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    env = {k: v for k, v in os.environ.items() if k != "YOLO_OFFLINE"}  # the launcher's own default
    settings = (f"DATA={datasets(4)}", f"RUNS_DIR={runs}", "EPOCHS=1", f"WEIGHTS={weights}")
    done = subprocess.run(train_dual_cmd(*settings), capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {weights}: "), done.stderr[-2000:]
    assert ("a segment checkpoint" if which == "segment" else "WEIGHTS not found") in errors[0]
    assert broken.read_bytes() == b"not a checkpoint" and not (runs / "exp1").exists(), "refused after a change"
    assert not (runs / "results.csv").exists()
