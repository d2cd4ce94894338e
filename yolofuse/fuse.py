"""Make a stock Ultralytics detection yaml an RGB+IR one, with early, mid or p3 fusion.

    python -m yolofuse.fuse yolo11n.yaml --fusion mid -o yolo11n-fuse.yaml

The neck reads backbone layers by index (`[[-1, 6], 1, Concat, [1]]` reads layer 6, the first neck layer reads the
last backbone layer as -1): those are the levels to fuse.
- early: the stock model itself, on the stacked input (R, G, B, then 1 or 3 IR channels).
- mid: layer 0 passes the stacked input on; two copies of the stock backbone follow, each behind a `Modality` layer
  that lets one modality through; per level, a Concat of the two streams and a linear 1x1 Conv back to one stream's
  width; then the stock neck and head, reading the fused levels. From yolov8n.yaml this is yolov8n-fuse.yaml.
- p3: as mid, but the two streams stop at the first level the neck reads (stride 8, P3, in the stock families) and
  are fused there; the rest of the backbone goes on from the fused map.
All top-level keys (nc, scales, end2end, reg_max, ...) are kept; `fusion` and `fused_from` say what was made from
what. Which fused layer takes which stock layer's weights is read back from the layer lists by `yolofuse.pretrained`.
"""

import argparse
import re
import sys
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path

import yaml

FUSIONS = ("mid", "p3", "early")
HEADS = ("Detect", "v10Detect")  # detection heads (WorldDetect and YOLOEDetect need text prompts)
SUPPORTED = "detection yamls with a Detect or v10Detect head (YOLOv8, YOLOv10, YOLO11, YOLO12, YOLO26)"
FUSION_CONV = [1, 1, "None", 1, 1, False]  # Conv args after the width: 1x1, stride 1, no activation (linear)


class FuseError(ValueError):
    """A model the fusion rule cannot take, or a bad FUSION; the message names the file and what is supported."""


@dataclass
class Architecture:
    """What MODEL stands for in a fresh run: the RGB+IR model yaml, and the checkpoint its weights come from."""

    cfg: dict  # the model yaml, loaded
    name: str  # its file name in the run folder; the scale letter in it picks the scale, as in Ultralytics
    text: str  # its yaml text: a yaml of ours as written, a fused stock model laid out by `dump`
    weights: Path | None  # a stock checkpoint to start from (MODEL=yolo26n.pt, or WEIGHTS)
    notes: list[str]


def check_fusion(fusion: str) -> None:
    if fusion not in FUSIONS:
        raise FuseError(f"FUSION={fusion!r}: use one of {', '.join(map(repr, FUSIONS))}")


def is_fused(cfg: dict) -> bool:
    """An RGB+IR yaml: made by `fuse` (it says its `fusion`) or with `Modality` layers (written by hand)."""
    return "fusion" in cfg or any(layer[2] == "Modality" for layer in cfg["backbone"] + cfg["head"])


def inputs(layers: list, i: int) -> list[int]:
    """The absolute indices layer i of `layers` reads (-1 for the first layer: the image)."""
    f = layers[i][0]
    return [i + x if x < 0 else x for x in (f if isinstance(f, list) else [f])]


def levels(cfg: dict) -> list[int]:
    """The backbone layers the neck and head read, in order; FuseError if the rule cannot fuse this model."""
    name = cfg.get("yaml_file", "?")
    head = cfg["head"][-1][2]
    if head not in HEADS:
        tasks = {"Segment": "a segmentation", "Pose": "a pose", "OBB": "an OBB", "Classify": "a classification"}
        what = next((v for k, v in tasks.items() if head.startswith(k)), "an RT-DETR" if "RTDETR" in head else "a")
        raise FuseError(f"{name}: {what} model ({head} head); yolofuse fuses {SUPPORTED}")
    if is_fused(cfg):
        raise FuseError(f"{name}: already an RGB+IR model; train it as it is")
    layers, n = cfg["backbone"] + cfg["head"], len(cfg["backbone"])
    picks = [m for _, _, m, _ in layers if m in ("Index", "TorchVision")]
    if picks:
        raise FuseError(f"{name}: its neck takes backbone features through {picks[0]}, not by layer index; {SUPPORTED}")
    read = sorted({x for i in range(n, len(layers)) for x in inputs(layers, i) if x < n})
    for x in read:
        f, _, m, args = cfg["backbone"][x]
        if m == "Concat" or not args or not isinstance(args[0], int):
            raise FuseError(f"{name}: the neck reads backbone layer {x} ({m}), whose width is not its first argument")
    return read


