"""Crops under camera conditions through a model: the conditions stage's test crops, and
calibrate's crops for each camera mode (calibrate.modes). Each corrupted crop is a pure
function of (seed, condition, severity, crop key) (stages.common.pictures.corrupt)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from stages.common.inference.batches import CropSet, normalise
from stages.common.inference.logits import to_device
from stages.common.model.checkpoint import ModelMeta, check_logits
from stages.common.pictures.corrupt import corrupt

Classify = Callable[[np.ndarray], np.ndarray]  # uint8 N x H x W x 3 -> logits N x classes


def pixel_classifier(model: torch.nn.Module, meta: ModelMeta, device: torch.device,
                     checkpoint: Path) -> Classify:
    """One batch of uint8 N x H x W x 3 crops -> the model's logits (float64 numpy), checked."""
    @torch.inference_mode()
    def classify(pixels: np.ndarray) -> np.ndarray:
        model.eval()
        batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
        logits = model(normalise(to_device(batch, device), meta.mean, meta.std))
        logits = logits.float().cpu()
        check_logits(logits, len(pixels), len(meta.classes), checkpoint)
        return logits.numpy().astype(np.float64)
    return classify


def crop_keys(paths) -> list[str]:
    """Each crop's name inside its set, ``<label>/<file>``: the seed of its corruptions, the
    same on any machine wherever the set lies."""
    return ["/".join(Path(p).parts[-2:]) for p in paths]


def host_pixels(crops: CropSet) -> np.ndarray:
    """A crop set's uint8 pixels on the CPU as :func:`corrupt` takes them, N x S x S x 3."""
    pixels = crops.take(torch.arange(len(crops)), torch.device("cpu"))
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def mode_jobs(mode) -> list[tuple[str, int]]:
    """A camera mode's (condition, severity) pairs (stages.common.alarm.point.ModeThreshold or
    calibrate.modes' entry), conditions first."""
    return [(c, s) for c in mode.conditions for s in mode.severities]


def under_mode(mode, pixels: np.ndarray, keys: list[str], seed: int, classify: Classify,
               batch_size: int, threads: int) -> np.ndarray:
    """The logits of every crop as camera mode ``mode`` sees it: each crop under every one of
    its (condition, severity) pairs, pair after pair; the clean crops for a mode without
    conditions."""
    if not mode.conditions:
        return np.concatenate([classify(pixels[i:i + batch_size])
                               for i in range(0, len(pixels), batch_size)])
    return np.concatenate(corrupted_logits(pixels, keys, mode_jobs(mode), seed, classify,
                                           batch_size, threads))


def mode_labels(mode, targets: np.ndarray, pictures: list) -> tuple[np.ndarray, list]:
    """Each crop's label and source picture in :func:`under_mode`'s order: a crop's corrupted
    copies count as its picture (they are not independent; the bounds count pictures)."""
    n = max(1, len(mode_jobs(mode)))
    return np.tile(targets, n), list(pictures) * n


def corrupted_logits(pixels: np.ndarray, keys: list[str], jobs: list[tuple[str, int]],
                     seed: int, classify: Classify, batch_size: int, threads: int
                     ) -> list[np.ndarray]:
    """The logits of every crop under each (condition, severity) of ``jobs``: each corrupted
    crop computed once and classified in batches of ``batch_size`` that run across jobs, so no
    job's short last batch is paid for. Each of ``threads`` workers corrupts a batch and
    classifies it (OpenCV, numpy and the forward pass release the GIL), so the corruptions of
    one batch overlap the forward pass of another with no barrier between them, and memory
    holds ``threads`` batches; each crop's draws are its own, so the count changes nothing."""
    n, total = len(keys), len(keys) * len(jobs)

    def batch_logits(start: int) -> np.ndarray:
        return classify(np.stack([corrupt(pixels[k % n], *jobs[k // n], seed, keys[k % n])
                                  for k in range(start, min(start + batch_size, total))]))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(pool.map(batch_logits, range(0, total, batch_size)))
    logits = np.concatenate(rows) if rows else np.zeros((0, 0))
    return [logits[j * n:(j + 1) * n] for j in range(len(jobs))]
