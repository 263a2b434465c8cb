"""Stage `train`: fine-tune a ResNet on data/split/{train,val} with the report's recipe.

Focal loss, AdamW, CosineAnnealingLR (T_max = epochs / 2), early stopping on val loss; the
checkpoint of the best val-loss epoch goes to data/model/best.pt. Per-epoch history is logged
with DVCLive to plots/train/, the best epoch's figures to metrics/train.json.

`train.nproc` > 1 relaunches the stage under torchrun (DDP); the stage also runs unchanged under
a torchrun you start yourself, e.g. across nodes. On CUDA, `train.amp`, `train.compile` and
`train.pin_memory` apply; on other devices the stage runs fp32, eager.
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Subset
from torch.utils.data.distributed import DistributedSampler
from torchvision.datasets import ImageFolder

from stages.common import distributed as D
from stages.common import params as P
from stages.common import schema
from stages.common import train_state as TS
from stages.common.atomic import atomic_dir, write_json
from stages.common.inference import predict, to_device
from stages.common.model import (IMAGENET_MEAN, IMAGENET_STD, build_model, forward,
                                 freeze, frozen_prefix, pick_device, save_checkpoint,
                                 set_train_mode)
from stages.common.params import StageError
from stages.common.training import (EarlyStopping, EpochIndices, EpochSeeded, FocalLoss,
                                    cosine_scheduler, seed_everything, seed_worker)
from stages.common.transforms import eval_transform, train_transform

SPLIT_DIR = Path("data/split")
MODEL_DIR = Path("data/model")
LIVE_DIR = Path("plots/train")
METRICS_FILE = Path("metrics/train.json")


def read_config(p: dict) -> dict:
    """The recipe this stage trains with (every key is checked by stages.common.schema)."""
    v = schema.check_all(p)
    return {
        "seed": v["seed"],
        **{k: v[f"model.{k}"] for k in ("arch", "weights", "zero_init_residual", "dropout",
                                         "trainable")},
        **{k: v[f"train.{k}"] for k in ("epochs", "batch_size", "lr", "t_max_ratio",
                                         "weight_decay", "focal_alpha", "focal_gamma",
                                         "patience", "num_workers", "device")},
    }


def read_scale_config(p: dict) -> dict:
    """How the run is spread and, on CUDA, its precision and speed-ups. Kept out of the
    checkpoint's recipe (read_config) so the default run's checkpoint bytes stay as they were;
    metrics/train.json records the processes and precision a run used."""
    v = schema.check_all(p)
    return {k: v[f"train.{k}"] for k in ("nproc", "amp", "compile", "pin_memory")}


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32: AMP runs on CUDA only (bf16 if the GPU has it)."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


def load_folder(split: str, transform) -> ImageFolder:
    path = SPLIT_DIR / split
    if not path.is_dir():
        raise StageError(f"{path}: not found; run the split stage first")
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise StageError(f"{path}: no usable images ({exc})") from None


def image_size(ds: ImageFolder) -> int:
    with Image.open(ds.samples[0][0]) as im:
        w, h = im.size
    if w != h:
        raise StageError(f"{ds.samples[0][0]}: crops must be square, got {w}x{h}")
    return w


def make_loader(ds, cfg: dict, shuffle: bool, gen: torch.Generator | None,
                device: torch.device, sampler=None) -> DataLoader:
    workers = cfg["num_workers"]
    if gen is None:
        # The loader draws its workers' base seed from this private generator, not from torch's
        # global RNG, whose stream (dropout) a resumed run must continue exactly.
        gen = torch.Generator().manual_seed(cfg.get("seed", 0))
    return DataLoader(ds, batch_size=cfg["batch_size"], shuffle=shuffle, generator=gen,
                      sampler=sampler, num_workers=workers, worker_init_fn=seed_worker,
                      persistent_workers=workers > 0,
                      pin_memory=cfg.get("pin_memory", True) and device.type == "cuda")


class FrozenPrefixNet(nn.Module):
    """The model's forward (frozen prefix under no_grad) as a module, so DDP can wrap it: DDP
    syncs gradients only for calls through its own forward."""

    def __init__(self, model: nn.Module, n_frozen: int) -> None:
        super().__init__()
        self.model = model
        self.n_frozen = n_frozen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return forward(self.model, x, self.n_frozen)


def train_one_epoch(model, step, loader, loss_fn, optimizer, device, trainable, world,
                    amp=None, scaler=None):
    """One pass over this rank's share; ``step`` is the (maybe DDP-wrapped) forward.
    Returns loss and accuracy over every rank's batches."""
    set_train_mode(model, trainable)
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images, targets = to_device(images, device), targets.to(device, non_blocking=True)
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
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    total_loss, correct, seen = D.all_sum([total_loss, correct, seen], world, device)
    return total_loss / seen, correct / seen


