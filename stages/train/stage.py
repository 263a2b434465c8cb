"""Stage `train`: fine-tune model.arch on data/split/{train,val} with the report's recipe.

    python -m stages.train

Reads   data/split/train, data/split/val (ImageFolder), data/train_resume/ (a killed run's state)
Writes  data/model/best.pt      the best val-loss epoch's weights, with arch, classes, crop size,
                                normalisation and recipe (loads with torch.load(weights_only=True))
        plots/train/            per-epoch history (DVCLive)
        metrics/train.json      the best epoch's figures, epochs run, processes, precision
        metrics/speed/train.json  train time and images/s (timings apart from the scores)
        data/train_resume/      what a killed run resumes from, no DVC output (state.py)
Params  seed, model.*, train.* but train.num_workers and train.pin_memory (they change no byte)

Focal loss, AdamW, CosineAnnealingLR stepped per epoch, early stopping on val loss (recipe.py).
Read top to bottom: :func:`main` -> :func:`run`, which calls :func:`load_splits`, :func:`build`,
:func:`resume`, then per epoch :func:`epoch` (:func:`train_one_epoch`, :func:`validate`),
:func:`advance` and :func:`save_state`, and at the end :func:`save_best` and :func:`finish`.
Each helper takes the params section or the values it reads, not the whole params.

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

from stages.common.config import params
from stages.common.config.archs import family_of
from stages.common.config.params import Params
from stages.common.config.paths import (CHECKPOINT, MODEL_DIR, SPLIT_DIR, TRAIN_METRICS,
                                        TRAIN_PLOTS, TRAIN_SPEED, TRAIN_SPLIT, VAL_SPLIT)
from stages.common.inference.batches import CropSet, batch_len, batches
from stages.common.inference.logits import predict
from stages.common.infra import dvc_internals
from stages.common.infra.atomic import atomic_dir, clean_dead_leftovers, write_json
from stages.common.infra.errors import (INTERRUPTED_EXIT, Interrupted, StageError,
                                         main_guard)
from stages.common.infra.progress import tracked
from stages.common.model.build import (build_model, forward, freeze, frozen_prefix, normalisation,
                                       set_train_mode)
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.model.device import pick_device
from stages.train import distributed, state
from stages.train.augment import Augment
from stages.train.data import EpochOrder, prefetched, seed_everything
from stages.train.distributed import World
from stages.train.recipe import EarlyStopping, FocalLoss, cosine_scheduler

# What the checkpoint records as the recipe, in this order (the checkpoint's bytes follow it).
# Not train.num_workers or train.pin_memory: they change no byte train writes
# (params.NO_OUTPUT), so they are neither here, nor in the resume fingerprint, nor DVC params.
RECIPE_MODEL = ("arch", "weights", "zero_init_residual", "dropout", "trainable")
RECIPE_TRAIN = ("epochs", "batch_size", "lr", "t_max_ratio", "weight_decay", "focal_alpha",
                "focal_gamma", "patience", "device")
# How the run is spread and, on CUDA, its precision and compilation: not in the checkpoint's
# recipe, but in the resume fingerprint. The fingerprint's params are exactly train's DVC params
# (tests/test_layout.py).
SCALE_TRAIN = ("nproc", "amp", "compile")
# The augmentation beyond the report's: in the checkpoint's recipe only when it is not the
# report's (augment_conditions only with augment: conditions, the one that reads it), so the
# report's checkpoint keeps its bytes; always in the resume fingerprint.
AUGMENT_TRAIN = ("augment", "augment_conditions")


def recipe(cfg: Params) -> dict:
    """The recipe the checkpoint carries: seed, model.* and the train.* that shape the weights
    (train.augment and its conditions when they are not the report's; stage conditions reads
    them to tell trained-on conditions from held-out ones)."""
    out = {"seed": cfg.seed, **{k: getattr(cfg.model, k) for k in RECIPE_MODEL},
           **{k: getattr(cfg.train, k) for k in RECIPE_TRAIN}}
    if cfg.train.augment != "report":
        out["augment"] = cfg.train.augment
    if cfg.train.augment == "conditions":
        out["augment_conditions"] = list(cfg.train.augment_conditions)
    return out


def fingerprint_params(cfg: Params) -> dict:
    """Every param that can change what train writes, by dotted name (what a resumed state must
    have been run with): the stage's DVC params."""
    return {"seed": cfg.seed, **{f"model.{k}": getattr(cfg.model, k) for k in RECIPE_MODEL},
            **{f"train.{k}": getattr(cfg.train, k)
               for k in RECIPE_TRAIN + SCALE_TRAIN + AUGMENT_TRAIN}}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: AMP runs on CUDA only (bf16 if the GPU has it)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


