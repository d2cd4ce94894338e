"""Trainer, validator, predictor and the YOLO class for paired RGB+IR data, as subclasses of the stock ones."""

import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from copy import copy
from pathlib import Path

import numpy as np
import torch
import ultralytics
from ultralytics.cfg import cfg2dict
from ultralytics.data.build import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset
from ultralytics.engine.results import Results
from ultralytics.models.yolo.detect import DetectionPredictor, DetectionTrainer, DetectionValidator
from ultralytics.nn.backends.base import BaseBackend
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils import DEFAULT_CFG, LOGGER, RANK, ops
from ultralytics.utils.torch_utils import EarlyStopping

from yolofuse import (
    checkpoint,
    ddp,
    nn,  # noqa: F401  (registers the Modality layer, so fusion yamls build)
    offline,
    replay,
    sensors,
    settings,
)
from yolofuse.data import SUPPORTED_CHANNELS, DatasetError, check_dataset, load_pair, paired_datasets
from yolofuse.source import PairedSource, WithIR

offline.install_fonts()  # before any plot: Ultralytics would download Arial

DEFAULT_CHANNELS = 4  # RGB + 1-channel IR, when a model is built without a dataset to say otherwise


def build_paired_dataset(args, img_path, batch, data, mode, stride, rect=False):
    """Stock `build_yolo_dataset`, building the paired dataset (for tools and tests; the trainer and validator go
    through their stock `build_dataset`)."""
    with paired_datasets():
        return build_yolo_dataset(args, img_path, batch, data, mode=mode, rect=rect, stride=stride)


def on_both_halves(boxes: torch.Tensor, shift: float, x_columns: list[int]) -> torch.Tensor:
    """Each box twice, for an RGB | IR image: where it is (on RGB), then `shift` to the right (on IR)."""
    shifted = boxes.clone()
    shifted[:, x_columns] += shift
    return torch.cat([boxes, shifted])


def side_by_side(batch: dict) -> dict:
    """The batch as RGB | IR images of double width, each box drawn on both halves (stock plots 3 channels only)."""
    img = batch["img"]
    ir = img[:, 3:]
    ir = ir.expand(-1, 3, -1, -1) if ir.shape[1] == 1 else ir
    wide = {"img": torch.cat([img[:, :3], ir], dim=3)}
    boxes = batch["bboxes"].clone()  # normalized xywh, now of the double width
    boxes[:, [0, 2]] /= 2
    wide["bboxes"] = on_both_halves(boxes, 0.5, [0])
    for key in ("cls", "batch_idx"):
        wide[key] = torch.cat([batch[key], batch[key]])
    return {**batch, **wide}


