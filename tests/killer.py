"""Run the real train_dual.py in this process, with faults injected as the KILLER_* environment variables ask.

    python tests/killer.py NAME=value ...     # the same arguments train_dual.py takes

Used by test_train_dual.py as a subprocess; with no KILLER_* variable set it behaves exactly like train_dual.py.

KILLER_RECORD=<file>
    After FuseTrainer.resume_training, save the resumed trainer's start epoch, optimizer state, best fitness,
    early-stopping state, EMA update count, batch size and batches per epoch there.
KILLER_COMMIT=<mode>:<n>
    On the n-th commit of last.pt in this process, SIGKILL this process in the middle of it. <mode>:
      truncated  the staged file is cut to half its bytes (a write torn by the kill), nothing renamed yet;
      linked     the old last.pt is already hard-linked as last.prev.pt, the os.replace never happens.
KILLER_AFTER_SAVE=<n>
    SIGKILL this process right after the checkpoint of epoch n (1-based) is committed, before the final strip.
KILLER_LOG=<file>
    Append "step <unix time>" at the first training batch, "saving <epoch>" when a checkpoint save begins and
    "saved <epoch> <seconds>" when it is durable (used by bench/bench_resume.py to time start-up, to know what was
    saved before a kill, and whether the kill landed inside a checkpoint write).
KILLER_PAUSE_EPOCH=<k>  (with KILLER_READY=<file>, optional KILLER_GO=<file>)
    After the first optimizer step of 0-based epoch k: create KILLER_READY, then wait (for a signal from the test,
    or until KILLER_GO exists, then go on training normally). Gives a test a known mid-epoch instant to act at.
KILLER_OOM_AT=<n>
    The n-th training batch of this process (1-based) raises a CUDA out-of-memory error, once, after the batch is
    prepared: stock then halves the batch, rebuilds the loader and restarts the epoch (in a run's first epoch only).
KILLER_NAN_EPOCH=<k>
    After 0-based epoch k's validation, once, the loss reads NaN: stock then reloads last.pt and restarts the epoch.
KILLER_TRAIN=<name>=<value>,...
    Pass these Ultralytics train() arguments to a fresh run (a resume takes them from its checkpoint), e.g.
    optimizer=MuSGD, which optimizer=auto picks only for runs of over 10,000 iterations.
KILLER_DDP_PROBE=<folder>  (optional KILLER_DDP_PAUSE)
    Add tests/ddp_probe.py's callbacks to every model; Ultralytics pickles them into the DDP workers, where they
    record each rank's writes, resume state and PID in <folder>, and can pause a rank (see ddp_probe.py).
"""

import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import yolofuse  # noqa: E402, F401  (keeps Ultralytics offline before it is imported)
from yolofuse import checkpoint, engine  # noqa: E402


def die():
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def install_record(path: str) -> None:
    original = engine.FuseTrainer.resume_training

    def resume_training(self, ckpt):
        original(self, ckpt)
        state = {
            "start_epoch": self.start_epoch,
            "optimizer": self.optimizer.state_dict(),
            "best_fitness": self.best_fitness,
            "stopper": {"best_fitness": self.stopper.best_fitness, "best_epoch": self.stopper.best_epoch},
            "patience": self.stopper.patience,
            "ema_updates": self.ema.updates,
            "batch_size": self.batch_size,
            "batches": len(self.train_loader),
        }
        torch.save(state, path)

    engine.FuseTrainer.resume_training = resume_training


