"""Running a model over a data loader; shared by train (validation) and evaluate (test)."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    # channels_last is the faster layout for convolutions on CPU (oneDNN) and on tensor cores.
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


@torch.inference_mode()
def predict(model: nn.Module, loader: DataLoader, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and targets for every item of ``loader``, in loader order, on the CPU."""
    model.eval()
    all_logits, all_targets = [], []
    for images, targets in loader:
        all_logits.append(model(to_device(images, device)).float().cpu())
        all_targets.append(targets)
    if not all_logits:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(all_logits), torch.cat(all_targets)