class FuseTrainer(ddp.DdpSwitch, DetectionTrainer):
    """DetectionTrainer on stacked pairs, with durable checkpoints and a resume that can extend the run.

    Takes one argument stock does not: `modality_dropout` (see `sensors`), kept in `args` from then on.
    """

    def __init__(self, cfg=DEFAULT_CFG, overrides=None, _callbacks=None):
        overrides = dict(overrides or {})
        dropout = overrides.pop(sensors.DROPOUT_ARG, None)  # before stock checks the names of the arguments
        try:
            self.requested_dropout = None if dropout is None else settings.fraction(dropout)
        except ValueError as e:
            raise ValueError(f"{sensors.DROPOUT_ARG}={dropout!r}: {e}") from None
        super().__init__(cfg, overrides, _callbacks)
        self.extra_passes = 0  # train-loader passes beyond one per epoch (see replay.epoch_started)
        if replay.epoch_started not in self.callbacks["on_train_epoch_start"]:  # DDP workers get it with the others
            self.add_callback("on_train_epoch_start", replay.epoch_started)

    def train(self):
        if not self.ddp:
            return super().train()
        # Ultralytics deletes save_dir before a fresh multi-GPU run; ours also holds the archived experiments and
        # the lock. Only this launching process reads `self.resume` there; the DDP workers get `args.resume`.
        self.resume = True
        with ddp.workers_end_first():
            return super().train()

    def _setup_ddp(self):
        ddp.watch_launcher()  # in each DDP worker, first thing
        super()._setup_ddp()

    def validate(self):
        """Stock validation; under DDP every rank then hands in its RNG streams, for the last.pt rank 0 saves next."""
        result = super().validate()
        self.rank_rngs = replay.gather_rank_rngs(self.world_size) if self.world_size > 1 else None
        return result

    def get_dataset(self):
        check_dataset(self.args.data)  # one-line errors before Ultralytics' own, longer ones
        return super().get_dataset()

    def build_dataset(self, img_path, mode="train", batch=None):
        with paired_datasets():
            dataset = super().build_dataset(img_path, mode, batch)
        if mode == "train":
            dataset.modality_dropout = getattr(self.args, sensors.DROPOUT_ARG)
        return dataset

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if mode == "train":
            replay.use_epoch_keys(loader, self.args.seed)
            replay.set_next_epoch(loader, self.start_epoch, self.extra_passes)  # also a loader an OOM retry rebuilds
        return loader

    def _close_dataloader_mosaic(self):
        super()._close_dataloader_mosaic()
        # Stock resets the loader next: with workers, the pass they began for this epoch is dropped and started again.
        replay.set_next_epoch(self.train_loader, self.epoch, self.extra_passes)

    def get_validator(self):
        return FuseValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def plot_training_samples(self, batch, ni):
        super().plot_training_samples(side_by_side(batch), ni)

    def check_resume(self, overrides):
        """Stock resume keeps the checkpoint's `epochs`; a larger requested `epochs` extends the run instead.

        (Stock is not given `epochs`: it would warn that it ignores them, while the run is extended.)"""
        super().check_resume({k: v for k, v in overrides.items() if k != "epochs"})
        wanted = overrides.get("epochs")
        if self.resume and wanted and wanted > self.args.epochs:
            LOGGER.info(f"Extending the run from {self.args.epochs} to {wanted} epochs; LR schedule recomputed")
            self.args.epochs = wanted
        # Before stock saves args.yaml: the dropout asked for, else a resumed run's own (0.0 for runs from before it)
        if self.requested_dropout is not None or not hasattr(self.args, sensors.DROPOUT_ARG):
            setattr(self.args, sensors.DROPOUT_ARG, self.requested_dropout or 0.0)

    def resume_training(self, ckpt):
        """Stock resume, then the exact-resume state stored beside stock's in last.pt (see `replay`)."""
        self.accumulation = replay.Accumulation()
        if RANK in {-1, 0}:  # a kill between a staged write and its commit leaves the staged file behind
            for path in (self.last, self.best):
                checkpoint.staged(path).unlink(missing_ok=True)
        super().resume_training(ckpt)
        if ckpt is None or not self.resume:
            return
        self.stopper.patience = EarlyStopping(self.args.patience).patience  # stock restores the checkpoint's
        state = replay.load_state(Path(self.args.resume), ckpt)
        if state is not None:
            replay.restore(self, state, self.start_epoch)
            if self.args.batch != ckpt.get("train_args", {}).get("batch"):  # the saved window counts other batches
                self.accumulation.start_window(self.start_epoch, len(self.train_loader))
        else:
            LOGGER.warning(f"{self.args.resume} has no exact-resume state; resuming from its FP16 EMA as stock does")
        if RANK in {-1, 0}:  # under DDP every rank resumes; one writes
            checkpoint.trim_results(self.csv, self.start_epoch)

    def preprocess_batch(self, batch):
        self.accumulation.batch_started(self)
        return super().preprocess_batch(batch)

    def optimizer_step(self):
        super().optimizer_step()
        self.accumulation.stepped(self)

    @contextmanager
    def staged_checkpoints(self):
        """Point stock code at `last.tmp.pt` / `best.tmp.pt`, emptied first: what it writes there is committed after.

        A staged file exists afterwards only if this call's stock code wrote it, never one left by a killed save.
        """
        last, best = self.last, self.best
        self.last, self.best = checkpoint.staged(last), checkpoint.staged(best)
        for path in (self.last, self.best):
            path.unlink(missing_ok=True)
        try:
            yield
        finally:
            self.last, self.best = last, best

    def save_model(self):
        """Stock `save_model` into staged files; last.pt gains the exact-resume state as more zip members.

        best.pt is committed before last.pt: a kill between the two redoes the epoch, which writes the same best.pt.
        """
        with self.staged_checkpoints():
            saved = super().save_model()
        staged_last, staged_best = checkpoint.staged(self.last), checkpoint.staged(self.best)
        with ThreadPoolExecutor(1) as disk:  # stock's bytes reach the disk while the exact state is captured
            flushed = disk.submit(checkpoint.flush, *(p for p in (staged_best, staged_last) if p.exists()))
            exact = replay.capture(self, getattr(self, "rank_rngs", None))  # rank_rngs: from `validate`, under DDP
            checkpoint.add_member(staged_last, replay.RESUME_MEMBER, exact)
            flushed.result()
        if staged_best.exists():  # a new best
            checkpoint.commit(staged_best, self.best)
        checkpoint.commit(staged_last, self.last, keep_previous=True)
        return saved

    def final_eval(self):
        """Stock `final_eval` strips last.pt and best.pt in place and validates best; do it on staged copies.

        Then best.pt is validated with each sensor blanked in turn: the three rows go into best.pt (`sensor_metrics`)
        before it is committed, into sensors.csv, and onto the screen.
        """
        if RANK not in {-1, 0}:  # only rank 0 touches the run folder; every rank validates
            super().final_eval()
            self.validate_sensors(self.best)
            return
        paths = self.last, self.best
        with self.staged_checkpoints():
            for path in paths:
                if path.exists():
                    shutil.copyfile(path, checkpoint.staged(path))  # stock's strip re-saves it without our member
            super().final_eval()
            rows = self.validate_sensors(self.best)
            if rows:
                sensors.add_to_checkpoint(self.best, rows)
        for path in paths:
            if checkpoint.staged(path).exists():
                checkpoint.commit(checkpoint.staged(path), path)
        checkpoint.previous_of(self.last).unlink(missing_ok=True)  # a finished run has nothing to fall back to
        if rows:
            sensors.report(rows, self.save_dir, self.best.name)

    def validate_sensors(self, best: Path) -> dict | None:
        """best.pt's rows per sensor, after stock's final validation of it. None on ranks above 0, and where stock
        did not validate (no best.pt; CPU multi-process runs)."""
        if not best.exists() or not isinstance(self.validator, FuseValidator):
            return None
        return sensors.validate(self.validator, best, self.metrics)