def fuse(cfg: dict, fusion: str) -> dict:
    """The fused model yaml (a new dict) of the stock detection yaml `cfg`, for `fusion` (one of FUSIONS)."""
    check_fusion(fusion)
    fused_levels = levels(cfg)
    stock_name = Path(cfg.get("yaml_file", "?")).name
    backbone, head = cfg["backbone"], cfg["head"]
    top = {k: deepcopy(v) for k, v in cfg.items() if k not in ("backbone", "head", "yaml_file", "channels")}
    top.update(fusion=fusion, fused_from=stock_name, yaml_file=fused_name(stock_name, fusion))
    if fusion == "early":
        return {**top, "backbone": deepcopy(backbone), "head": deepcopy(head)}

    stream_end = len(backbone) if fusion == "mid" else fused_levels[0] + 1  # p3: the streams stop at the first level
    if fusion == "p3":
        fused_levels = fused_levels[:1]
    out = [[-1, 1, "nn.Identity", []]]  # 0: the stacked input, read by both Modality layers
    streams = []
    for modality in ("rgb", "ir"):
        out.append([0, 1, "Modality", [modality]])
        new = {-1: len(out) - 1}  # stock index -> index here; the stream's first layer reads the Modality layer
        for i in range(stream_end):
            new[i] = len(out)
            out.append(_moved(backbone[i], len(out), [new[x] for x in inputs(backbone, i)]))
        streams.append(new)
    neck_reads = {}  # stock backbone layer -> the layer here that stands for it
    for x in fused_levels:
        out.append([[streams[0][x], streams[1][x]], 1, "Concat", [1]])
        neck_reads[x] = len(out)
        out.append([-1, 1, "Conv", [backbone[x][3][0], *FUSION_CONV]])
    for i in range(stream_end, len(backbone)):  # p3: one backbone goes on from the fused map
        if min(inputs(backbone, i)) < stream_end - 1:
            raise FuseError(f"{stock_name}: backbone layer {i} reads across the p3 fusion point; use mid fusion")
        neck_reads[i] = len(out)
        out.append(_moved(backbone[i], len(out), [neck_reads[x] for x in inputs(backbone, i)]))
    first_head = len(out)
    layers = backbone + head
    for k in range(len(head)):
        i, j = len(backbone) + k, first_head + k
        reads = [neck_reads[x] if x < len(backbone) else first_head + x - len(backbone) for x in inputs(layers, i)]
        out.append(_moved(head[k], j, reads))
    return {**top, "backbone": out[:first_head], "head": out[first_head:]}


def resolve(model: Path, fusion: str, weights: Path | None = None) -> Architecture:
    """The RGB+IR model a fresh run with MODEL=`model`, FUSION=`fusion` and WEIGHTS=`weights` builds.

    `model` is an RGB+IR yaml (it has `Modality` layers or says its `fusion`): it trains as written. A stock
    detection yaml (a file, or a name Ultralytics ships such as yolo11s.yaml) is fused with `fusion`, from scratch. A
    stock checkpoint (yolo26n.pt, a local file) is its own yaml fused, started from its weights. Anything else raises
    FuseError (or CheckpointError for a checkpoint) in one line, before anything is built.
    """
    from yolofuse import checkpoint, pretrained  # noqa: PLC0415  (pretrained reads the layer lists with `inputs`)

    check_fusion(fusion)
    if model.suffix == ".pt":
        trained = checkpoint.load(pretrained.locate(model, "MODEL"))
        cfg = deepcopy((trained.get("ema") or trained["model"]).yaml)  # its yaml_file names the scale: yolo26n.yaml
        if is_fused(cfg):
            raise FuseError(
                f"{model}: an RGB+IR checkpoint; MODEL takes a yaml or a stock checkpoint (e.g. yolo26n.pt). To train "
                "a run on, raise EPOCHS and re-run it in its RUNS_DIR"
            )
        if weights:
            raise FuseError(f"MODEL={model} brings its own weights and WEIGHTS={weights} others: set one of them")
        weights = model
    else:
        cfg = load(model)
        if is_fused(cfg):
            differs = cfg.get("fusion", fusion) != fusion
            notes = [f"FUSION={fusion} ignored: MODEL {model.name} is {cfg.get('fusion')} fusion, as written"] * differs
            return Architecture(cfg, model.name, model.read_text(), weights, notes)
    try:
        cfg = fuse(cfg, fusion)
    except FuseError as e:
        raise FuseError(f"{model}: {e}" if model.suffix == ".pt" else str(e)) from None
    return Architecture(cfg, cfg["yaml_file"], dump(cfg), weights, [])


