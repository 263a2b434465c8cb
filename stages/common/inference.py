"""Running a model over batches; shared by train (validation) and evaluate (test)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


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