def validate(model, loader, loss_fn, device, world=D.World()):
    """Val loss and accuracy over the whole val set; each rank's loader holds its shard, and
    sums of loss * n, correct and n are all-reduced, so the result does not depend on ranks."""
    logits, targets = predict(model, loader, device)
    if not world.distributed:
        loss = loss_fn(logits, targets).item()
        acc = (logits.argmax(1) == targets).float().mean().item()
        return loss, acc
    n = len(targets)
    loss_sum = loss_fn(logits, targets).item() * n if n else 0.0
    correct = (logits.argmax(1) == targets).sum().item() if n else 0
    loss_sum, correct, n = D.all_sum([loss_sum, correct, n], world, device)
    return loss_sum / n, correct / n


def open_live():
    import dvclive.live
    from dvclive import Live
    from scmrepo.exceptions import SCMError

    # dvcyaml=False: the stage's outputs and plots are declared in the project's dvc.yaml.
    def live():
        return Live(dir=str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None)

    try:
        return live()
    except SCMError:
        # DVCLive 3.49 asks git for HEAD before it checks whether there is one, so in a fresh
        # `git init` with no commit yet it fails ("Empty git repo"). This stage saves no
        # experiment, so DVCLive's repo is not needed: open it as DVCLive runs where DVC is
        # not installed (no repo), which writes the same files.
        original = dvclive.live.get_dvc_repo
        dvclive.live.get_dvc_repo = lambda: None
        try:
            return live()
        finally:
            dvclive.live.get_dvc_repo = original


def make_step(model, n_frozen, world, device, scale):
    """The training forward: plain for one process (the default, unchanged), DDP-wrapped for
    several, compiled on CUDA when asked."""
    if not world.distributed:
        step = partial(forward, model, n_frozen=n_frozen)
    else:
        ids = [device.index] if device.type == "cuda" else None
        step = DistributedDataParallel(FrozenPrefixNet(model, n_frozen), device_ids=ids)
    if scale["compile"] and device.type == "cuda":
        step = torch.compile(step)
    return step


@P.main_guard
def main() -> None:
    params = P.load()
    cfg = read_config(params)
    scale = read_scale_config(params)
    if scale["nproc"] > 1 and not D.under_torchrun():
        raise SystemExit(D.relaunch_with_torchrun("stages.train", scale["nproc"]))
    world, device = D.init(pick_device(cfg["device"]))
    try:
        run(cfg, scale, world, device)
    finally:
        D.shutdown(world)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as they are now, contiguous on the CPU (the checkpoint's layout)."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format).cpu()
            for k, v in model.state_dict().items()}


