"""Stage `train`: fine-tune a ResNet on data/split/{train,val} with the report's recipe.

    python -m stages.train

Reads   data/split/train, data/split/val (ImageFolder), data/train_state/ (a killed run's state)
Writes  data/model/best.pt      the best val-loss epoch's weights, with arch, classes, crop size,
                                normalisation and recipe (loads with torch.load(weights_only=True))
        plots/train/            per-epoch history (DVCLive)
        metrics/train.json      the best epoch's figures, epochs run, speed, processes, precision
        data/train_state/       what a killed run resumes from (state.py; docs/reliability.md)
Params  seed, model.*, train.*

Focal loss, AdamW, CosineAnnealingLR stepped per epoch, early stopping on val loss (recipe.py).
Read top to bottom: :func:`main` -> :func:`run`, which calls :func:`load_data`, :func:`build`,
:func:`resume`, then per epoch :func:`train_one_epoch`, :func:`validate` and :func:`save_state`,
and at the end :func:`finish`.

`train.nproc` > 1 relaunches the stage under torchrun (DDP, distributed.py); the stage also runs
unchanged under a torchrun you start yourself, e.g. across nodes. On CUDA, `train.amp`,
`train.compile` and `train.pin_memory` apply; on other devices the stage runs fp32, eager.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from stages.common import dvc_internals, params
from stages.common.atomic import atomic_dir, write_json
from stages.common.errors import StageError, main_guard
from stages.common.batches import CropSet, batch_len, batches
from stages.common.inference import predict
from stages.common.model import (IMAGENET_MEAN, IMAGENET_STD, build_model, forward, freeze,
                                 frozen_prefix, pick_device, save_checkpoint, set_train_mode)
from stages.common.params import Params
from stages.common.progress import tracked
from stages.train import distributed as D
from stages.train import state as TS
from stages.train.augment import Augment
from stages.train.data import SPLIT_DIR, EpochOrder, prefetched, seed_everything
from stages.train.recipe import EarlyStopping, FocalLoss, cosine_scheduler

MODEL_DIR = Path("data/model")
LIVE_DIR = Path("plots/train")
METRICS_FILE = Path("metrics/train.json")
# What the checkpoint records as the recipe, in this order (the checkpoint's bytes follow it).
RECIPE_MODEL = ("arch", "weights", "zero_init_residual", "dropout", "trainable")
RECIPE_TRAIN = ("epochs", "batch_size", "lr", "t_max_ratio", "weight_decay", "focal_alpha",
                "focal_gamma", "patience", "num_workers", "device")
# How the run is spread and, on CUDA, its precision and speed-ups: not in the checkpoint's
# recipe (the same weights come out either way on one process), but in the resume fingerprint.
SCALE_TRAIN = ("nproc", "amp", "compile", "pin_memory")


def recipe(cfg: Params) -> dict:
    """The recipe the checkpoint carries: seed, model.* and the train.* that shape the weights."""
    return {"seed": cfg.seed, **{k: getattr(cfg.model, k) for k in RECIPE_MODEL},
            **{k: getattr(cfg.train, k) for k in RECIPE_TRAIN}}


def fingerprint_params(cfg: Params) -> dict:
    """Every param train reads, by dotted name (what a resumed state must have been run with)."""
    return {"seed": cfg.seed, **{f"model.{k}": getattr(cfg.model, k) for k in RECIPE_MODEL},
            **{f"train.{k}": getattr(cfg.train, k) for k in RECIPE_TRAIN + SCALE_TRAIN}}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: AMP runs on CUDA only (bf16 if the GPU has it)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ----- the run's parts -------------------------------------------------------------------------

@dataclass
class Data:
    train: CropSet         # data/split/train, decoded once
    val: CropSet           # data/split/val
    order: EpochOrder      # this rank's share of each epoch's seeded shuffle
    augment: Augment       # each epoch's flip and colour jitter, per crop
    val_indices: torch.Tensor  # this rank's share of val
    batch_size: int

    @property
    def classes(self) -> list[str]:
        return self.train.classes

    @property
    def size(self) -> int:
        return self.train.size

    def train_batches(self, epoch: int, device: torch.device):
        """This rank's augmented batches of epoch ``epoch``, prepared ahead of the step."""
        self.order.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        self.augment.set_epoch(epoch)
        items = batches(self.train, self.order.indices(), self.batch_size, device,
                        IMAGENET_MEAN, IMAGENET_STD, self.augment)
        return prefetched(items) if device.type == "cpu" else items

    @property
    def train_share(self) -> int:
        """Train crops this rank sees per epoch."""
        return len(self.order.sampler)

    def val_batches(self, device: torch.device):
        return batches(self.val, self.val_indices, self.batch_size, device, IMAGENET_MEAN,
                       IMAGENET_STD)


