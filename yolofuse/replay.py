"""Exact resume: what a run killed and re-run needs to replay the uninterrupted run bit for bit.

Three parts:
- Samples. The train sampler hands the dataset a `SampleKey`: the image, a seed that is a pure function of
  (run seed, epoch, image), and the image's batch. The dataset augments it under that seed, with the process's own
  RNG saved and put back, and Mosaic draws its partners from that batch only. So a sample's augmentation never depends
  on which worker loads it, on how many workers there are, or on whether they were restarted.
- Gradient accumulation. `Accumulation` keeps the batch index of the last optimizer step, which stock keeps in a
  local variable, and carries the open window's gradients across a resume.
- The rest of the state stock `last.pt` leaves out or rounds (`capture` / `restore`): FP32 live weights, FP32 EMA,
  the optimizer entries stock rounds to FP16 (SGD's momentum; it keeps Adam's moments in FP32) and the Python /
  NumPy / torch / CUDA RNG states. `checkpoint.add_member` stores it as more members of `last.pt`'s zip, next to
  stock's untouched bytes.
- Under DDP every rank keeps its own RNG streams; `gather_rank_rngs` hands them to rank 0, which saves them all.
"""

import math
import random
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, Sampler
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import convert_optimizer_state_dict_to_fp16, unwrap_model

from yolofuse import checkpoint

RESUME_MEMBER = "yolofuse_resume"  # the folder of last.pt's zip with the extra members (torch.load ignores it)


class SampleKey(NamedTuple):
    """What the train sampler passes to `PairedDataset.__getitem__` instead of a bare index."""

    index: int  # the image
    seed: int  # seeds its augmentation: a function of (run seed, epoch, index) only
    batch: tuple[int, ...]  # the images of its batch, in order: its mosaic partners come from these


