"""The train stage's data: ImageFolder splits, and data order and augmentation as functions of
(seed, epoch, crop) alone, so a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import ImageFolder

from stages.common.errors import StageError

SPLIT_DIR = Path("data/split")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (dropout, weight init), deterministic algorithms on."""
    random.seed(seed)
    # NumPy's global seed takes 32 bits, and a rank's seed (seed + rank) may pass 2**32 - 1,
    # the top of params' range: wrapped, the same as before for every smaller seed.
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def seed_worker(worker_id: int) -> None:
    """DataLoader workers: derive NumPy/random seeds from torch's per-worker seed."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integers such as (seed, epoch, index), well mixed (blake2b)."""
    text = "/".join(str(int(k)) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class EpochSeeded(Dataset):
    """A dataset whose random augmentation is a function of (seed, epoch, index) alone.

    Indices are ``(epoch, index)`` pairs (see :class:`EpochIndices`); each item's transform runs on
    torch's CPU generator seeded from them and restored after, so the draws depend neither on the
    data-loader workers (persistent or not, how many) nor on what ran before: a resumed run
    augments exactly as an uninterrupted one, and the main process's RNG (dropout) is untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derived_seed(self.seed, epoch, index))
            return self.dataset[index]


class EpochIndices(torch.utils.data.Sampler):
    """Wrap a sampler with ``set_epoch`` (DistributedSampler): yield ``(epoch, index)`` pairs."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        return ((self.epoch, i) for i in self.sampler)


def load_folder(split: str, transform) -> ImageFolder:
    path = SPLIT_DIR / split
    if not path.is_dir():
        raise StageError(f"{path}: not found; run the split stage first")
    try:
        return ImageFolder(str(path), transform=transform)
    except (FileNotFoundError, RuntimeError) as exc:
        raise StageError(f"{path}: no usable images ({exc})") from None


def make_loader(ds, batch_size: int, workers: int, seed: int, device: torch.device,
                pin_memory: bool = True, sampler=None) -> DataLoader:
    # The loader draws its workers' base seed from this private generator, not from torch's
    # global RNG, whose stream (dropout) a resumed run must continue exactly.
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=False, generator=gen, sampler=sampler,
                      num_workers=workers, worker_init_fn=seed_worker,
                      persistent_workers=workers > 0,
                      pin_memory=pin_memory and device.type == "cuda")
