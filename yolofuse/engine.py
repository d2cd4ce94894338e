"""Trainer, validator, predictor and the YOLO class for paired RGB+IR data, as subclasses of the stock ones."""

import shutil
from contextlib import contextmanager
from copy import copy

import numpy as np
import torch
import ultralytics
from ultralytics.models.yolo.detect import DetectionPredictor, DetectionTrainer, DetectionValidator
from ultralytics.nn.tasks import DetectionModel, yaml_model_load
from ultralytics.utils import LOGGER, RANK, colorstr
from ultralytics.utils.torch_utils import strip_optimizer, unwrap_model

from yolofuse import checkpoint, ddp, replay
from yolofuse.data import PairedDataset, check_dataset, load_pair

DEFAULT_CHANNELS = 4  # RGB + 1-channel IR, when a model is built without a dataset to say otherwise


def build_paired_dataset(args, img_path, batch, data, mode, stride):
    """The stock `build_yolo_dataset` settings, with the paired dataset class."""
    return PairedDataset(
        img_path=img_path,
        imgsz=args.imgsz,
        batch_size=batch,
        augment=mode == "train",
        hyp=args,
        rect=args.rect or mode == "val",
        cache=args.cache or None,
        single_cls=args.single_cls or False,
        stride=stride,
        pad=0.0 if mode == "train" else 0.5,
        prefix=colorstr(f"{mode}: "),
        task=args.task,
        classes=args.classes,
        data=data,
        fraction=args.fraction if mode == "train" else 1.0,
    )


def side_by_side(batch: dict) -> dict:
    """The batch as RGB | IR images of double width, each box drawn on both halves (stock plots 3 channels only)."""
    img = batch["img"]
    ir = img[:, 3:]
    ir = ir.expand(-1, 3, -1, -1) if ir.shape[1] == 1 else ir
    wide = {"img": torch.cat([img[:, :3], ir], dim=3)}
    boxes = batch["bboxes"].clone()  # normalized xywh
    boxes[:, [0, 2]] /= 2
    shifted = boxes.clone()
    shifted[:, 0] += 0.5
    wide["bboxes"] = torch.cat([boxes, shifted])
    for key in ("cls", "batch_idx"):
        wide[key] = torch.cat([batch[key], batch[key]])
    return {**batch, **wide}