class EpochShuffle(Sampler):
    """A random order that is a pure function of (seed, epoch), like DistributedSampler's, for one process.

    (A stock `RandomSampler` draws from a generator whose position a fresh process cannot reproduce.)
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class EpochKeys(Sampler):
    """One pass of `order` per epoch, as `SampleKey`s; `epoch` is the epoch of the next pass.

    The pass sets the order's epoch itself, when it starts: a loader with workers starts the next pass while the
    trainer is still in this epoch, before stock would call `set_epoch`.
    """

    def __init__(self, order, n_images: int, batch_size: int, seed: int):
        self.order, self.n_images, self.batch_size, self.seed, self.epoch = order, n_images, batch_size, seed, 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        if hasattr(self.order, "set_epoch"):
            self.order.set_epoch(epoch)
        indices = list(self.order)
        seeds = np.random.default_rng([self.seed, epoch]).integers(2**63, size=self.n_images)
        for start in range(0, len(indices), self.batch_size):
            batch = tuple(indices[start : start + self.batch_size])  # as the loader's BatchSampler cuts it
            for i in batch:
                yield SampleKey(i, int(seeds[i]), batch)


def _batch_sampler(loader):
    return loader.batch_sampler.sampler  # InfiniteDataLoader wraps its BatchSampler in a _RepeatSampler


def use_epoch_keys(loader, seed: int) -> None:
    """Make an Ultralytics train loader yield `SampleKey`s (its RandomSampler becomes an `EpochShuffle`)."""
    batch_sampler = _batch_sampler(loader)
    order = batch_sampler.sampler
    if isinstance(order, RandomSampler):
        order = EpochShuffle(len(order), seed)
    batch_sampler.sampler = EpochKeys(order, len(loader.dataset), batch_sampler.batch_size, seed)


def set_next_epoch(loader, epoch: int, extra_passes: int = 0) -> None:
    """The loader's next fresh pass is `epoch`'s (after a resume, or when a reset drops a pass its workers began).

    `extra_passes`: passes the run has drawn beyond one per epoch (each NaN recovery redoes its epoch on the loader's
    next pass, as stock does), so epoch e is pass e + extra_passes."""
    keys = _batch_sampler(loader).sampler
    if isinstance(keys, EpochKeys):
        keys.epoch = epoch + extra_passes


@contextmanager
def sample(dataset, key):
    """Load one sample of `dataset`: a bare index as stock does; a `SampleKey` seeded and with its batch as partners.

    The calling process's RNG states are saved and put back, so with no workers the trainer's own random streams are
    the same as with workers.
    """
    if not isinstance(key, SampleKey):
        yield key
        return
    if key.index == key.batch[0] or getattr(dataset, "mosaic_batch", None) != key.batch:  # a batch starts
        _hold_batch(dataset, key.batch)
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(key.seed)
    np.random.seed(key.seed % 2**32)
    torch.default_generator.manual_seed(key.seed)  # the CPU generator only: CUDA streams belong to the trainer
    try:
        yield key.index
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _hold_batch(dataset, batch: tuple[int, ...]) -> None:
    """Make the mosaic buffer exactly this batch: drop the images held for the previous one, load these in order.

    Stock Mosaic draws partners from `dataset.buffer`, the images this process loaded last, which depends on the
    worker. One worker loads a whole batch, so holding the batch costs no decode the batch would not do anyway.
    """
    for j in dataset.buffer:  # empty with a RAM cache, where `ims` holds every image and Mosaic draws from all
        dataset.ims[j] = dataset.im_hw0[j] = dataset.im_hw[j] = None
    dataset.buffer.clear()
    dataset.mosaic_batch = batch
    for j in batch:
        dataset.load_image(j)  # appends j to dataset.buffer


class Accumulation:
    """Where the run stands in its gradient-accumulation window, so a resumed run steps at the same batches.

    Stock `_do_train` steps when `ni - last_opt_step >= trainer.accumulate`, where `ni` is the batch index over the
    run and `last_opt_step` a local variable that starts at -1: after a resume it would step at the first batch, on
    that batch's gradient alone. This counts `ni` and the last step; a checkpoint saves them with the open window's
    gradients. After a resume, the first batch gets the gradients back, and until the first step `trainer.accumulate`
    is raised by `last_step + 1`, so that stock's test against -1 gives the answer it gives in the uninterrupted run.
    During warm-up stock rewrites `trainer.accumulate` before each batch, so the nominal value is read again then.

    `ni` is counted from the start of each epoch as stock's loop starts it (`epoch_started`, its on_train_epoch_start).
    Stock restarts an epoch after an out-of-memory retry or a NaN recovery: it then sets `last_opt_step` back to -1 and
    drops the gradients, and so does this.
    """

    def __init__(self):
        self.epoch, self.ni, self.last_step = None, -1, -1
        self.grads = None  # the saved open window, put back at the first batch after a resume
        self.offset = 0  # added to trainer.accumulate until the first step after a resume
        self.nominal = None  # trainer.accumulate as stock means it, while it is raised
        self.loader = None  # the train loader the epoch started with: stock builds a new one for an OOM retry

    def state(self, model) -> dict:
        grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        return {"last_step": self.last_step, "grads": grads}

    def load(self, state: dict) -> None:
        self.last_step, self.grads, self.offset = state["last_step"], state["grads"], state["last_step"] + 1

    def start_window(self, epoch: int, nb: int) -> None:
        """After a resume with another batch size, where the saved window means nothing: a window opens at `epoch`'s
        first batch, and the first step comes `accumulate` batches later (stock would step at once)."""
        self.load({"last_step": epoch * nb - 1, "grads": None})

    def epoch_started(self, trainer) -> None:
        if trainer.epoch == self.epoch:  # stock restarts this epoch: its last step is -1 again, gradients dropped
            if self.offset and trainer.train_loader is self.loader:  # a NaN recovery: stock left accumulate raised
                trainer.accumulate = self.nominal
            self.last_step, self.grads, self.offset, self.nominal = -1, None, 0, None
        self.epoch, self.loader = trainer.epoch, trainer.train_loader
        self.ni = trainer.epoch * len(trainer.train_loader) - 1

    def batch_started(self, trainer) -> None:
        self.ni += 1
        if self.grads is not None:
            params = dict(unwrap_model(trainer.model).named_parameters())
            for name, grad in self.grads.items():  # in the parameter's own memory layout, as backward makes it
                params[name].grad = torch.empty_like(params[name]).copy_(grad)
            self.grads, self.nominal = None, trainer.accumulate
        if self.offset:
            warmup = trainer._get_warmup_iterations(len(trainer.train_loader))
            if warmup and self.ni <= warmup:  # stock has just set this batch's value
                self.nominal = trainer.accumulate
            trainer.accumulate = self.nominal + self.offset

    def stepped(self, trainer) -> None:
        self.last_step = self.ni
        if self.offset:
            trainer.accumulate, self.offset = self.nominal, 0


def epoch_started(trainer) -> None:
    """Stock's on_train_epoch_start callback (a plain function, so DDP can pickle it with the trainer's callbacks).

    Stock restarts an epoch after an out-of-memory retry, on a loader it rebuilds (which the trainer points at the
    epoch's pass), or after a NaN recovery, on the same loader, which then serves its next pass: from then on the run
    draws one pass more than it has epochs, and a resume must know (`trainer.extra_passes`, saved by `capture`)."""
    accumulation = trainer.accumulation
    if trainer.epoch == accumulation.epoch and trainer.train_loader is accumulation.loader:
        trainer.extra_passes += 1
    accumulation.epoch_started(trainer)


def pack(tensors: dict) -> dict:
    """`{name: tensor}` as one flat tensor per dtype, plus each tensor's name, dtype and shape, in order.

    Each of the model's ~2,000 small tensors would be a zip member of its own in last.pt, costing more than its bytes;
    a few flat ones cost little more than the bytes (and, on a GPU, one copy to the host instead of thousands).
    """
    by_dtype = {}
    for t in tensors.values():
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    return {
        "layout": [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()],
        "flat": {dtype: _concatenate(parts) for dtype, parts in by_dtype.items()},
    }


def _concatenate(parts: list) -> torch.Tensor:
    if parts[0].device.type == "cpu":  # NumPy copies in one thread: torch's threads can stall when the CPU is busy
        return torch.from_numpy(np.concatenate([t.numpy() for t in parts]))
    return torch.cat(parts)


def unpack(packed: dict) -> dict:
    """The `{name: tensor}` that `pack` took (contiguous views of its flat tensors)."""
    offsets = dict.fromkeys(packed["flat"], 0)
    out = {}
    for name, dtype, shape in packed["layout"]:
        n, start = math.prod(shape), offsets[dtype]
        out[name] = packed["flat"][dtype][start : start + n].view(shape)
        offsets[dtype] = start + n
    return out


def rounded_by_stock(optimizer_state: dict) -> list:
    """The (param index, key) of the optimizer state entries stock's checkpoint rounds to FP16.

    Stock keeps some moments in FP32 (Adam's) and rounds others (SGD's momentum); stock's own converter is asked,
    on empty stand-ins of the same dtypes, so this follows whatever the installed version does.
    """
    dtypes = {(i, k): v.dtype for i, state in optimizer_state["state"].items() for k, v in state.items()}
    stand_ins = {"state": {}}
    for (i, k), dtype in dtypes.items():
        if isinstance(dtype, torch.dtype):
            stand_ins["state"].setdefault(i, {})[k] = torch.empty(0, dtype=dtype)
    converted = convert_optimizer_state_dict_to_fp16(stand_ins)["state"]
    return [(i, k) for i, state in converted.items() for k, v in state.items() if v.dtype != dtypes[i, k]]


def process_rng() -> dict:
    """This process's RNG streams: Python, NumPy, torch, and CUDA where there is one."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def gather_rank_rngs(world_size: int) -> list[dict]:
    """Every DDP rank's `process_rng`, in rank order; every rank must call it at the same point of the epoch."""
    rngs = [None] * world_size
    dist.all_gather_object(rngs, process_rng())
    return rngs


def capture(trainer, rank_rngs: list[dict] | None = None) -> dict:
    """What the next epoch depends on and stock's checkpoint leaves out or rounds, at the end of an epoch (packed).

    `rank_rngs`: under DDP, `gather_rank_rngs` from this epoch; a single process saves its own.
    """
    model = unwrap_model(trainer.model)
    optimizer = trainer.optimizer.state_dict()
    accumulation = trainer.accumulation.state(model)
    return {
        "model": pack(model.state_dict()),  # FP32 live weights (stock keeps only the FP16 EMA)
        "ema": pack(trainer.ema.ema.state_dict()),
        "optimizer": pack({(i, k): optimizer["state"][i][k] for i, k in rounded_by_stock(optimizer)}),
        "accumulation": {**accumulation, "grads": pack(accumulation["grads"])},
        "extra_passes": trainer.extra_passes,
        "rngs": rank_rngs or [process_rng()],
    }


def load_state(path, ckpt: dict | None = None) -> dict | None:
    """The exact training state in the checkpoint at `path` (stock's dict `ckpt` if already loaded); None if the
    checkpoint holds no exact-resume member.

    Keys: model and ema (state dicts), optimizer (stock's state dict with the entries it rounded put back in FP32),
    accumulation (last_step, grads by parameter name), extra_passes (train-loader passes beyond one per epoch) and
    rngs (each training process's RNG streams).
    """
    state = checkpoint.read_member(path, RESUME_MEMBER)
    if state is None:
        return None
    stock = (ckpt or checkpoint.load(path))["optimizer"]
    optimizer = {"param_groups": stock["param_groups"], "state": {i: dict(s) for i, s in stock["state"].items()}}
    for (i, k), v in unpack(state["optimizer"]).items():
        optimizer["state"][i][k] = v
    return {
        "model": unpack(state["model"]),
        "ema": unpack(state["ema"]),
        "optimizer": optimizer,
        "accumulation": {**state["accumulation"], "grads": unpack(state["accumulation"]["grads"])},
        "extra_passes": state.get("extra_passes", 0),  # a last.pt from before it was saved: none
        "rngs": state["rngs"],
    }


def saved_tensors(path) -> dict:
    """Every tensor of the last.pt at `path` that the next epoch depends on, by name: what "bit-identical" compares.

    Stock's FP16 EMA, and the exact state: FP32 weights, FP32 EMA, optimizer state, open-window gradients.
    """
    ckpt = checkpoint.load(path)
    state = load_state(path, ckpt)
    out = {f"ema_fp16.{k}": v for k, v in ckpt["ema"].state_dict().items()}
    out.update({f"model.{k}": v for k, v in state["model"].items()})
    out.update({f"ema.{k}": v for k, v in state["ema"].items()})
    out.update({f"grad.{k}": v for k, v in state["accumulation"]["grads"].items()})
    for i, entries in state["optimizer"]["state"].items():
        out.update({f"optimizer.{i}.{k}": v for k, v in entries.items() if torch.is_tensor(v)})
    return out


def restore(trainer, state: dict, start_epoch: int) -> None:
    """Put the state from `load_state` back into a trainer whose stock resume has just run."""
    unwrap_model(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    for saved, group in zip(state["optimizer"]["param_groups"], trainer.optimizer.param_groups):
        saved["fused"] = group.get("fused")  # the runtime device picks the kernel, as in stock resume
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.accumulation.load(state["accumulation"])
    trainer.extra_passes = state["extra_passes"]
    set_next_epoch(trainer.train_loader, start_epoch, trainer.extra_passes)
    ranks = state["rngs"]
    if len(ranks) != max(trainer.world_size, 1):
        LOGGER.warning(f"last.pt was saved by {len(ranks)} training process(es): the trainer's RNG streams restart")
        return
    rng = ranks[max(RANK, 0)]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