def model_channels(model) -> int | None:
    """Input channels of a model object, or of an exported model file by its metadata (None when it has none)."""
    if isinstance(model, torch.nn.Module):
        return getattr(model, "yaml", {}).get("channels")
    channels = BaseBackend.read_metadata(model).get("channels") if model else None
    return int(channels) if channels else None


def check_pair_model(channels: int | None, model_file) -> None:
    """One line naming the model file when it does not take RGB+IR pairs (a stock 3-channel model, say)."""
    if channels is not None and channels not in SUPPORTED_CHANNELS:
        raise DatasetError(
            f"{model_file}: takes {channels}-channel images, not RGB+IR pairs; use a model trained by train_dual.py "
            f"(WEIGHTS={model_file} starts one from it)"
        )


class FuseValidator(DetectionValidator):
    """DetectionValidator on stacked pairs, for the model in training or for a `.pt` or exported model on its own."""

    blank = None  # "rgb" or "ir": that sensor is blanked in every batch, for any model format (sensors.validate)

    def __init__(self, dataloader=None, save_dir=None, args=None, _callbacks=None):
        if args is not None:  # the trainer's arguments: stock's validator refuses names it does not know
            args = {k: v for k, v in cfg2dict(args).items() if k != sensors.DROPOUT_ARG}
        super().__init__(dataloader, save_dir, args, _callbacks)

    def preprocess(self, batch):
        if self.blank:
            sensors.blank(batch["img"], self.blank)  # uint8, before stock's /255
        return super().preprocess(batch)

    def build_dataset(self, img_path, mode="val", batch=None):
        with paired_datasets():
            return super().build_dataset(img_path, mode, batch)

    def plot_val_samples(self, batch, ni):
        super().plot_val_samples(side_by_side(batch), ni)

    def plot_predictions(self, batch, preds, ni, max_det=None):
        width = batch["img"].shape[3]
        both = [
            {
                **p,
                **{k: torch.cat([p[k], p[k]]) for k in ("conf", "cls")},
                "bboxes": on_both_halves(p["bboxes"], width, [0, 2]),  # pixels, x1 y1 x2 y2
            }
            for p in preds
        ]
        super().plot_predictions(side_by_side(batch), both, ni, 2 * (max_det or self.args.max_det))


