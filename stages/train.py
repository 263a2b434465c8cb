"""Stage `train`: fine-tune a ResNet on data/split/{train,val} with the report's recipe.

Focal loss, AdamW, CosineAnnealingLR (T_max = epochs / 2), early stopping on val loss; the
checkpoint of the best val-loss epoch goes to data/model/best.pt. Per-epoch history is logged
with DVCLive to plots/train/, the best epoch's figures to metrics/train.json.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from stages.common import params as P
from stages.common.atomic import atomic_dir, write_json
from stages.common.inference import predict, to_device
from stages.common.model import (ARCHS, IMAGENET_MEAN, IMAGENET_STD, build_model, forward,
                                 freeze, frozen_prefix, pick_device, save_checkpoint,
                                 set_train_mode, trainable_modules)
from stages.common.params import StageError
from stages.common.training import (EarlyStopping, FocalLoss, cosine_scheduler, seed_everything,
                                    seed_worker)
from stages.common.transforms import eval_transform, train_transform

SPLIT_DIR = Path("data/split")
MODEL_DIR = Path("data/model")
LIVE_DIR = Path("plots/train")
METRICS_FILE = Path("metrics/train.json")
DEVICES = ["auto", "cpu", "cuda", "mps"]


def read_config(p: dict) -> dict:
    """Every param this stage reads, checked before any work starts."""
    trainable = P.get(p, "model.trainable")
    P.check(trainable == "all" or (isinstance(trainable, list)
                                   and all(isinstance(t, str) for t in trainable)),
            "model.trainable", "'all' or a list of module names like [layer4, fc]", trainable)
    weights = P.get(p, "model.weights")
    P.check(isinstance(weights, str) and weights != "", "model.weights",
            "imagenet, none or a path to a .pth file", weights)
    return {
        "seed": P.number(p, "seed", lo=0, integer=True),
        "arch": P.choice(p, "model.arch", list(ARCHS)),
        "weights": weights,
        "dropout": P.number(p, "model.dropout", lo=0, hi=0.99),
        "trainable": trainable_modules(trainable),
        "epochs": P.number(p, "train.epochs", lo=1, integer=True),
        "batch_size": P.number(p, "train.batch_size", lo=1, integer=True),
        "lr": P.number(p, "train.lr", lo=0, lo_open=True),
        "weight_decay": P.number(p, "train.weight_decay", lo=0),
        "focal_alpha": P.number(p, "train.focal_alpha", lo=0, lo_open=True),
        "focal_gamma": P.number(p, "train.focal_gamma", lo=0),
        "patience": P.number(p, "train.patience", lo=1, integer=True),
        "num_workers": P.number(p, "train.num_workers", lo=0, integer=True),
        "device": P.choice(p, "train.device", DEVICES),
    }


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


def make_loader(ds: ImageFolder, cfg: dict, shuffle: bool, gen: torch.Generator | None,
                device: torch.device) -> DataLoader:
    workers = cfg["num_workers"]
    return DataLoader(ds, batch_size=cfg["batch_size"], shuffle=shuffle, generator=gen,
                      num_workers=workers, worker_init_fn=seed_worker,
                      persistent_workers=workers > 0, pin_memory=device.type == "cuda")


def train_one_epoch(model, loader, loss_fn, optimizer, device, trainable, n_frozen):
    set_train_mode(model, trainable)
    total_loss, correct, seen = 0.0, 0, 0
    for images, targets in loader:
        images, targets = to_device(images, device), targets.to(device)
        logits = forward(model, images, n_frozen)
        loss = loss_fn(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(targets)
        correct += (logits.argmax(1) == targets).sum().item()
        seen += len(targets)
    return total_loss / seen, correct / seen


def validate(model, loader, loss_fn, device):
    logits, targets = predict(model, loader, device)
    loss = loss_fn(logits, targets).item()
    acc = (logits.argmax(1) == targets).float().mean().item()
    return loss, acc


def open_live():
    from dvclive import Live

    # dvcyaml=False: the stage's outputs and plots are declared in the project's dvc.yaml.
    return Live(dir=str(LIVE_DIR), dvcyaml=False, save_dvc_exp=False, report=None)


@P.main_guard
def main() -> None:
    cfg = read_config(P.load())
    gen = seed_everything(cfg["seed"])
    device = pick_device(cfg["device"])
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    train_ds = load_folder("train", train_transform(mean, std))
    val_ds = load_folder("val", eval_transform(mean, std))
    if train_ds.classes != val_ds.classes:
        raise StageError(f"class folders differ: train {train_ds.classes} vs val {val_ds.classes}")
    size = image_size(train_ds)

    model = build_model(cfg["arch"], len(train_ds.classes), cfg["dropout"], cfg["weights"])
    freeze(model, cfg["trainable"])
    n_frozen = frozen_prefix(cfg["trainable"])
    model = model.to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad],
                                  lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    scheduler = cosine_scheduler(optimizer, cfg["epochs"])
    loss_fn = FocalLoss(cfg["focal_alpha"], cfg["focal_gamma"])
    stopper = EarlyStopping(cfg["patience"])
    train_loader = make_loader(train_ds, cfg, True, gen, device)
    val_loader = make_loader(val_ds, cfg, False, None, device)
    print(f"train: {cfg['arch']} on {device}, {len(train_ds)} train / {len(val_ds)} val crops, "
          f"{size} px, classes {train_ds.classes}, trainable {cfg['trainable']}", flush=True)

    meta = {"arch": cfg["arch"], "classes": train_ds.classes, "image_size": size, "mean": mean,
            "std": std, "dropout": cfg["dropout"], "params": cfg}
    best: dict = {}
    started = time.perf_counter()
    live = open_live()
    with atomic_dir(MODEL_DIR) as out:
        for epoch in range(1, cfg["epochs"] + 1):
            lr = optimizer.param_groups[0]["lr"]
            tr_loss, tr_acc = train_one_epoch(model, train_loader, loss_fn, optimizer, device,
                                              cfg["trainable"], n_frozen)
            va_loss, va_acc = validate(model, val_loader, loss_fn, device)
            print(f"[{epoch:02d}] train: [Loss: {tr_loss:.4f}, Acc: {tr_acc:.4f}] | "
                  f"eval: [Loss: {va_loss:.4f}, Acc: {va_acc:.4f}]", flush=True)
            for name, value in [("train/loss", tr_loss), ("train/acc", tr_acc),
                                ("val/loss", va_loss), ("val/acc", va_acc), ("lr", lr)]:
                live.log_metric(name, value, plot=True)
            live.next_step()
            if stopper.step(va_loss):
                best = {"best_epoch": epoch, "best_val_loss": va_loss, "best_val_acc": va_acc,
                        "train_loss": tr_loss, "train_acc": tr_acc}
                save_checkpoint(out / "best.pt", model, {**meta, "epoch": epoch,
                                                         "val_loss": va_loss, "val_acc": va_acc})
            scheduler.step()
            if stopper.should_stop:
                print(f"early stop: no val-loss improvement in {cfg['patience']} epochs", flush=True)
                break
        seconds = time.perf_counter() - started
    live.end()
    write_json(METRICS_FILE, {
        **best, "epochs_run": epoch, "stopped_early": stopper.should_stop,
        "train_seconds": round(seconds, 1),
        "train_images_per_s": round(len(train_ds) * epoch / seconds, 1),
        "device": device.type,
    })
    print(f"best epoch {best['best_epoch']}: val loss {best['best_val_loss']:.4f}, "
          f"val acc {best['best_val_acc']:.4f} -> {MODEL_DIR / 'best.pt'}")


if __name__ == "__main__":
    main()