# ----- the run's parts -------------------------------------------------------------------------

@dataclass
class Splits:
    """The train and val crops as this rank draws them: decoded once, then batched per epoch."""
    train: CropSet         # data/split/train, decoded once
    val: CropSet           # data/split/val
    order: EpochOrder      # this rank's share of each epoch's seeded shuffle
    augment: Augment       # each epoch's train.augment step, flip and colour jitter, per crop
    val_indices: torch.Tensor  # this rank's share of val
    batch_size: int
    norm: tuple[list[float], list[float]]  # (mean, std) the arch's weights expect

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
                        *self.norm, self.augment)
        return prefetched(items) if device.type == "cpu" and self.augment.ahead else items

    @property
    def train_share(self) -> int:
        """Train crops this rank sees per epoch."""
        return len(self.order.sampler)

    def val_batches(self, device: torch.device):
        return batches(self.val, self.val_indices, self.batch_size, device, *self.norm)


def load_splits(train: params.Train, seed: int, world: World, device: torch.device,
                arch: str) -> Splits:
    """Both splits decoded once, normalised as ``arch``'s weights expect. One process is a world
    of one: the same seeded order."""
    workers = train.num_workers
    train_crops = CropSet.load(TRAIN_SPLIT, device, workers, pin=train.pin_memory)
    val_crops = CropSet.load(VAL_SPLIT, device, workers, pin=train.pin_memory)
    if train_crops.classes != val_crops.classes:
        raise StageError(f"class folders differ: train {train_crops.classes} vs val "
                         f"{val_crops.classes}")
    if train_crops.size != val_crops.size:
        raise StageError(f"crop sizes differ: train {train_crops.size} px vs val "
                         f"{val_crops.size} px; rerun extract_crops and split")
    val_indices = torch.tensor(distributed.shard_indices(len(val_crops), world), dtype=torch.long)
    order = EpochOrder(len(train_crops), seed, world.rank, world.size)
    norm = normalisation(arch)
    augment = Augment(seed, len(train_crops), device, workers, *norm, augment=train.augment,
                      conditions=train.augment_conditions)
    return Splits(train_crops, val_crops, order, augment, val_indices, train.batch_size, norm)


class FrozenPrefixNet(nn.Module):
    """The model's forward (frozen prefix under no_grad) as a module, so DDP can wrap it: DDP
    syncs gradients only for calls through its own forward."""

    def __init__(self, model: nn.Module, n_frozen: int, arch: str) -> None:
        super().__init__()
        self.model = model
        self.n_frozen = n_frozen
        self.arch = arch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x, self.n_frozen, arch=self.arch)


def make_step(model, arch: str, n_frozen, world, device, compile_: bool):
    """The training forward: plain for one process (the default, unchanged), DDP-wrapped for
    several, compiled on CUDA when asked."""
    if not world.distributed:
        step = partial(forward, model, n_frozen=n_frozen, arch=arch)
    else:
        ids = [device.index] if device.type == "cuda" else None
        step = DistributedDataParallel(FrozenPrefixNet(model, n_frozen, arch), device_ids=ids)
    if compile_ and device.type == "cuda":
        step = torch.compile(step)
    return step