def install_commit_kill(spec: str) -> None:
    mode, _, n = spec.partition(":")
    assert mode in ("truncated", "linked"), spec
    n = int(n)
    original = checkpoint.commit
    seen = 0

    def commit(tmp, path, keep_previous=False):
        nonlocal seen
        if Path(path).name == "last.pt":
            seen += 1
            if seen == n:
                if mode == "truncated":
                    size = Path(tmp).stat().st_size
                    os.truncate(tmp, size // 2)
                    die()
                real_replace = os.replace

                def replace(src, dst, *args, **kwargs):
                    if Path(dst) == Path(path):
                        assert checkpoint.previous_of(Path(path)).exists()  # the link step did run
                        die()
                    return real_replace(src, dst, *args, **kwargs)

                os.replace = replace  # only this dying process sees it
        return original(tmp, path, keep_previous)

    checkpoint.commit = commit  # engine calls it as checkpoint.commit(...)


def install_after_save(n: int, log: str | None) -> None:
    original = engine.FuseTrainer.save_model

    def save_model(self):
        t = time.perf_counter()
        if log:
            with open(log, "a") as f:
                f.write(f"saving {self.epoch}\n")
        saved = original(self)
        if log:
            with open(log, "a") as f:
                f.write(f"saved {self.epoch} {time.perf_counter() - t}\n")
        if self.epoch + 1 == n:
            die()
        return saved

    engine.FuseTrainer.save_model = save_model


def install_first_step_log(log: str) -> None:
    original = engine.FuseTrainer.preprocess_batch

    def preprocess_batch(self, batch):
        if not getattr(self, "logged_first_step", False):
            self.logged_first_step = True
            with open(log, "a") as f:
                f.write(f"step {time.time()}\n")
        return original(self, batch)

    engine.FuseTrainer.preprocess_batch = preprocess_batch


def install_pause(epoch: int, ready: str, go: str | None) -> None:
    original = engine.FuseTrainer.optimizer_step
    paused = False

    def optimizer_step(self):
        nonlocal paused
        original(self)
        if self.epoch == epoch and not paused:
            paused = True
            Path(ready).write_text(str(os.getpid()))
            deadline = time.time() + 300
            while time.time() < deadline and not (go and Path(go).exists()):
                time.sleep(0.05)  # a SIGTERM / SIGINT raises KeyboardInterrupt here, as mid-batch

    engine.FuseTrainer.optimizer_step = optimizer_step


def install_oom(n: int) -> None:
    original = engine.FuseTrainer.preprocess_batch
    calls = 0

    def preprocess_batch(self, batch):
        nonlocal calls
        calls += 1
        batch = original(self, batch)
        if calls == n:
            raise RuntimeError("CUDA out of memory. (injected by tests/killer.py)")
        return batch

    engine.FuseTrainer.preprocess_batch = preprocess_batch


def install_nan(epoch: int) -> None:
    original = engine.FuseTrainer.validate
    done = False

    def validate(self):
        nonlocal done
        result = original(self)
        if self.epoch == epoch and not done:
            done = True
            self.loss = torch.tensor(float("nan"))  # what stock's NaN check reads
        return result

    engine.FuseTrainer.validate = validate


def install_train_args(spec: str) -> None:
    original = engine.YOLO.train
    extra = dict(item.split("=", 1) for item in spec.split(","))

    def train(self, **kwargs):
        return original(self, **kwargs if kwargs.get("resume") else {**kwargs, **extra})

    engine.YOLO.train = train


if os.environ.get("KILLER_RECORD"):
    install_record(os.environ["KILLER_RECORD"])
if os.environ.get("KILLER_COMMIT"):
    install_commit_kill(os.environ["KILLER_COMMIT"])
if os.environ.get("KILLER_AFTER_SAVE") or os.environ.get("KILLER_LOG"):
    install_after_save(int(os.environ.get("KILLER_AFTER_SAVE", 0)), os.environ.get("KILLER_LOG"))
if os.environ.get("KILLER_LOG"):
    install_first_step_log(os.environ["KILLER_LOG"])
if os.environ.get("KILLER_TRAIN"):
    install_train_args(os.environ["KILLER_TRAIN"])
if os.environ.get("KILLER_PAUSE_EPOCH"):
    install_pause(int(os.environ["KILLER_PAUSE_EPOCH"]), os.environ["KILLER_READY"], os.environ.get("KILLER_GO"))
if os.environ.get("KILLER_OOM_AT"):
    install_oom(int(os.environ["KILLER_OOM_AT"]))
if os.environ.get("KILLER_NAN_EPOCH"):
    install_nan(int(os.environ["KILLER_NAN_EPOCH"]))

if os.environ.get("KILLER_DDP_PROBE"):
    import ddp_probe  # noqa: E402  (from tests/, which the DDP workers also have on their sys.path)
    from ultralytics.utils.callbacks.base import default_callbacks  # noqa: E402

    for callback in ddp_probe.CALLBACKS:
        default_callbacks[callback.__name__].append(callback)  # every model made after this starts with them

sys.argv = [str(ROOT / "train_dual.py"), *sys.argv[1:]]
runpy.run_path(str(ROOT / "train_dual.py"), run_name="__main__")