def load_data(cfg: Params, world: D.World, device: torch.device) -> Data:
    """Both splits decoded once. One process is a world of one: the same seeded order."""
    t = cfg.train
    workers = t.num_workers
    pin = t.pin_memory
    train_crops = CropSet.load(SPLIT_DIR / "train", device, workers, pin=pin)
    val_crops = CropSet.load(SPLIT_DIR / "val", device, workers, pin=pin)
    if train_crops.classes != val_crops.classes:
        raise StageError(f"class folders differ: train {train_crops.classes} vs val "
                         f"{val_crops.classes}")
    if train_crops.size != val_crops.size:
        raise StageError(f"crop sizes differ: train {train_crops.size} px vs val "
                         f"{val_crops.size} px; rerun extract_crops and split")
    val_indices = torch.tensor(D.shard_indices(len(val_crops), world), dtype=torch.long)
    return Data(train_crops, val_crops, EpochOrder(len(train_crops), cfg.seed, world.rank,
                                                   world.size),
                Augment(cfg.seed, len(train_crops), device, workers, IMAGENET_MEAN,
                        IMAGENET_STD), val_indices, t.batch_size)


class FrozenPrefixNet(nn.Module):
    """The model's forward (frozen prefix under no_grad) as a module, so DDP can wrap it: DDP
    syncs gradients only for calls through its own forward."""

    def __init__(self, model: nn.Module, n_frozen: int) -> None:
        super().__init__()
        self.model = model
        self.n_frozen = n_frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x, self.n_frozen)


def make_step(model, n_frozen, world, device, compile_: bool):
    """The training forward: plain for one process (the default, unchanged), DDP-wrapped for
    several, compiled on CUDA when asked."""
    if not world.distributed:
        step = partial(forward, model, n_frozen=n_frozen)
    else:
        ids = [device.index] if device.type == "cuda" else None
        step = DistributedDataParallel(FrozenPrefixNet(model, n_frozen), device_ids=ids)
    if compile_ and device.type == "cuda":
        step = torch.compile(step)
    return step


@dataclass
class Parts:
    model: nn.Module
    step: object
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler | None
    loss_fn: FocalLoss
    stopper: EarlyStopping
    amp: torch.dtype | None


def build(cfg: Params, data: Data, world: D.World, device: torch.device,
          state: dict | None) -> Parts:
    """Model (from the state's weights when resuming), forward, optimizer, schedule, loss."""
    m, t = cfg.model, cfg.train
    model = build_model(m.arch, len(data.classes), m.dropout, m.weights, m.zero_init_residual)
    freeze(model, m.trainable)
    model = model.to(device, memory_format=torch.channels_last)
    if state is not None:
        model.load_state_dict(state["model"])
    step = make_step(model, frozen_prefix(m.trainable), world, device, t.compile)
    amp = amp_dtype(t.amp, device)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=t.lr, weight_decay=t.weight_decay)
    return Parts(model, step, optimizer, cosine_scheduler(optimizer, t.epochs, t.t_max_ratio),
                 torch.amp.GradScaler("cuda") if amp == torch.float16 else None,
                 FocalLoss(t.focal_alpha, t.focal_gamma), EarlyStopping(t.patience), amp)


@dataclass
class Progress:
    """Where the run stands: epochs done, the last one to run, the best epoch and its weights."""
    done: int
    last: int
    best: dict = field(default_factory=dict)
    best_weights: dict | None = None
    history: list[dict] = field(default_factory=list)
    started: float = 0.0  # perf_counter() when the training began, earlier runs' time included


def load_state(cfg: Params, world: D.World, device: torch.device, log) -> tuple[dict, dict | None]:
    """(this run's fingerprint, the state to resume from or None). Every rank reads the state;
    all resume, or all start from scratch."""
    fp = TS.fingerprint(fingerprint_params(cfg), {s: SPLIT_DIR / s for s in ("train", "val")},
                        world.size, device)
    quiet = None if world.is_main else (lambda m: None)
    state = TS.load(fp, warn=quiet, note=quiet, clean=world.is_main)
    if not D.all_equal(state["epoch"] if state else 0, world, device):
        log(f"train: ignoring {TS.STATE_FILE}: the processes do not all see the same state "
            "(not on a shared disk?); training from scratch", file=sys.stderr, flush=True)
        state = None
    return fp, state


