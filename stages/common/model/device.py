"""Which device a stage or command runs on, and on how many of the CPU's threads."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from stages.common.infra.errors import StageError


def mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA, then Apple's MPS, then the CPU; a device asked for by name must be there
    (one line, not a traceback from the first tensor moved to it)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device=cuda but no CUDA device is visible; use auto or cpu")
    if name == "mps" and not mps_available():
        raise StageError("device=mps but no Apple MPS device is available; use auto or cpu")
    return torch.device(name)


@contextlib.contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for the block and the caller's count given
    back after it, even on an error: a caller in the same process (the tests, a command that
    goes on) keeps its own. ``None``, 0 or the current count change nothing."""
    before = torch.get_num_threads()
    if not count or count == before:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
