"""The train stage's step against a naive loop, same batch, same trained parameters.

    python -m benchmarks.bench_train --device cpu                 # report recipe: resnet18, 224 px
    python -m benchmarks.bench_train --device cuda --batch 128    # on a GPU

  naive           the issue's baseline: the whole model in train mode, NCHW, plain ``model(x)``,
                  autograd through the frozen layers (every weight requires grad; only the
                  optimizer is limited to the trained modules)
  requires_grad   the report's way of freezing: as naive, but the frozen weights have
                  requires_grad False, so autograd records nothing below layer4 already; frozen
                  BatchNorm layers still update their statistics
  stage   stages.train.train_one_epoch: frozen prefix under no_grad and in eval mode
          (BatchNorm keeps ImageNet's statistics), channels_last
  loader  the stage's DataLoader (ImageFolder + the train transform, train.num_workers
          processes) on JPEG crops of the same size, nothing else: images/s it can deliver

All models start from the same weights and their optimizers update the same parameter set
(asserted). The ImageNet weights are not needed: speed does not depend on the values.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from stages.common.model import IMAGENET_MEAN, IMAGENET_STD, build_model, freeze, frozen_prefix
from stages.common.params import trainable_modules
from stages.common.transforms import train_transform
from stages.train import data as train_data
from stages.train import stage as train
from stages.train.distributed import World
from stages.train.recipe import FocalLoss


def trained_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_for(model: torch.nn.Module, names: list[str]) -> torch.optim.Optimizer:
    params = dict(model.named_parameters())
    return torch.optim.AdamW([params[n] for n in names], lr=1e-5)


def frozen_bn_stats(model: torch.nn.Module, trainable: list[str]) -> torch.Tensor:
    """The running statistics of the frozen BatchNorm layers (none with --trainable all)."""
    stats = [b.detach().flatten().cpu() for name, b in model.named_buffers()
             if name.split(".")[0] not in trainable and "running" in name]
    return torch.cat(stats) if stats else torch.empty(0)


def naive_steps(model, batches, loss_fn, optimizer, device) -> None:
    model.train()
    for images, targets in batches:
        images, targets = images.to(device), targets.to(device)
        loss = loss_fn(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def write_crops(folder: Path, n: int, size: int) -> None:
    """n JPEG crops in 3 class folders, photo-like content (as extract_crops writes them)."""
    rng = np.random.default_rng(0)
    for i in range(n):
        label = folder / ["animal", "object", "person"][i % 3]
        label.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
        cv2.imwrite(str(label / f"{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 95])


def loader_rate(size: int, batch: int, workers: int, n: int) -> float:
    """Images/s of the stage's train loader alone (decode, flip, colour jitter, normalise)."""
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        write_crops(Path(tmp) / "train", n, size)
        train_data.SPLIT_DIR = Path(tmp)
        ds = train_data.load_folder("train", train_transform(IMAGENET_MEAN, IMAGENET_STD))
        loader = train_data.make_loader(ds, batch, workers, 0, torch.device("cpu"))
        next(iter(loader))  # start the workers before timing
        started = time.perf_counter()
        seen = sum(len(t) for _, t in loader)
        return seen / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per repeat")
    ap.add_argument("--repeats", type=int, default=3, help="naive/stage alternations")
    ap.add_argument("--trainable", nargs="+", default=["layer4", "fc"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--loader-workers", type=int, default=2)
    ap.add_argument("--loader-images", type=int, default=768)
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    trainable = trainable_modules(args.trainable)

    base = build_model(args.arch, 3, 0.3, "none")
    freeze(base, trainable)
    names = trained_names(base)
    naive = copy.deepcopy(base).to(device)
    for p in naive.parameters():
        p.requires_grad = True
    frozen_rg = copy.deepcopy(base).to(device)
    stage = copy.deepcopy(base).to(device, memory_format=torch.channels_last)
    assert trained_names(frozen_rg) == trained_names(stage) == names
    opt = {m: optimizer_for(m, names) for m in (naive, frozen_rg, stage)}
    loss_fn = FocalLoss(1.0, 2.0)
    batch = (torch.randn(args.batch, 3, args.size, args.size),
             torch.randint(0, 3, (args.batch,)))
    batches = [batch] * args.steps
    n_frozen = frozen_prefix(trainable)
    stage_step = train.make_step(stage, n_frozen, World(), device, False)
    bn_before = frozen_bn_stats(stage, trainable)

    def run_naive():
        naive_steps(naive, batches, loss_fn, opt[naive], device)

    def run_frozen_rg():
        naive_steps(frozen_rg, batches, loss_fn, opt[frozen_rg], device)

    def run_stage():
        train.train_one_epoch(stage, stage_step, batches, loss_fn, opt[stage], device, trainable,
                              World())

    runs = {"naive": run_naive, "requires_grad": run_frozen_rg, "stage": run_stage}
    for fn in runs.values():  # warm-up: allocator, oneDNN kernels
        fn()
    times = {k: [] for k in runs}
    for _ in range(args.repeats):  # alternate, so drift in the machine hits all alike
        for k, fn in runs.items():
            times[k].append(timed(fn, device))
    assert torch.equal(bn_before, frozen_bn_stats(stage, trainable)), "frozen BN stats moved"
    n_images = args.steps * args.batch
    rate = {k: n_images / statistics.median(v) for k, v in times.items()}
    print(f"{args.arch}, {args.size} px, batch {args.batch}, trainable {trainable}, "
          f"{len(trained_names(stage))} parameter tensors trained, device {device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"  naive          {rate['naive']:7.1f} images/s   (median of {args.repeats} x "
          f"{args.steps} steps)")
    print(f"  requires_grad  {rate['requires_grad']:7.1f} images/s   -> "
          f"{rate['requires_grad'] / rate['naive']:.2f}x naive")
    print(f"  stage          {rate['stage']:7.1f} images/s   -> {rate['stage'] / rate['naive']:.2f}x "
          f"naive, {rate['stage'] / rate['requires_grad']:.2f}x requires_grad; frozen BatchNorm "
          "statistics unchanged")
    if args.loader_workers >= 0:
        lr = loader_rate(args.size, args.batch, args.loader_workers, args.loader_images)
        print(f"  loader alone ({args.loader_workers} workers) {lr:7.1f} images/s -> "
              f"{lr / rate['stage']:.1f}x the stage step")


if __name__ == "__main__":
    main()