class PairResults(Results):
    """Results of one RGB+IR pair. As stock, `orig_img` is the RGB frame (BGR) and the boxes are in its pixels; `ir`
    is the IR frame (BGR, 3 channels) at the same size. `plot`, `save` and `show` draw the boxes on RGB | IR side by
    side, unless `side_by_side` is False or an `img` to draw on is given."""

    def __init__(self, orig_img, ir, path, names, boxes=None, speed=None, side_by_side=True):
        super().__init__(orig_img, path, names, boxes=boxes, speed=speed)
        self.ir, self.side_by_side = ir, side_by_side

    @classmethod
    def from_pair(cls, pair: np.ndarray, path, names, boxes, side_by_side=True):
        """From a stacked pair (R, G, B, then IR), as the predictor reads it."""
        ir = pair[..., 3:]
        ir = np.repeat(ir, 3, axis=2) if ir.shape[2] == 1 else ir[..., ::-1]
        rgb = np.ascontiguousarray(pair[..., 2::-1])
        return cls(rgb, np.ascontiguousarray(ir), path, names, boxes, side_by_side=side_by_side)

    def new(self):
        """Stock `new` (used by `cpu()`, `numpy()`, indexing) would drop the IR frame."""
        result = PairResults(self.orig_img, self.ir, self.path, self.names, speed=self.speed)
        result.side_by_side, result.save_dir = self.side_by_side, self.save_dir
        return result

    def plot(self, *args, **kwargs):
        if not self.side_by_side or kwargs.get("img") is not None:
            return super().plot(*args, **kwargs)
        boxes = on_both_halves(torch.as_tensor(self.boxes.data), self.orig_shape[1], [0, 2])  # x1 y1 x2 y2 conf cls
        wide = Results(np.hstack([self.orig_img, self.ir]), self.path, self.names, boxes=boxes)
        return wide.plot(*args, **kwargs)


class FusePredictor(DetectionPredictor):
    """Predict on RGB image or video files of any export format; each IR partner is found by the pairing rule and
    read as training reads it, with the channel count of the loaded model (its yaml, or its export metadata)."""

    side_by_side = True  # results plot, save and show RGB | IR

    def setup_source(self, source, stride=None):
        check_pair_model(self.model.channels, self.args.model)
        if not isinstance(source, torch.Tensor):  # a stacked (N, C, H, W) tensor in 0..1 goes through as stock
            rgb, ir = (source.rgb, source.ir) if isinstance(source, WithIR) else (source, None)
            source = PairedSource(rgb, self.args.batch, self.args.vid_stride, self.model.channels, ir)
        super().setup_source(source, stride)

    def preprocess(self, im):
        if not isinstance(im, torch.Tensor) and self.dataset.mode == "image":
            # The model input is read as training reads it, decoded straight to its size; the full-size pairs in
            # `im` are for the results. (Video frames have no file: the letterbox resizes them.)
            size = max(self.imgsz)
            im = [load_pair(p, self.model.channels, size, self.dataset.ir_partner(p))[0] for p in self.batch[0]]
        return super().preprocess(im)

    def postprocess(self, preds, img, orig_imgs, **kwargs):
        if isinstance(orig_imgs, torch.Tensor):  # stock reverses a tensor's channels as if BGR; ours is RGB first
            orig_imgs = list(ops.convert_torch2numpy_batch(orig_imgs))
        return super().postprocess(preds, img, orig_imgs, **kwargs)

    def construct_result(self, pred, img, orig_img, img_path):
        pred[:, :4] = ops.scale_boxes(img.shape[2:], pred[:, :4], orig_img.shape)  # to the original frame's pixels
        return PairResults.from_pair(orig_img, img_path, self.model.names, pred[:, :6], self.side_by_side)


