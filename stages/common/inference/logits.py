"""Running a model over batches: train's validation, and the logits of a labelled split under a
checkpoint (calibrate on val, evaluate on test)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from stages.common.inference.batches import CropSet, batch_len, batches
from stages.common.infra.errors import StageError
from stages.common.infra.progress import tracked
from stages.common.model.checkpoint import ModelMeta, check_logits


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last is the faster layout for convolutions on CPU (oneDNN) and on tensor cores.
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


@torch.inference_mode()
def predict(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for every item of ``batches``, in order, on the CPU."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in batches:  # both kept on the device: one copy to the host at the end
        all_logits.append(model(to_device(images, device)).float())
        all_targets.append(targets)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits).cpu(), torch.cat(all_targets).cpu()


def checked_crops(folder: Path, meta: ModelMeta, checkpoint: Path, device: torch.device,
                  workers: int = 0, keep: str | None = None) -> CropSet:
    """A labelled split (``<label>/<crop>``) decoded once, whose class names and crop size must
    be the checkpoint's."""
    crops = CropSet.load(folder, device, workers, keep=keep)
    if crops.classes != meta.classes:
        raise StageError(f"{checkpoint} was trained on classes {meta.classes} but {folder} "
                         f"holds {crops.classes}; retrain or re-split")
    if crops.size != meta.image_size:
        raise StageError(f"{checkpoint} was trained on {meta.image_size}x{meta.image_size} "
                         f"crops but {crops.paths[0]} is {crops.size}x{crops.size}; retrain or "
                         "rerun extract_crops with the same crops.size")
    return crops


def labelled_logits(model: torch.nn.Module, meta: ModelMeta, folder: Path, checkpoint: Path,
                    device: torch.device, batch_size: int, what: str
                    ) -> tuple[CropSet, np.ndarray, np.ndarray]:
    """(the crops, logits, targets) of a labelled split under ``model`` (already on ``device``),
    with progress lines named ``what``; calibrate runs it on val, evaluate on test."""
    crops = checked_crops(folder, meta, checkpoint, device)
    order = torch.arange(len(crops))
    logits, targets = predict(model, tracked(batches(crops, order, batch_size, device,
                                                     meta.mean, meta.std),
                                             what, len(crops), size=batch_len), device)
    check_logits(logits, len(crops), len(meta.classes), checkpoint)
    return crops, logits.numpy(), targets.numpy()
