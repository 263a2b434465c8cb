"""Which device a stage or command runs on."""
from __future__ import annotations

import torch

from stages.common.infra.errors import StageError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)