class RGBOnlyPredictor(FusePredictor):
    """FusePredictor whose results plot, save and show the RGB frame alone, as stock does."""

    side_by_side = False


class FuseDetectionModel(DetectionModel):
    """DetectionModel built with the stacked channel count (stock `YOLO("x.yaml")` always builds 3)."""

    def __init__(self, cfg="yolov8n-fuse.yaml", ch=None, nc=None, verbose=True):
        cfg = cfg if isinstance(cfg, dict) else yaml_model_load(cfg)
        super().__init__(cfg, ch=ch or cfg.get("channels", DEFAULT_CHANNELS), nc=nc, verbose=verbose)


def validate_per_sensor(validator, model, both: dict) -> dict:
    """`sensors.validate` and `sensors.report` after a `val` (whose keyword `sensors` hides the module there)."""
    rows = sensors.validate(validator, model, both)
    sensors.report(rows, validator.save_dir, Path(str(validator.args.model)).name)
    return rows


class YOLO(ultralytics.YOLO):
    """`ultralytics.YOLO` whose train, resume, val and predict use the paired classes above, on a `.pt` model or an
    export of it (TorchScript, ONNX, OpenVINO, ...)."""

    def __init__(self, model="yolov8n-fuse.yaml", verbose=False):
        super().__init__(model=model, task="detect", verbose=verbose)

    def predict(self, source=None, stream=False, predictor=None, side_by_side=True, ir=None, **kwargs):
        """Stock `predict` on RGB files with their IR partners, found by the pairing rule or given as `ir`: a file
        for an RGB file, a folder for an RGB folder. Saved and shown results are RGB | IR with the same boxes on both
        halves; `side_by_side=False` gives the RGB frame alone, as stock."""
        predictor = predictor or (FusePredictor if side_by_side else RGBOnlyPredictor)
        return super().predict(source if ir is None else WithIR(source, ir), stream, predictor, **kwargs)

    def val(self, validator=None, sensors=False, **kwargs):
        """Stock `val`, once the model is known to take the data's channels: stock creates the run folder before
        it reads the data, and a refused call leaves nothing behind.

        With `sensors=True`, also with each sensor blanked in turn: the three rows are printed, saved as sensors.csv
        in the val folder, and kept in `self.sensor_metrics`; the return value is stock's, both sensors."""
        data, model_file = kwargs.get("data") or self._val_data(), self.overrides["model"]
        channels = model_channels(self.model)
        check_pair_model(channels, model_file)
        data_channels = check_det_dataset(data)["channels"]
        if channels and channels != data_channels:
            raise DatasetError(
                f"{data}: says channels: {data_channels} but {model_file} takes {channels}; validate it on data "
                f"with channels: {channels}"
            )
        kwargs["data"] = data
        if not sensors:
            return super().val(validator, **kwargs)
        made = []

        def make(*args, **kw):  # the validator stock builds: the one-sensor runs reuse its loader and settings
            made.append((validator or self._smart_load("validator"))(*args, **kw))
            return made[-1]

        metrics = super().val(make, **kwargs)
        self.sensor_metrics = validate_per_sensor(made[0], self.model, metrics.results_dict)
        return metrics

    @property
    def task_map(self):
        return {
            "detect": {
                "model": FuseDetectionModel,
                "trainer": FuseTrainer,
                "validator": FuseValidator,
                "predictor": FusePredictor,
            }
        }
