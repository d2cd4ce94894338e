"""Start a fused RGB+IR model from a pretrained single-stream Ultralytics detection checkpoint (e.g. yolov8n.pt).

Which fused layer takes which checkpoint layer is read from the two model definitions (their yaml layer lists), the
same way for the project's hand-written yamls and for those `yolofuse.fuse` makes from any stock family:
- each `Modality` layer starts a stream, and the stream's layers must repeat the checkpoint's backbone from its first
  layer, layer for layer (module, repeats, args, inputs), all of it (mid fusion) or up to a fusion (p3); a model
  without `Modality` layers (early fusion) has one backbone from layer 0;
- a `Concat` of the two streams at the same depth, followed by a 1x1 `Conv`, is a fusion layer: what follows reads it
  where the checkpoint reads that depth of its backbone; backbone layers after the fusions go on with the
  checkpoint's next backbone layer (p3);
- the layers after the backbone must repeat the checkpoint's neck and head, reading the same inputs.

Then each checkpoint layer is put at the index of its fused counterpart(s), and stock `DetectionModel.load` matches
the tensors by name and shape, so the head is treated exactly as stock treats it (class-output layers re-initialized
when the class count differs, rows of same-named classes kept). What stock cannot know is set here: each stream's
first conv gets the checkpoint's RGB filters on its own modality's channels only (IR: the sum over the RGB filters for
1 IR channel, so a gray image gives the response of R=G=B; a copy for 3), and each fusion conv starts as the mean of
the two streams, or (`init` "rgb" or "ir": FUSION_INIT) as one stream alone, the other's weights at zero, so that the
fused model computes exactly what the checkpoint computes on that sensor (early fusion: the other sensor's filters of
the first conv at zero).
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from ultralytics.data.utils import check_det_dataset
from ultralytics.nn.tasks import guess_model_task
from ultralytics.utils import is_online
from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES, GITHUB_ASSETS_REPO, attempt_download_asset

from yolofuse import checkpoint, settings
from yolofuse.checkpoint import CheckpointError
from yolofuse.fuse import inputs
from yolofuse.nn import RGB_CHANNELS

STREAM = {"rgb": "RGB stream", "ir": "IR stream", None: "backbone"}  # part names, by the stream's Modality argument
NECK = "neck/head"
MODALITY = {name: modality for modality, name in STREAM.items()}
INITS = {  # FUSION_INIT (its allowed values are checked in settings.CHECKS) -> how each fusion conv starts
    "mean": "the mean of the two streams",
    "rgb": "the RGB stream alone (IR weights at zero)",
    "ir": "the IR stream alone (RGB weights at zero)",
}


def start_from(model, weights: Path, data: Path, init: str = "mean") -> str:
    """Give `model` (a yolofuse.YOLO built from a fused yaml) the weights of `weights`; its `train()` starts from them.
    The fusion starts as `init` says (INITS).

    The fused model is built for `data`'s classes and channels, as the trainer would build it, and the transfer is
    checked before anything trains: a checkpoint of another task, family or scale raises CheckpointError naming the
    file and the mismatch. Returns the one-line summary of what was transferred.
    """
    settings.check({"FUSION_INIT": init})
    source = _source(weights)
    config = check_det_dataset(str(data))
    fused = type(model.model)(model.cfg, ch=config["channels"], nc=config["nc"], verbose=False)
    fused.names = config["names"]  # stock load keeps the rows of same-named classes, as the trainer's load does
    summary = transfer(source, fused, weights, init)
    # Model.train() seeds its trainer from model.model only while model.ckpt is set, as after Model.load (the trainer
    # otherwise rebuilds the model from the yaml, with random weights); the trainer's copy takes every tensor by name.
    model.model, model.ckpt = fused, {"model": fused}
    return summary


def check(weights: Path, cfg: dict) -> None:
    """CheckpointError, naming the file and the mismatch, if `weights` cannot start the model of the yaml `cfg`.

    The launcher asks before it changes anything; `start_from` checks the same again when it transfers."""
    check_fits(_source(weights), cfg, weights)


def _source(weights: Path) -> nn.Module:
    """The single-stream model in the checkpoint file (its EMA where it has one), in FP32."""
    ckpt = checkpoint.load(locate(weights))
    return (ckpt.get("ema") or ckpt["model"]).float()


def locate(weights: Path, setting: str = "WEIGHTS") -> Path:
    """The checkpoint file that `setting` names. A missing stock asset (yolov8n.pt, ...) is downloaded there by
    Ultralytics' own download, only when Ultralytics considers the machine online: never with YOLO_OFFLINE=1, which
    yolofuse sets by default."""
    failed = ""
    if not weights.is_file() and weights.name in GITHUB_ASSETS_NAMES and is_online():
        try:
            attempt_download_asset(weights)
        except Exception as e:  # a failed download ends in the one-line message below
            failed = f" (the download failed: {type(e).__name__})"
    if weights.is_file():
        return weights
    if weights.name in GITHUB_ASSETS_NAMES:
        where = (
            f"download it from https://github.com/{GITHUB_ASSETS_REPO}/releases and put it there "
            "(or run with YOLO_OFFLINE=0 to let Ultralytics download it)"
        )
    else:
        where = f"put an Ultralytics detection checkpoint there (e.g. yolov8n.pt), or fix {setting}"
    raise CheckpointError(f"{weights}: {setting} not found{failed}; {where}")


@dataclass
class LayerMap:
    """What each fused layer takes from the checkpoint, read from the two yaml definitions."""

    source: dict[int, int]  # fused layer -> checkpoint layer
    part: dict[int, str]  # fused layer -> RGB stream, IR stream, backbone (early fusion) or neck/head
    streams: dict[int, str | None]  # first layer of each stream -> its modality ("rgb", "ir"; None: both, stacked)
    fusions: list[int]  # the 1x1 fusion convs


def layer_map(ours: dict, theirs: dict, weights: Path) -> LayerMap:
    """Match the fused model's yaml layers to the checkpoint's; CheckpointError names the first layer that differs.

    Read in order, each fused layer is one of: a `Modality` layer, which starts a stream at the checkpoint's first
    layer; a `Concat` of the two streams at one depth with the 1x1 `Conv` after it, which stands for that depth
    (fusion); or the next checkpoint layer, built alike and reading what it reads: in a stream, in the backbone
    that goes on from the last fusion (p3), or, after the backbone, in the neck and head.
    """
    layers, src_layers = ours["backbone"] + ours["head"], theirs["backbone"] + theirs["head"]
    first_head = len(ours["backbone"])

    def check(j: int, i: int) -> None:
        """Layer j must be built like checkpoint layer i, and read what i reads (-1: the image)."""
        if (
            j >= len(layers)
            or i >= len(src_layers)
            or layers[j][1:] != src_layers[i][1:]
            or [stands_for.get(x) for x in inputs(layers, j)] != inputs(src_layers, i)
        ):
            found = f"{layers[j][2]} reading {layers[j][0]}" if j < len(layers) else "missing"
            theirs_i = f"{src_layers[i][2]} reading {src_layers[i][0]}" if i < len(src_layers) else "missing"
            raise CheckpointError(
                f"{weights}: does not fit MODEL {_name(ours)}: its layer {j} is {found}, the checkpoint's "
                f"({_name(theirs)}) layer {i} is {theirs_i}; use a detection checkpoint of MODEL's family"
            )

    stands_for = {-1: -1}  # our layer -> the checkpoint layer whose output it carries (-1: the image)
    source, part, streams, fusions = {}, {}, {}, []
    modalities = {j: args[0] for j, (_, _, m, args) in enumerate(layers) if m == "Modality"}
    at, now = 0, STREAM[None]  # the checkpoint layer the next copied layer must be, and the part it belongs to
    j = 0
    while j < first_head:
        concat = inputs(layers, j) if layers[j][2] == "Concat" else []
        depths = {source.get(x) for x in concat}
        if j in modalities:
            streams[j + 1], now, at = modalities[j], STREAM[modalities[j]], 0
            stands_for[j] = -1
        elif modalities and not streams:
            pass  # before the first stream: the stacked input, passed on (layer 0, nn.Identity)
        elif (
            len(concat) == len(streams) == 2
            and len({part.get(x) for x in concat} & {STREAM["rgb"], STREAM["ir"]}) == 2
            and len(depths) == 1
            and j + 1 < first_head
            and (layers[j + 1][0], layers[j + 1][2], layers[j + 1][3][1:2]) == (-1, "Conv", [1])
        ):
            if not fusions:  # from here on the streams are read through their fusions only
                stands_for = {x: d for x, d in stands_for.items() if part.get(x) not in (STREAM["rgb"], STREAM["ir"])}
            at = depths.pop() + 1
            stands_for[j + 1], now = at - 1, STREAM[None]
            fusions.append(j + 1)
            j += 1
        else:
            streams = streams or {0: None}  # no Modality layer: one backbone on the stacked input (early fusion)
            check(j, at)
            source[j], part[j], stands_for[j] = at, now, at
            at += 1
        j += 1
    head = theirs["head"]
    for k in range(len(head)):
        j, i = first_head + k, len(theirs["backbone"]) + k
        check(j, i)
        stands_for[j], source[j], part[j] = i, i, NECK
    if len(layers) != first_head + len(head):
        raise CheckpointError(
            f"{weights}: does not fit MODEL {_name(ours)}: its neck/head has {len(ours['head'])} layers, the "
            f"checkpoint's ({_name(theirs)}) {len(head)}; use a detection checkpoint of MODEL's family"
        )
    return LayerMap(source, part, streams, fusions)


def transfer(source: nn.Module, fused: nn.Module, weights: Path, init: str = "mean") -> str:
    """Copy `source` (a single-stream DetectionModel) into `fused` in place, the fusion as `init` says (INITS);
    returns the one-line summary."""
    plan = check_fits(source, fused.yaml, weights)
    src_layers, src_names = list(source.model), source.names
    rgb_filters = _first_conv(src_layers[0]).weight.detach().clone()
    # The checkpoint's layers at the indices of their fused counterparts (one module at two indices for two streams):
    # stock `load` then matches the tensors by name and shape, and fits the head to our classes exactly as stock does.
    source.model = nn.Sequential(
        *(src_layers[plan.source[j]] if j in plan.source else nn.Identity() for j in range(len(fused.model)))
    )
    theirs = {k: v.shape for k, v in source.state_dict().items()}
    fused.load(source, verbose=False)

    ir = fused.yaml["channels"] - RGB_CHANNELS
    with torch.no_grad():
        for start, modality in plan.streams.items():
            conv = _first_conv(fused.model[start])
            conv.weight.zero_()  # a stream's filters for the other modality's channels only ever see zeros
            if modality == "rgb" or (modality is None and init != "ir"):  # early fusion from one sensor: not the other
                conv.weight[:, :RGB_CHANNELS] = rgb_filters
            if modality == "ir" or (modality is None and init != "rgb"):  # 1 channel: gray answers like R=G=B
                conv.weight[:, RGB_CHANNELS:] = rgb_filters.sum(1, keepdim=True) if ir == 1 else rgb_filters
        for j in plan.fusions:
            conv, bn = fused.model[j].conv, fused.model[j].bn
            concat = fused.model[j - 1]
            eye = torch.eye(conv.out_channels)[:, :, None, None]
            parts = [MODALITY[plan.part[x if x >= 0 else concat.i + x]] for x in concat.f]  # the streams, in order
            blocks = [eye / 2 if init == "mean" else eye * (modality == init) for modality in parts]
            conv.weight.copy_(torch.cat(blocks, 1))  # (a + b) / 2, or one of them, channel by channel
            bn.weight.fill_(1), bn.bias.zero_(), bn.running_mean.zero_(), bn.num_batches_tracked.zero_()
            bn.running_var.fill_(1 - bn.eps)  # sqrt(var + eps) == 1: the BatchNorm is the identity in eval mode
    first_conv = f"first conv: IR = {'sum' if ir == 1 else 'copy'} of the RGB filters"
    if not plan.fusions and init != "mean":  # early fusion
        first_conv = "first conv: the RGB filters, IR at zero" if init == "rgb" else f"{first_conv}, RGB at zero"
    return _summary(fused, plan, theirs, src_names, weights, first_conv, init)


def check_fits(source: nn.Module, cfg: dict, weights: Path) -> LayerMap:
    """The layer map, or CheckpointError naming the file and why it cannot start the model of the yaml `cfg`: task,
    family, scale, input."""
    task = guess_model_task(source)
    if task != "detect":
        raise CheckpointError(
            f"{weights}: a {task} checkpoint ({_name(source.yaml)}); WEIGHTS needs a detection checkpoint of "
            "MODEL's family and scale (e.g. yolov8n.pt for yolov8n-fuse.yaml)"
        )
    plan = layer_map(cfg, source.yaml, weights)
    scale, src_scale = cfg.get("scale"), source.yaml.get("scale")
    if scale and src_scale and scale != src_scale:
        raise CheckpointError(
            f"{weights}: scale {src_scale} ({_name(source.yaml)}), but MODEL {_name(cfg)} is scale {scale}; "
            f"use the scale-{scale} checkpoint (or a scale-{src_scale} MODEL)"
        )
    channels = _first_conv(source.model[0]).in_channels
    if channels != RGB_CHANNELS:
        raise CheckpointError(
            f"{weights}: its first conv takes {channels} input channel(s); WEIGHTS needs a checkpoint trained on "
            "RGB images (3 channels), like Ultralytics' COCO ones"
        )
    return plan


def _summary(
    fused: nn.Module, plan: LayerMap, theirs: dict, src_names: dict, weights: Path, first_conv: str, init: str
) -> str:
    """One line: tensors transferred per part, and those that were not, with the reason.

    `theirs` holds the shapes the checkpoint offered under the fused names. Only class outputs may differ in shape
    (a row per class); any other difference means the checkpoint does not fit after all, and raises."""
    adapted = {id(_first_conv(fused.model[start]).weight) for start in plan.streams}
    moved, total, class_outputs, unmatched = Counter(), Counter(), [], set()
    for key, tensor in fused.state_dict(keep_vars=True).items():
        j = int(key.split(".")[1])
        if j not in plan.part:
            if j not in plan.fusions:
                unmatched.add(j)
            continue
        total[plan.part[j]] += 1
        if id(tensor) in adapted or theirs.get(key) == tensor.shape:
            moved[plan.part[j]] += 1
        elif key in theirs and (theirs[key][0], len(tensor)) == (len(src_names), len(fused.names)):
            class_outputs.append(key)
        else:
            raise CheckpointError(
                f"{weights}: tensor {key} is {tuple(theirs.get(key, ()))} there, {tuple(tensor.shape)} in MODEL "
                f"{_name(fused.yaml)}; use a detection checkpoint of MODEL's family and scale"
            )
    parts = {p: f"{p} {moved[p]}/{n}" for p, n in total.items()}
    parts[STREAM[list(plan.streams.values())[-1]]] += f" ({first_conv})"
    line = f"Transferred from {weights.name}: " + ", ".join(parts.values())
    if plan.fusions:
        n = len(plan.fusions)
        line += f"; fusion: {n} 1x1 conv{'s start' if n > 1 else ' starts'} as {INITS[init]}"
    if unmatched:
        line += f"; layers {', '.join(map(str, sorted(unmatched)))} have no counterpart there and start at random"
    if class_outputs:
        shared = {str(n).strip().lower() for n in src_names.values()}
        kept = [n for n in fused.names.values() if str(n).strip().lower() in shared]
        line += (
            f"; not transferred: {len(class_outputs)} class-output tensors ({len(src_names)} classes there, "
            f"{len(fused.names)} here), re-initialized as stock does"
            + (f", keeping the rows of {', '.join(kept)}" if kept else "")
        )
    return line


def _name(yaml_dict: dict) -> str:
    return Path(yaml_dict.get("yaml_file", "?")).name


def _first_conv(layer: nn.Module) -> nn.Conv2d:
    return next(m for m in layer.modules() if isinstance(m, nn.Conv2d))
