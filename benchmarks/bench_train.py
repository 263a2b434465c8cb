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
  loader  images/s a data path can deliver, nothing else, on JPEG crops of the same size:
          per-image   the path before (ImageFolder + RandomHorizontalFlip, ColorJitter, ToTensor,
                      Normalize per image in a DataLoader of --loader-workers processes)
          stage       the stage's path: the crops decoded once
                      (stages.common.inference.batches.CropSet),
                      flip + jitter on whole batches (stages.train.augment: OpenCV threads on the
                      CPU, torch on a GPU), normalised, prepared ahead of the step
  compile (CUDA, --compile) the stage step under torch.compile: the compile time, the compiled
          rate, and from how many images a run earns the compile time back

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

from stages.common.config.params import trainable_modules
from stages.common.inference.batches import CropSet, batches
from stages.common.model.build import (IMAGENET_MEAN, IMAGENET_STD, build_model, freeze,
                                       frozen_prefix)
from stages.train import stage as train
from stages.train.augment import Augment
from stages.train.data import EpochOrder, prefetched
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


def per_image_loader_rate(folder: Path, batch: int, workers: int) -> float:
    """Images/s of the per-image path the stage had before: PIL decode and transforms per crop
    in a DataLoader of ``workers`` processes."""
    from torch.utils.data import DataLoader
    from torchvision import transforms as T
    from torchvision.datasets import ImageFolder

    transform = T.Compose([T.RandomHorizontalFlip(), T.ColorJitter(0.2, 0.2, 0.2, 0.1),
                           T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    loader = DataLoader(ImageFolder(str(folder), transform=transform), batch_size=batch,
                        shuffle=True, num_workers=workers, persistent_workers=workers > 0)
    next(iter(loader))  # start the workers before timing
    started = time.perf_counter()
    seen = sum(len(t) for _, t in loader)
    return seen / (time.perf_counter() - started)


def stage_loader_rate(folder: Path, batch: int, workers: int, device: torch.device
                      ) -> tuple[float, float]:
    """(images/s of the stage's data path over one epoch, seconds to decode the split once)."""
    started = time.perf_counter()
    crops = CropSet.load(folder, device, workers)
    decoded = time.perf_counter() - started
    augment = Augment(0, len(crops), device, workers, IMAGENET_MEAN, IMAGENET_STD)
    order = EpochOrder(len(crops), 0)
    order.set_epoch(1)
    augment.set_epoch(1)
    items = batches(crops, order.indices(), batch, device, IMAGENET_MEAN, IMAGENET_STD, augment)
    if device.type == "cpu":
        items = prefetched(items)
    started = time.perf_counter()
    seen = 0
    for images, _ in items:
        seen += len(images)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - started), decoded


def compile_figures(stage, arch, n_frozen, device, batches, run_eager_rate, loss_fn, opt, trainable
                    ) -> str:
    """The stage step compiled: compile seconds, compiled rate, break-even run length."""
    step = train.make_step(stage, arch, n_frozen, World(), device, True)
    learner = train.Learner(stage, step, opt, loss_fn, trainable)
    started = time.perf_counter()
    train.train_one_epoch(learner, batches[:1], World(), device)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - started
    t = timed(lambda: train.train_one_epoch(learner, batches, World(), device), device)
    compiled = len(batches) * len(batches[0][1]) / t
    gain = 1 / run_eager_rate - 1 / compiled  # seconds saved per image
    pays = f"after {compile_s / gain:,.0f} images" if gain > 0 else "never (not faster)"
    return (f"  compiled step  {compiled:7.1f} images/s ({compiled / run_eager_rate:.2f}x eager); "
            f"compiling took {compile_s:.1f} s: a run earns it back {pays}")


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
    ap.add_argument("--compile", action="store_true", help="CUDA: time the compiled step too")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    trainable = trainable_modules(args.trainable, args.arch)

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
    batch = (torch.randn(args.batch, 3, args.size, args.size, device=device
                         ).contiguous(memory_format=torch.channels_last),
             torch.randint(0, 3, (args.batch,), device=device))
    batches = [batch] * args.steps
    n_frozen = frozen_prefix(args.arch, trainable)
    stage_step = train.make_step(stage, args.arch, n_frozen, World(), device, False)
    learner = train.Learner(stage, stage_step, opt[stage], loss_fn, trainable)
    bn_before = frozen_bn_stats(stage, trainable)

    def run_naive():
        naive_steps(naive, batches, loss_fn, opt[naive], device)

    def run_frozen_rg():
        naive_steps(frozen_rg, batches, loss_fn, opt[frozen_rg], device)

    def run_stage():
        train.train_one_epoch(learner, batches, World(), device)

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
    if args.compile and device.type == "cuda":
        print(compile_figures(stage, args.arch, n_frozen, device, batches, rate["stage"], loss_fn,
                              opt[stage], trainable))
    if args.loader_workers >= 0:
        with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
            folder = Path(tmp) / "train"
            write_crops(folder, args.loader_images, args.size)
            old = per_image_loader_rate(folder, args.batch, args.loader_workers)
            new, decoded = stage_loader_rate(folder, args.batch, args.loader_workers, device)
        print(f"  loader, per-image path ({args.loader_workers} worker processes) {old:7.1f} "
              f"images/s -> {old / rate['stage']:.1f}x the stage step")
        print(f"  loader, stage path ({args.loader_workers} threads, {device.type}) {new:7.1f} "
              f"images/s -> {new / old:.2f}x the per-image path, {new / rate['stage']:.1f}x the "
              f"stage step; decoding the {args.loader_images} crops once took {decoded:.2f} s")


if __name__ == "__main__":
    main()
