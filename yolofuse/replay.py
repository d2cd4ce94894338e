"""Exact resume: the training state stock checkpoints leave out, so a resumed run replays the uninterrupted one.

Stock `last.pt` holds an FP16 EMA (the live model is rebuilt from it), FP16 optimizer moments, no RNG state, and
the train loader reshuffles from a constant seed. `capture` stores, under one extra key of `last.pt`, the FP32 live
weights, FP32 EMA, FP32 optimizer state, and for each process (each DDP rank) its Python / NumPy / torch RNG states
and mosaic buffer; the shuffle order comes from `EpochShuffle` (one process) or Ultralytics' DistributedSampler
(DDP), both pure functions of (seed, epoch). `restore` puts all of it back.
"""

import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import RandomSampler, Sampler
from ultralytics.utils import LOGGER, RANK
from ultralytics.utils.torch_utils import unwrap_model

RESUME_KEY = "resume_state"


class EpochShuffle(Sampler):
    """Random order seeded by (seed, pass number): one pass per epoch, so epoch E's order is known after a restart.

    (A stock `RandomSampler` draws from a generator whose position a fresh process cannot reproduce.)
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.passes = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.passes))
        self.passes += 1
        return iter(order.tolist())


def _batch_sampler(loader):
    return loader.batch_sampler.sampler  # InfiniteDataLoader wraps its BatchSampler in a _RepeatSampler


def use_epoch_shuffle(loader, seed: int) -> None:
    """Swap the shuffling sampler inside an Ultralytics train loader (single process; DDP samplers are per-epoch)."""
    batch_sampler = _batch_sampler(loader)
    if isinstance(batch_sampler.sampler, RandomSampler):
        batch_sampler.sampler = EpochShuffle(len(batch_sampler.sampler), seed)


def rank_state(trainer) -> dict:
    """What each process has of its own: its RNG streams (its augmentation draws) and its mosaic buffer."""
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {"rng": rng, "mosaic_buffer": list(getattr(trainer.train_loader.dataset, "buffer", []))}


def gather_rank_states(trainer) -> list[dict]:
    """Every DDP rank's `rank_state`, in rank order; every rank must call it at the same point of the epoch."""
    states = [None] * trainer.world_size
    dist.all_gather_object(states, rank_state(trainer))
    return states


def capture(trainer, ranks: list[dict] | None = None) -> dict:
    """Everything beyond the stock checkpoint that the next epoch depends on, at the end of an epoch.

    `ranks`: under DDP, `gather_rank_states` from this epoch; one process captures its own.
    """
    return {
        "model": unwrap_model(trainer.model).state_dict(),  # FP32 live weights (stock keeps only the FP16 EMA)
        "ema": trainer.ema.ema.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),  # FP32 moments (stock converts them to FP16)
        "ranks": ranks or [rank_state(trainer)],
    }


def restore(trainer, state: dict, start_epoch: int) -> None:
    """Put the captured state back into a trainer whose stock resume has just run."""
    unwrap_model(trainer.model).load_state_dict(state["model"])
    trainer.ema.ema.load_state_dict(state["ema"])
    for saved, group in zip(state["optimizer"]["param_groups"], trainer.optimizer.param_groups):
        saved["fused"] = group.get("fused")  # the runtime device picks the kernel, as in stock resume
    trainer.optimizer.load_state_dict(state["optimizer"])
    sampler = _batch_sampler(trainer.train_loader).sampler
    if isinstance(sampler, EpochShuffle):
        sampler.passes = start_epoch
    ranks = state["ranks"]
    if len(ranks) != max(trainer.world_size, 1):
        LOGGER.warning(f"last.pt was saved by {len(ranks)} training process(es): the augmentation RNG restarts")
        return
    own = ranks[max(RANK, 0)]
    dataset = trainer.train_loader.dataset
    if hasattr(dataset, "buffer"):  # mosaic draws partners from recently loaded images; reload them in order
        dataset.buffer.clear()
        for i in own["mosaic_buffer"]:
            dataset.load_image(i)
    rng = own["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])