@dataclass
class Learner:
    """What a training pass uses, in one object so :func:`train_one_epoch` (and the benchmark)
    take it whole: ``step`` is the model's (maybe DDP-wrapped, compiled) forward, ``trainable``
    the modules that train, ``amp`` the CUDA autocast dtype and ``scaler`` fp16's GradScaler."""
    model: nn.Module
    step: object
    optimizer: torch.optim.Optimizer
    loss_fn: FocalLoss
    trainable: list[str]
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None


@dataclass
class Parts:
    """The learner, and what steers the run from one epoch to the next."""
    learner: Learner
    scheduler: object
    stopper: EarlyStopping


def build(model_cfg: params.Model, train: params.Train, n_classes: int, world: World,
          device: torch.device, saved: dict | None) -> Parts:
    """Model (from the saved state's weights when resuming), forward, optimizer, schedule, loss."""
    model = build_model(model_cfg.arch, n_classes, model_cfg.dropout, model_cfg.weights,
                        model_cfg.zero_init_residual)
    freeze(model, model_cfg.trainable)
    model = model.to(device, memory_format=torch.channels_last)
    if saved is not None:
        model.load_state_dict(saved["model"])
    step = make_step(model, model_cfg.arch, frozen_prefix(model_cfg.arch, model_cfg.trainable),
                     world, device, train.compile)
    amp = amp_dtype(train.amp, device)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=train.lr, weight_decay=train.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    learner = Learner(model, step, optimizer, FocalLoss(train.focal_alpha, train.focal_gamma),
                      model_cfg.trainable, amp, scaler)
    return Parts(learner, cosine_scheduler(optimizer, train.epochs, train.t_max_ratio),
                 EarlyStopping(train.patience))


@dataclass
class Standing:
    """Where the run stands: epochs done, the last one to run, the best epoch and its weights,
    the history DVCLive's plots are drawn from: what a saved state restores."""
    done: int
    last: int
    best: dict = field(default_factory=dict)
    best_weights: dict | None = None
    history: list[dict] = field(default_factory=list)
    started: float = 0.0  # perf_counter() when the training began, earlier runs' time included


def run_fingerprint(cfg: Params, world: World, device: torch.device) -> dict:
    """What a state must have been written with to be resumed: params, processes, code, data."""
    return state.fingerprint(fingerprint_params(cfg),
                             {s: SPLIT_DIR / s for s in ("train", "val")}, world.size, device)


def load_state(fp: dict, world: World, device: torch.device, log) -> dict | None:
    """The saved state to resume from, or None. Every rank reads it; all resume, or all start
    from scratch."""
    quiet = None if world.is_main else (lambda m: None)
    saved = state.load(fp, warn=quiet, note=quiet, clean=world.is_main)
    if not distributed.all_equal(saved["epoch"] if saved else 0, world, device):
        log(f"train: ignoring {state.state_file(fp)}: the processes do not all see the same state "
            "(not on a shared disk?); training from scratch", file=sys.stderr, flush=True)
        saved = None
    return saved


def resume(epochs: int, parts: Parts, saved: dict | None, world: World, device: torch.device,
           log, started: float, path: Path) -> Standing:
    """The standing to continue from: a fresh one, or the saved state's (optimizer, schedule,
    early stopping, best epoch, history, RNG states restored). ``started``: when this run began
    (its time, decoding the crops included, adds to the resumed run's); ``path``: the state's
    file, for the log."""
    if saved is None:
        return Standing(done=0, last=epochs, started=started)
    parts.learner.optimizer.load_state_dict(saved["optimizer"])
    parts.scheduler.load_state_dict(saved["scheduler"])
    if parts.learner.scaler is not None and saved["scaler"] is not None:
        parts.learner.scaler.load_state_dict(saved["scaler"])
    parts.stopper.best = saved["stopper"]["best"]
    parts.stopper.bad_epochs = saved["stopper"]["bad_epochs"]
    done = saved["epoch"]
    best_weights = saved["best_model"] or {
        k: v.clone(memory_format=torch.contiguous_format) for k, v in saved["model"].items()}
    if saved["finished"]:
        log(f"train: {path}: this run finished training after epoch {done}; "
            "writing its outputs without training", flush=True)
    else:
        log(f"train: resuming from {path} after epoch {done} of {epochs}", flush=True)
    state.set_rng_state(saved["rng"][world.rank], device)  # last: nothing may draw after it
    return Standing(done=done, last=done if saved["finished"] else epochs, best=saved["best"],
                    best_weights=best_weights, history=saved["history"],
                    started=started - saved["seconds"])