def resume(cfg: Params, parts: Parts, state: dict | None, world: D.World,
           device: torch.device, log, started: float) -> Progress:
    """The progress to continue from: a fresh one, or the state's (optimizer, schedule, early
    stopping, best epoch, history, RNG states restored). ``started``: when this run began (its
    time, decoding the crops included, adds to the resumed run's)."""
    epochs = cfg.train.epochs
    if state is None:
        return Progress(done=0, last=epochs, started=started)
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scheduler.load_state_dict(state["scheduler"])
    if parts.scaler is not None and state["scaler"] is not None:
        parts.scaler.load_state_dict(state["scaler"])
    parts.stopper.best = state["stopper"]["best"]
    parts.stopper.bad_epochs = state["stopper"]["bad_epochs"]
    done = state["epoch"]
    best_weights = state["best_model"] or {
        k: v.clone(memory_format=torch.contiguous_format) for k, v in state["model"].items()}
    if state["finished"]:
        log(f"train: {TS.STATE_FILE}: this run finished training after epoch {done}; "
            "writing its outputs without training", flush=True)
    else:
        log(f"train: resuming from {TS.STATE_FILE} after epoch {done} of {epochs}", flush=True)
    TS.set_rng_state(state["rng"][world.rank], device)  # last: nothing may draw after it
    return Progress(done=done, last=done if state["finished"] else epochs, best=state["best"],
                    best_weights=best_weights, history=state["history"],
                    started=started - state["seconds"])


# ----- one epoch -------------------------------------------------------------------------------

def train_one_epoch(model, step, batches, loss_fn, optimizer, device, trainable, world,
                    amp=None, scaler=None):
    """One pass over this rank's share of ``batches`` ((input, targets) on ``device``); ``step``
    is the (maybe DDP-wrapped) forward. Returns loss and accuracy over every rank's batches.

    Sums stay on the device and are read once, at the end: a read per batch would make the host
    wait for the GPU at every step."""
    set_train_mode(model, trainable)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for images, targets in batches:
        with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
            logits = step(images)
            loss = loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 only: scale the loss so small gradients do not underflow
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        total_loss += loss.detach().double() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
    total_loss, correct, seen = D.all_sum([total_loss.item(), correct.item(), seen], world,
                                          device)
    return total_loss / seen, correct / seen


def validate(model, batches, loss_fn, device, world=D.World()):
    """Val loss and accuracy over the whole val set; each rank's batches hold its shard, and
    sums of loss * n, correct and n are all-reduced, so the result does not depend on ranks."""
    logits, targets = predict(model, batches, device)
    if not world.distributed:
        loss = loss_fn(logits, targets).item()
        acc = (logits.argmax(1) == targets).float().mean().item()
        return loss, acc
    n = len(targets)
    loss_sum = loss_fn(logits, targets).item() * n if n else 0.0
    correct = (logits.argmax(1) == targets).sum().item() if n else 0
    loss_sum, correct, n = D.all_sum([loss_sum, correct, n], world, device)
    return loss_sum / n, correct / n


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as they are now, contiguous on the CPU (the checkpoint's layout)."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format).cpu()
            for k, v in model.state_dict().items()}


def save_state(fp: dict, epoch: int, parts: Parts, progress: Progress, world: D.World,
               device: torch.device) -> None:
    """The epoch's end, safe in data/train_state (rank 0 writes every rank's RNG states)."""
    rngs = D.gather_to_main(TS.rng_state(device), world)
    if not world.is_main:
        return
    best = progress.best
    TS.save({
        "fingerprint": fp, "finished": parts.stopper.should_stop or epoch == progress.last,
        "epoch": epoch, "model": {k: v.detach().cpu() for k, v in parts.model.state_dict().items()},
        "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
        "stopper": {"best": parts.stopper.best, "bad_epochs": parts.stopper.bad_epochs},
        "best": best, "history": progress.history, "rng": rngs,
        # the best epoch's weights, unless they are this epoch's ("model")
        "best_model": None if best.get("best_epoch") == epoch else progress.best_weights,
        "seconds": time.perf_counter() - progress.started,
    })


def open_live(history: list[dict]):
    """DVCLive on plots/train, with the epochs before a resume replayed: one run's plots."""
    from dvclive import Live

    # dvcyaml=False: the stage's outputs and plots are declared in the project's dvc.yaml.
    # In a fresh `git init` with no commit yet, DVCLive is opened without DVC's repo.
    opened = dvc_internals.open_live(lambda: Live(dir=str(LIVE_DIR), dvcyaml=False,
                                                  save_dvc_exp=False, report=None))
    for record in history:
        log_epoch(opened, record)
    return opened


def log_epoch(live, record: dict) -> None:
    if live is not None:
        for name, value in record.items():
            live.log_metric(name, value, plot=True)
        live.next_step()


# ----- the stage -------------------------------------------------------------------------------

@main_guard
def main() -> None:
    cfg = params.load()
    if cfg.train.nproc > 1 and not D.under_torchrun():
        raise SystemExit(D.relaunch_with_torchrun("stages.train", cfg.train.nproc))
    world, device = D.init(pick_device(cfg.train.device))
    try:
        run(cfg, world, device)
    finally:
        D.shutdown(world)