class FuseTrainer(ddp.CpuSwitch, DetectionTrainer):
    """DetectionTrainer on stacked pairs, with durable checkpoints and a resume that can extend the run."""

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
        self.rank_states = replay.gather_rank_states(self) if self.world_size > 1 else None
        return result

    def get_dataset(self):
        check_dataset(self.args.data)  # one-line errors before Ultralytics' own, longer ones
        return super().get_dataset()

    def build_dataset(self, img_path, mode="train", batch=None):
        stride = max(int(unwrap_model(self.model).stride.max()), 32)
        return build_paired_dataset(self.args, img_path, batch, self.data, mode, stride)

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        loader = super().get_dataloader(dataset_path, batch_size, rank, mode)
        if mode == "train":
            replay.use_epoch_shuffle(loader, self.args.seed)
        return loader

    def get_validator(self):
        return FuseValidator(self.test_loader, save_dir=self.save_dir, args=copy(self.args), _callbacks=self.callbacks)

    def plot_training_samples(self, batch, ni):
        super().plot_training_samples(side_by_side(batch), ni)

    def check_resume(self, overrides):
        """Stock resume keeps the checkpoint's `epochs`; a larger requested `epochs` extends the run instead."""
        super().check_resume(overrides)
        wanted = overrides.get("epochs")
        if self.resume and wanted and wanted > self.args.epochs:
            LOGGER.info(f"Extending the run from {self.args.epochs} to {wanted} epochs; LR schedule recomputed")
            self.args.epochs = wanted

    def resume_training(self, ckpt):
        super().resume_training(ckpt)
        if ckpt is None or not self.resume:
            return
        if replay.RESUME_KEY in ckpt:
            replay.restore(self, ckpt[replay.RESUME_KEY], self.start_epoch)
        else:
            LOGGER.warning(f"{self.args.resume} has no exact-resume state; resuming from its FP16 EMA as stock does")
        if RANK in {-1, 0}:  # under DDP every rank resumes; one writes
            checkpoint.trim_results(self.csv, self.start_epoch)

    @contextmanager
    def staged_checkpoints(self):
        """Point stock code at `last.tmp.pt` / `best.tmp.pt`: what it writes in place is committed atomically after."""
        last, best = self.last, self.best
        self.last, self.best = checkpoint.staged(last), checkpoint.staged(best)
        try:
            yield
        finally:
            self.last, self.best = last, best

    def save_model(self):
        """Stock `save_model`, then last.pt gains the exact-resume state and best.pt keeps only inference weights."""
        with self.staged_checkpoints():
            saved = super().save_model()
        staged_last, staged_best = checkpoint.staged(self.last), checkpoint.staged(self.best)
        ckpt = torch.load(staged_last, map_location="cpu", weights_only=False)
        torch.save({**ckpt, replay.RESUME_KEY: replay.capture(self, getattr(self, "rank_states", None))}, staged_last)
        checkpoint.commit(staged_last, self.last, keep_previous=True)
        if staged_best.exists():
            strip_optimizer(staged_best)
            checkpoint.commit(staged_best, self.best)
        return saved

    def final_eval(self):
        """Stock `final_eval` strips last.pt and best.pt in place and validates best; do it on staged copies."""
        if RANK not in {-1, 0}:
            return super().final_eval()  # only rank 0 touches the run folder
        staged_last, staged_best = checkpoint.staged(self.last), checkpoint.staged(self.best)
        if self.last.exists():
            ckpt = torch.load(self.last, map_location="cpu", weights_only=False)
            ckpt.pop(replay.RESUME_KEY, None)  # a finished run cannot resume
            torch.save(ckpt, staged_last)
        if self.best.exists():
            shutil.copyfile(self.best, staged_best)
        with self.staged_checkpoints():
            super().final_eval()
        for staged, path in ((staged_last, self.last), (staged_best, self.best)):
            if staged.exists():
                checkpoint.commit(staged, path)
        checkpoint.previous_of(self.last).unlink(missing_ok=True)  # a finished run has nothing to fall back to


class FuseValidator(DetectionValidator):
    def build_dataset(self, img_path, mode="val", batch=None):
        return build_paired_dataset(self.args, img_path, batch, self.data, mode, self.stride)

    def plot_val_samples(self, batch, ni):
        super().plot_val_samples(side_by_side(batch), ni)

    def plot_predictions(self, batch, preds, ni, max_det=None):
        width = batch["img"].shape[3]
        shift = torch.tensor([width, 0, width, 0], device=batch["img"].device)
        both = [
            {
                **p,
                **{k: torch.cat([p[k], p[k]]) for k in ("conf", "cls")},
                "bboxes": torch.cat([p["bboxes"], p["bboxes"] + shift]),
            }
            for p in preds
        ]
        super().plot_predictions(side_by_side(batch), both, ni, 2 * (max_det or self.args.max_det))


class FusePredictor(DetectionPredictor):
    """Predict on RGB paths; each image's IR partner is found by the dataset's pairing rule."""

    def preprocess(self, im):
        if not isinstance(im, torch.Tensor):
            # The stock loader read only the RGB files; read the pairs (already RGB-first, so no BGR flip).
            pairs = np.stack(
                self.pre_transform([load_pair(path, self.model.model.yaml["channels"]) for path in self.batch[0]])
            )
            im = torch.from_numpy(pairs).to(self.device).permute(0, 3, 1, 2).contiguous()
            return (im.half() if self.model.fp16 else im.float()) / 255
        return super().preprocess(im)


class FuseDetectionModel(DetectionModel):
    """DetectionModel built with the stacked channel count (stock `YOLO("x.yaml")` always builds 3)."""

    def __init__(self, cfg="yolov8n-fuse.yaml", ch=None, nc=None, verbose=True):
        cfg = cfg if isinstance(cfg, dict) else yaml_model_load(cfg)
        super().__init__(cfg, ch=ch or cfg.get("channels", DEFAULT_CHANNELS), nc=nc, verbose=verbose)


class YOLO(ultralytics.YOLO):
    """`ultralytics.YOLO` whose train, resume, val and predict use the paired classes above."""

    def __init__(self, model="yolov8n-fuse.yaml", verbose=False):
        super().__init__(model=model, task="detect", verbose=verbose)

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