def load(model: Path) -> dict:
    """A model yaml as Ultralytics loads it (scale from the file name): a file, else a yaml Ultralytics ships
    (yolo11s.yaml: its yolo11.yaml at scale s)."""
    from ultralytics.nn.tasks import yaml_model_load  # noqa: PLC0415  (torch loads only when a model is needed)

    try:
        return yaml_model_load(model if model.is_file() else model.name)
    except FileNotFoundError:
        raise FuseError(f"{model}: no such file, nor a model yaml Ultralytics ships (e.g. yolo11n.yaml)") from None


def write(architecture: Architecture, folder: Path) -> Path:
    """The architecture's yaml, written into `folder` (the run folder) as model-<its name> (checkpoint.RUN_FILES
    archives it with the run); returns its path."""
    from yolofuse.checkpoint import write_durably  # noqa: PLC0415

    name = architecture.name
    path = folder / (name if name.startswith("model-") else f"model-{name}")  # the scale letter stays in the name
    write_durably(path, architecture.text.encode())
    return path


def _moved(layer: list, j: int, reads: list[int]) -> list:
    """`layer` placed at index j, reading `reads`: a relative input stays relative where it still points right."""
    f, n, m, args = layer
    spec = f if isinstance(f, list) else [f]
    moved = [x if x < 0 and j + x == y else y for x, y in zip(spec, reads)]
    return [moved if isinstance(f, list) else moved[0], n, m, deepcopy(args)]


def fused_name(stock_name: str, fusion: str) -> str:
    """yolo11n.yaml -> yolo11n-fuse.yaml (mid), yolo11n-fuse-p3.yaml, yolo11n-fuse-early.yaml: the scale letter
    stays where Ultralytics reads it, in the file name."""
    stem = re.sub(r"\.ya?ml$", "", stock_name)
    return f"{stem}-fuse{'' if fusion == 'mid' else '-' + fusion}.yaml"


def dump(cfg: dict) -> str:
    """The yaml text of a model dict, laid out as Ultralytics' yamls are: one layer a line, with its index."""
    top = {k: v for k, v in cfg.items() if k not in ("backbone", "head", "yaml_file", "channels")}
    text = f"# {cfg.get('yaml_file', 'RGB+IR model')}: {cfg.get('fusion', '?')} fusion of {cfg.get('fused_from', '?')}"
    text += " (yolofuse.fuse). The scale letter in the file name picks the scale, as in Ultralytics.\n"
    text += yaml.safe_dump(top, sort_keys=False, default_flow_style=None)
    index = 0
    for part in ("backbone", "head"):
        text += f"\n{part}:\n"
        for layer in cfg[part]:
            text += f"  - {yaml.safe_dump(layer, default_flow_style=True, width=1000).strip()} # {index}\n"
            index += 1
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m yolofuse.fuse", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a stock detection yaml, e.g. yolo11n.yaml (the scale letter picks the scale)")
    parser.add_argument("--fusion", default="mid", choices=FUSIONS)
    parser.add_argument("-o", "--output", help="where to write it (default: the fused name, e.g. yolo11n-fuse.yaml)")
    args = parser.parse_args(argv)
    try:
        fused = fuse(load(Path(args.model)), args.fusion)
    except FuseError as e:
        sys.exit(f"error: {e}")
    output = Path(args.output or fused["yaml_file"])
    fused["yaml_file"] = output.name
    output.write_text(dump(fused))
    print(f"{output}: {args.fusion} fusion of {fused['fused_from']}, {len(fused['backbone'] + fused['head'])} layers")
    return 0


if __name__ == "__main__":
    import yolofuse  # noqa: F401  (keeps Ultralytics offline)

    sys.exit(main())
