"""Training pieces of the report's recipe: focal loss, cosine schedule, early stopping, seeding."""
from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset


class FocalLoss(nn.Module):
    """``-alpha * (1 - pt)^gamma * log(pt)``, averaged over the batch (gamma 0, alpha 1: CE)."""

    def __init__(self, alpha: float = 1.0, gamma: float = 2.0) -> None:
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
        pt = log_pt.exp()
        return (-self.alpha * (1 - pt) ** self.gamma * log_pt).mean()


def cosine_scheduler(optimizer: torch.optim.Optimizer, epochs: int, t_max_ratio: float = 0.5):
    """CosineAnnealingLR stepped once per epoch, T_max = ``epochs x t_max_ratio``.

    The report's 0.5 takes the lr to 0 at half the epochs and back up to its start at the end;
    1.0 anneals once over the whole run (the default recipe's choice: on short runs the report's
    schedule spends an epoch at lr 0 and ends on a high lr)."""
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, int(epochs * t_max_ratio)))


class EarlyStopping:
    """Stop after ``patience`` epochs in a row without a strictly lower val loss."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best = float("inf")
        self.bad_epochs = 0

    def step(self, val_loss: float) -> bool:
        """Record an epoch's val loss; True when it is a new best (save the model then)."""
        if val_loss < self.best:
            self.best = val_loss
            self.bad_epochs = 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; returns the generator that orders the data loader."""
    random.seed(seed)
    # NumPy's global seed takes 32 bits, and a rank's seed (seed + rank) may pass 2**32 - 1,
    # the top of params' range: wrapped, the same as before for every smaller seed.
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


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