def run(cfg: dict, scale: dict, world: D.World, device: torch.device) -> None:
    # Each rank seeds its own global RNGs (dropout); DDP copies rank 0's initial weights to all.
    # Data order and augmentation are functions of (seed, epoch) alone, so a resumed run
    # continues exactly: see EpochIndices / EpochSeeded and data/train_state (TS).
    seed_everything(cfg["seed"] + world.rank)
    log = print if world.is_main else (lambda *a, **k: None)
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_ds = load_folder("train", train_transform(mean, std))
    val_ds = load_folder("val", eval_transform(mean, std))
    if train_ds.classes != val_ds.classes:
        raise StageError(f"class folders differ: train {train_ds.classes} vs val {val_ds.classes}")
    size = image_size(train_ds)

    model = build_model(cfg["arch"], len(train_ds.classes), cfg["dropout"], cfg["weights"],
                        cfg["zero_init_residual"])
    freeze(model, cfg["trainable"])
    n_frozen = frozen_prefix(cfg["trainable"])
    model = model.to(device, memory_format=torch.channels_last)

    # Every rank reads the state; all resume, or all start from scratch.
    fp = TS.fingerprint({**cfg, **scale}, {s: SPLIT_DIR / s for s in ("train", "val")},
                        world.size, device)
    quiet = None if world.is_main else (lambda m: None)
    state = TS.load(fp, warn=quiet, note=quiet, clean=world.is_main)
    if not D.all_equal(state["epoch"] if state else 0, world, device):
        log(f"train: ignoring {TS.STATE_FILE}: the processes do not all see the same state "
            "(not on a shared disk?); training from scratch", file=sys.stderr, flush=True)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])

    step = make_step(model, n_frozen, world, device, scale)
    amp = amp_dtype(scale["amp"], device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    if device.type != "cuda" and (scale["amp"] != "off" or scale["compile"]):
        log(f"train: amp and compile apply on CUDA only; running fp32, eager on {device.type}")
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = cosine_scheduler(optimizer, cfg["epochs"], cfg["t_max_ratio"])
    loss_fn = FocalLoss(cfg["focal_alpha"], cfg["focal_gamma"])
    stopper = EarlyStopping(cfg["patience"])
    loader_cfg = {**cfg, "pin_memory": scale["pin_memory"]}
    # One process is a world of one: the same seeded order, reshuffled each epoch.
    sampler = EpochIndices(DistributedSampler(train_ds, world.size, world.rank, shuffle=True,
                                              seed=cfg["seed"]))
    train_loader = make_loader(EpochSeeded(train_ds, cfg["seed"]), loader_cfg, False, None,
                               device, sampler)
    val_part = Subset(val_ds, D.shard_indices(len(val_ds), world)) if world.distributed else val_ds
    val_loader = make_loader(val_part, loader_cfg, False, None, device)
    log(f"train: {cfg['arch']} on {device}, {len(train_ds)} train / {len(val_ds)} val crops, "
        f"{size} px, classes {train_ds.classes}, trainable {cfg['trainable']}"
        + (f", {world.size} processes" if world.distributed else ""), flush=True)

    meta = {"arch": cfg["arch"], "classes": train_ds.classes, "image_size": size, "mean": mean,
            "std": std, "dropout": cfg["dropout"], "params": cfg}
    best: dict = {}
    best_weights: dict | None = None
    history: list[dict] = []
    done, last = 0, cfg["epochs"]
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        stopper.best, stopper.bad_epochs = state["stopper"]["best"], state["stopper"]["bad_epochs"]
        best, history, done = state["best"], state["history"], state["epoch"]
        best_weights = state["best_model"] or {
            k: v.clone(memory_format=torch.contiguous_format) for k, v in state["model"].items()}
        if state["finished"]:
            last = done
            log(f"train: {TS.STATE_FILE}: this run finished training after epoch {done}; "
                "writing its outputs without training", flush=True)
        else:
            log(f"train: resuming from {TS.STATE_FILE} after epoch {done} of {cfg['epochs']}",
                flush=True)
        TS.set_rng_state(state["rng"][world.rank], device)  # last: nothing may draw after it
    started = time.perf_counter() - (state["seconds"] if state is not None else 0.0)
    # Only rank 0 writes; every rank sees the same reduced val loss, so all stop together.
    live = open_live() if world.is_main else None
    if live is not None:
        for record in history:  # the epochs before a resume: the same plots as one run
            for name, value in record.items():
                live.log_metric(name, value, plot=True)
            live.next_step()
    with atomic_dir(MODEL_DIR) if world.is_main else contextlib.nullcontext() as out:
        for epoch in range(done + 1, last + 1):
            lr = optimizer.param_groups[0]["lr"]
            sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
            tr_loss, tr_acc = train_one_epoch(model, step, train_loader, loss_fn, optimizer,
                                              device, cfg["trainable"], world, amp, scaler)
            D.sync_buffers(model, world)
            va_loss, va_acc = validate(model, val_loader, loss_fn, device, world)
            if not (math.isfinite(tr_loss) and math.isfinite(va_loss)):
                raise StageError(f"epoch {epoch}: the loss is not a number (train {tr_loss}, "
                                 f"val {va_loss}): training diverged; lower train.lr "
                                 f"(now {cfg['lr']})")
            record = {"train/loss": tr_loss, "train/acc": tr_acc, "val/loss": va_loss,
                      "val/acc": va_acc, "lr": lr}
            history.append(record)
            if live is not None:
                for name, value in record.items():
                    live.log_metric(name, value, plot=True)
                live.next_step()
            if stopper.step(va_loss):
                best = {"best_epoch": epoch, "best_val_loss": va_loss, "best_val_acc": va_acc,
                        "train_loss": tr_loss, "train_acc": tr_acc}
                best_weights = snapshot(model) if world.is_main else None
            scheduler.step()
            done = epoch
            # Every rank's RNG states, after everything this epoch drew: the next one's start.
            rngs = D.gather_to_main(TS.rng_state(device), world)
            if world.is_main:
                TS.save({
                    "fingerprint": fp, "finished": stopper.should_stop or epoch == last,
                    "epoch": epoch, "model": {k: v.detach().cpu()
                                              for k, v in model.state_dict().items()},
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "stopper": {"best": stopper.best, "bad_epochs": stopper.bad_epochs},
                    "best": best, "history": history, "rng": rngs,
                    # the best epoch's weights, unless they are this epoch's ("model")
                    "best_model": None if best.get("best_epoch") == epoch else best_weights,
                    "seconds": time.perf_counter() - started,
                })
            # printed once the epoch is safe in data/train_state: a kill after it loses nothing
            log(f"[{epoch:02d}] train: [Loss: {tr_loss:.4f}, Acc: {tr_acc:.4f}] | "
                f"eval: [Loss: {va_loss:.4f}, Acc: {va_acc:.4f}]", flush=True)
            if stopper.should_stop:
                log(f"early stop: no val-loss improvement in {cfg['patience']} epochs", flush=True)
                break
        seconds = time.perf_counter() - started
        if world.is_main:
            save_checkpoint(out / "best.pt", best_weights, {
                **meta, "epoch": best["best_epoch"], "val_loss": best["best_val_loss"],
                "val_acc": best["best_val_acc"]})
    if not world.is_main:
        return
    live.end()
    write_json(METRICS_FILE, {
        **best, "epochs_run": done, "stopped_early": stopper.should_stop,
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(len(train_ds) * done / seconds, 1),
        "device": device.type, "processes": world.size,
        "amp": str(amp).replace("torch.", "") if amp else "off",
    })
    # The outputs are in place: keep only a marker (DVC caches this out; kilobytes, not weights).
    TS.save_finished(fp, done)
    log(f"best epoch {best['best_epoch']}: val loss {best['best_val_loss']:.4f}, "
        f"val acc {best['best_val_acc']:.4f} -> {MODEL_DIR / 'best.pt'}")


if __name__ == "__main__":
    main()