def run(cfg: Params, world: D.World, device: torch.device) -> None:
    # Each rank seeds its own global RNGs (dropout); DDP copies rank 0's initial weights to all.
    # Data order and augmentation are functions of (seed, epoch) alone, so a resumed run
    # continues exactly: see data.py and state.py.
    seed_everything(cfg.seed + world.rank)
    log = print if world.is_main else (lambda *a, **k: None)
    started = time.perf_counter()
    data = load_data(cfg, world, device)
    fp, state = load_state(cfg, world, device, log)
    parts = build(cfg, data, world, device, state)
    if device.type != "cuda" and (cfg.train.amp != "off" or cfg.train.compile):
        log(f"train: amp and compile apply on CUDA only; running fp32, eager on {device.type}")
    log(f"train: {cfg.model.arch} on {device}, {len(data.train)} train / {len(data.val)} val "
        f"crops, {data.size} px, classes {data.classes}, trainable {cfg.model.trainable}"
        + (f", {world.size} processes" if world.distributed else ""), flush=True)
    progress = resume(cfg, parts, state, world, device, log, started)
    # Only rank 0 writes; every rank sees the same reduced val loss, so all stop together.
    live = open_live(progress.history) if world.is_main else None
    with atomic_dir(MODEL_DIR) if world.is_main else contextlib.nullcontext() as out:
        for epoch in range(progress.done + 1, progress.last + 1):
            lr = parts.optimizer.param_groups[0]["lr"]
            shown = tracked(data.train_batches(epoch, device),
                            f"train epoch {epoch}/{progress.last}", data.train_share,
                            size=batch_len, enabled=world.is_main)
            tr_loss, tr_acc = train_one_epoch(parts.model, parts.step, shown,
                                              parts.loss_fn, parts.optimizer, device,
                                              cfg.model.trainable, world, parts.amp, parts.scaler)
            D.sync_buffers(parts.model, world)
            va_loss, va_acc = validate(parts.model, data.val_batches(device), parts.loss_fn,
                                       device, world)
            if not (math.isfinite(tr_loss) and math.isfinite(va_loss)):
                raise StageError(f"epoch {epoch}: the loss is not a number (train {tr_loss}, "
                                 f"val {va_loss}): training diverged; lower train.lr "
                                 f"(now {cfg.train.lr})")
            record = {"train/loss": tr_loss, "train/acc": tr_acc, "val/loss": va_loss,
                      "val/acc": va_acc, "lr": lr}
            progress.history.append(record)
            log_epoch(live, record)
            if parts.stopper.step(va_loss):
                progress.best = {"best_epoch": epoch, "best_val_loss": va_loss,
                                 "best_val_acc": va_acc, "train_loss": tr_loss,
                                 "train_acc": tr_acc}
                progress.best_weights = snapshot(parts.model) if world.is_main else None
            parts.scheduler.step()
            progress.done = epoch
            save_state(fp, epoch, parts, progress, world, device)
            # printed once the epoch is safe in data/train_state: a kill after it loses nothing
            log(f"[{epoch:02d}] train: [Loss: {tr_loss:.4f}, Acc: {tr_acc:.4f}] | "
                f"eval: [Loss: {va_loss:.4f}, Acc: {va_acc:.4f}]", flush=True)
            if parts.stopper.should_stop:
                log(f"early stop: no val-loss improvement in {cfg.train.patience} epochs",
                    flush=True)
                break
        if world.is_main:
            save_checkpoint(out / "best.pt", progress.best_weights, {
                "arch": cfg.model.arch, "classes": data.classes, "image_size": data.size,
                "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "dropout": cfg.model.dropout,
                "params": recipe(cfg), "epoch": progress.best["best_epoch"],
                "val_loss": progress.best["best_val_loss"],
                "val_acc": progress.best["best_val_acc"]})
    if world.is_main:
        finish(fp, data, parts, progress, world, device, live)


def finish(fp: dict, data: Data, parts: Parts, progress: Progress, world: D.World,
           device: torch.device, live) -> None:
    """metrics/train.json, the end of DVCLive's log, and the state shrunk to a marker."""
    seconds = time.perf_counter() - progress.started
    live.end()
    best = progress.best
    write_json(METRICS_FILE, {
        **best, "epochs_run": progress.done, "stopped_early": parts.stopper.should_stop,
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(len(data.train) * progress.done / seconds, 1),
        "device": device.type, "processes": world.size,
        "amp": str(parts.amp).replace("torch.", "") if parts.amp else "off",
    })
    # The outputs are in place: keep only a marker (DVC caches this out; kilobytes, not weights).
    TS.save_finished(fp, progress.done)
    print(f"best epoch {best['best_epoch']}: val loss {best['best_val_loss']:.4f}, "
          f"val acc {best['best_val_acc']:.4f} -> {MODEL_DIR / 'best.pt'}")
