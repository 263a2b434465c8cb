"""The train stage's data: the train and val crops decoded once (stages.common.inference.batches),
each epoch's order and augmentation functions of (seed, epoch, crop) alone, so a resumed run draws
exactly what an uninterrupted one would, and batches prepared ahead of the step on the CPU.
"""
from __future__ import annotations

import hashlib
import os
import queue
import random
import threading
from typing import Iterator

import numpy as np
import torch
from torch.utils.data.distributed import DistributedSampler

PREFETCH = 2  # batches prepared ahead of the step (CPU threads; the GPU path queues kernels)


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


def derived_seed(*keys: int) -> int:
    """A 63-bit seed from integers such as (seed, epoch), well mixed (blake2b)."""
    text = "/".join(str(int(k)) for k in keys).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class EpochOrder:
    """This rank's crop indices for each epoch: DistributedSampler's seeded shuffle of the whole
    split (a world of one takes all of it), reshuffled by ``set_epoch``."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.sampler = DistributedSampler(range(n), world_size, rank, shuffle=True, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def indices(self) -> torch.Tensor:
        return torch.tensor(list(self.sampler), dtype=torch.long)


def prefetched(items: Iterator, depth: int = PREFETCH) -> Iterator:
    """``items`` produced by a thread ``depth`` ahead of the consumer. The CPU augmentation
    (OpenCV, NumPy, torch: all release the GIL) then overlaps the model's step; an error in the
    producer is raised in the consumer."""
    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(item)
        except BaseException as exc:  # handed to the consumer, raised there
            box.put(exc)
            return
        box.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                box.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
