"""Helper processes that end with the process that started them.

A stage killed with SIGKILL (``kill -9``, the out-of-memory killer, a lost terminal) runs no
cleanup, so its helpers must notice by themselves: extract_crops' crop workers would otherwise
wait for tasks for ever and hold the stage's stdout open (``dvc repro`` waits for that too), and
torchrun's training workers, each in a session of its own, would go on training and writing the
outputs and the resume state (data/train_resume) under a resumed run's feet.
"""
from __future__ import annotations

import os
import signal
import sys


def die_with_parent(parent: int | None = None) -> None:
    """Linux: SIGKILL this process as soon as its parent process ends (PR_SET_PDEATHSIG, which
    survives exec). ``parent``: the pid the parent must have; by default whatever it is now.

    A fork server's children have the fork server as parent, which exits when its own parent
    (the stage) does, so the signal still reaches them through it. Elsewhere than Linux this
    does nothing.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid() if parent is None else parent
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent ended before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