# ----- one epoch -------------------------------------------------------------------------------

def train_one_epoch(learner: Learner, batches, world: World, device: torch.device):
    """One pass over this rank's share of ``batches`` ((input, targets) on ``device``). Returns
    loss and accuracy over every rank's batches.

    Sums stay on the device and are read once, at the end: a read per batch would make the host
    wait for the GPU at every step."""
    set_train_mode(learner.model, learner.trainable)
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    seen = 0
    for images, targets in batches:
        logits, loss = train_step(learner, images, targets, device)
        total_loss += loss.detach().double() * len(targets)
        correct += (logits.argmax(1) == targets).sum()
        seen += len(targets)
    total_loss, correct, seen = distributed.all_sum([total_loss.item(), correct.item(), seen],
                                                    world, device)
    return total_loss / seen, correct / seen


def train_step(learner: Learner, images: torch.Tensor, targets: torch.Tensor,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on a batch; its logits and loss."""
    amp, scaler, optimizer = learner.amp, learner.scaler, learner.optimizer
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        logits = learner.step(images)
        loss = learner.loss_fn(logits.float(), targets)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:  # fp16 only: scale the loss so small gradients do not underflow
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return logits, loss


def validate(model, batches, loss_fn, device, world=World()):
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
    loss_sum, correct, n = distributed.all_sum([loss_sum, correct, n], world, device)
    return loss_sum / n, correct / n


def epoch(n: int, last: int, splits: Splits, learner: Learner, world: World,
          device: torch.device) -> dict:
    """Epoch ``n`` of ``last``: a training pass, then val; its history record (the lr is the one
    it trained with, so it is read before the schedule steps)."""
    lr = learner.optimizer.param_groups[0]["lr"]
    shown = tracked(splits.train_batches(n, device), f"train epoch {n}/{last}",
                    splits.train_share, size=batch_len, enabled=world.is_main)
    tr_loss, tr_acc = train_one_epoch(learner, shown, world, device)
    distributed.sync_buffers(learner.model, world)
    va_loss, va_acc = validate(learner.model, splits.val_batches(device), learner.loss_fn,
                               device, world)
    return {"train/loss": tr_loss, "train/acc": tr_acc, "val/loss": va_loss, "val/acc": va_acc,
            "lr": lr}


def check_finite(n: int, record: dict, lr: float) -> None:
    """Stop on a diverged run before its epoch is kept: NaN weights would be saved as the best."""
    tr_loss, va_loss = record["train/loss"], record["val/loss"]
    if not (math.isfinite(tr_loss) and math.isfinite(va_loss)):
        raise StageError(f"epoch {n}: the loss is not a number (train {tr_loss}, "
                         f"val {va_loss}): training diverged; lower train.lr (now {lr})")


def advance(n: int, record: dict, parts: Parts, standing: Standing, world: World) -> None:
    """Epoch ``n`` into the standing: its record, its figures and weights when val loss is a new
    best (rank 0 only keeps weights: it alone writes), then the schedule's step."""
    standing.history.append(record)
    if parts.stopper.step(record["val/loss"]):
        standing.best = {"best_epoch": n, "best_val_loss": record["val/loss"],
                         "best_val_acc": record["val/acc"], "train_loss": record["train/loss"],
                         "train_acc": record["train/acc"]}
        standing.best_weights = snapshot(parts.learner.model) if world.is_main else None
    parts.scheduler.step()
    standing.done = n


def epoch_line(n: int, record: dict) -> str:
    return (f"[{n:02d}] train: [Loss: {record['train/loss']:.4f}, "
            f"Acc: {record['train/acc']:.4f}] | eval: [Loss: {record['val/loss']:.4f}, "
            f"Acc: {record['val/acc']:.4f}]")


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as they are now, contiguous on the CPU (the checkpoint's layout)."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format).cpu()
            for k, v in model.state_dict().items()}


def save_state(fp: dict, n: int, parts: Parts, standing: Standing, world: World,
               device: torch.device) -> None:
    """Epoch ``n``'s end, safe in its state file (rank 0 writes every rank's RNG states)."""
    rngs = distributed.gather_to_main(state.rng_state(device), world)
    if not world.is_main:
        return
    best, learner = standing.best, parts.learner
    state.save({
        "fingerprint": fp, "finished": parts.stopper.should_stop or n == standing.last,
        "epoch": n, "model": {k: v.detach().cpu() for k, v in learner.model.state_dict().items()},
        "optimizer": learner.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
        "scaler": learner.scaler.state_dict() if learner.scaler is not None else None,
        "stopper": {"best": parts.stopper.best, "bad_epochs": parts.stopper.bad_epochs},
        "best": best, "history": standing.history, "rng": rngs,
        # the best epoch's weights, unless they are this epoch's ("model")
        "best_model": None if best.get("best_epoch") == n else standing.best_weights,
        "seconds": time.perf_counter() - standing.started,
    }, state.state_file(fp))


def open_live(history: list[dict]):
    """DVCLive on plots/train, with the epochs before a resume replayed: one run's plots."""
    from dvclive import Live

    # dvcyaml=False: the stage's outputs and plots are declared in the project's dvc.yaml.
    # In a fresh `git init` with no commit yet, DVCLive is opened without DVC's repo.
    opened = dvc_internals.open_live(lambda: Live(dir=str(TRAIN_PLOTS), dvcyaml=False,
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
    clean_dead_leftovers()
    cfg = params.load()
    if cfg.train.nproc > 1 and not distributed.under_torchrun():
        raise SystemExit(distributed.relaunch_with_torchrun("stages.train", cfg.train.nproc))
    world, device = distributed.init(pick_device(cfg.train.device))
    try:
        run(cfg, world, device)
    finally:
        distributed.shutdown(world)


def run(cfg: Params, world: World, device: torch.device) -> None:
    # Each rank seeds its own global RNGs (dropout); DDP copies rank 0's initial weights to all.
    # Data order and augmentation are functions of (seed, epoch) alone, so a resumed run
    # continues exactly: see data.py and state.py.
    seed_everything(cfg.seed + world.rank)
    log = print if world.is_main else (lambda *a, **k: None)
    started = time.perf_counter()
    splits = load_splits(cfg.train, cfg.seed, world, device, cfg.model.arch)
    fp = run_fingerprint(cfg, world, device)
    path = state.state_file(fp)
    saved = load_state(fp, world, device, log)
    kept = saved["epoch"] if saved else 0  # the last epoch safe on disk
    try:
        parts = build(cfg.model, cfg.train, len(splits.classes), world, device, saved)
        announce(cfg, splits, world, device, log)
        standing = resume(cfg.train.epochs, parts, saved, world, device, log, started, path)
        # Only rank 0 writes; every rank sees the same reduced val loss, so all stop together.
        live = open_live(standing.history) if world.is_main else None
        with atomic_dir(MODEL_DIR) if world.is_main else contextlib.nullcontext() as out:
            for n in range(standing.done + 1, standing.last + 1):
                record = epoch(n, standing.last, splits, parts.learner, world, device)
                check_finite(n, record, cfg.train.lr)
                log_epoch(live, record)
                advance(n, record, parts, standing, world)
                save_state(fp, n, parts, standing, world, device)
                kept = n
                # printed once the epoch is safe in its state file: a kill after it loses nothing
                log(epoch_line(n, record), flush=True)
                if parts.stopper.should_stop:
                    log(f"early stop: no val-loss improvement in {cfg.train.patience} epochs",
                        flush=True)
                    break
            if world.is_main:
                save_best(out / CHECKPOINT.name, cfg, splits, standing)
        if world.is_main:
            finish(fp, len(splits.train), parts, standing, world, device, live)
    except KeyboardInterrupt:
        if not world.is_main:  # rank 0 says it once
            raise SystemExit(INTERRUPTED_EXIT) from None
        raise Interrupted(interrupted_line(kept, cfg.train.epochs, path)) from None


def interrupted_line(kept: int, epochs: int, path: Path) -> str:
    """What Ctrl-C left and what the same command does next (main_guard prints it)."""
    if kept == 0:
        return ("train stopped before its first epoch was saved; rerun the same command "
                "(dvc repro, or the same dvc exp run) to start it again")
    return (f"train stopped; epoch {kept} of {epochs} is saved in {path}: rerun the same command "
            "(dvc repro, or the same dvc exp run) and train resumes from it")


def announce(cfg: Params, splits: Splits, world: World, device: torch.device, log) -> None:
    """What is about to train, on what: the first lines of the stage's log."""
    if device.type != "cuda" and (cfg.train.amp != "off" or cfg.train.compile):
        log(f"train: amp and compile apply on CUDA only; running fp32, eager on {device.type}")
    if cfg.model.zero_init_residual and not family_of(cfg.model.arch).zero_init:
        log(f"train: model.zero_init_residual applies to resnet only; {cfg.model.arch} starts "
            "from torchvision's own initialisation")
    log(f"train: {cfg.model.arch} on {device}, {len(splits.train)} train / {len(splits.val)} val "
        f"crops, {splits.size} px, classes {splits.classes}, trainable {cfg.model.trainable}"
        + (f", {world.size} processes" if world.distributed else ""), flush=True)


def save_best(path: Path, cfg: Params, splits: Splits, standing: Standing) -> None:
    """The best epoch's weights with what a loader needs to use them (arch, classes, crop size,
    normalisation) and the recipe that made them: the checkpoint is read without params.yaml."""
    best = standing.best
    save_checkpoint(path, standing.best_weights, ModelMeta(
        arch=cfg.model.arch, classes=splits.classes, image_size=splits.size,
        mean=splits.norm[0], std=splits.norm[1], dropout=cfg.model.dropout,
        params=recipe(cfg), epoch=best["best_epoch"], val_loss=best["best_val_loss"],
        val_acc=best["best_val_acc"]))


def finish(fp: dict, n_train: int, parts: Parts, standing: Standing, world: World,
           device: torch.device, live) -> None:
    """metrics/train.json, the end of DVCLive's log, and the state removed.
    ``n_train``: train crops per epoch, for the speed."""
    seconds = time.perf_counter() - standing.started
    live.end()
    best, amp = standing.best, parts.learner.amp
    # the timings apart from the scores: they swing with the machine's load (paths.SPEED_FILES)
    write_json(TRAIN_SPEED, {
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(n_train * standing.done / seconds, 1),
        "device": device.type, "processes": world.size})
    write_json(TRAIN_METRICS, {
        **best, "epochs_run": standing.done, "stopped_early": parts.stopper.should_stop,
        "device": device.type, "processes": world.size,
        "amp": str(amp).replace("torch.", "") if amp else "off",
    })
    # The outputs are in place (DVC caches them, and its run cache brings them back for these
    # params): the state, hundreds of MB for a large arch, has nothing left to resume.
    state.remove(state.state_file(fp))
    print(f"best epoch {best['best_epoch']}: val loss {best['best_val_loss']:.4f}, "
          f"val acc {best['best_val_acc']:.4f} -> {CHECKPOINT}")
