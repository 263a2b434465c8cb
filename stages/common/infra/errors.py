"""What a user sees when something is wrong: one line on stderr and exit code 2, never a traceback.

Every stage and command raises :class:`ParamError` (a bad param or option) or :class:`StageError`
(missing or unusable input) with a message that names the thing and what to do, and wraps its
``main`` in :func:`main_guard`, which prints ``error: <message>`` and exits 2. Ctrl-C (SIGINT)
is one line too, ``interrupted: <what a rerun does>``, and exit code 130 (128 + SIGINT, as a
shell reports it).
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from typing import Any, Callable


class ParamError(ValueError):
    """A param or option is missing or has a value the pipeline cannot use."""


class StageError(RuntimeError):
    """Input data or a file the stage needs is missing or unusable."""


class Interrupted(Exception):
    """Ctrl-C stopped the stage; the message says what rerunning it does (train: resume)."""


INTERRUPTED_EXIT = 130
RERUN = ("stopped by Ctrl-C; run the same command again (for a stage: dvc repro, or the same "
         "dvc exp run)")


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands (predict, report, review): a bad option is one line and exit
    code 2 through main_guard, not argparse's usage block."""

    def error(self, message: str):
        raise ParamError(f"{message}; see {self.prog} --help")


# A full disk or an exhausted quota: nothing the stage can work around, nothing a traceback helps.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def stderr_or_nothing() -> None:
    """Started with stderr closed (``2>&-``), point fd 2 and ``sys.stderr`` at /dev/null.

    Python then sets ``sys.stderr`` to None, and ``print(..., file=None)`` writes to stdout:
    the warnings went into predict's JSON, which no longer parsed. And fd 2 being free, the next
    file opened would get it, and a library's message to fd 2 would land in that file. So the
    diagnostics are dropped: stdout holds only the answers."""
    try:
        os.fstat(2)
    except OSError:
        fd = os.open(os.devnull, os.O_WRONLY)
        if fd != 2:  # 0 or 1 were closed too: they stay closed
            os.dup2(fd, 2)
            os.close(fd)
    if sys.stderr is None:
        sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")


def main_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ParamError / StageError, or a full disk, into one line on stderr and exit code 2;
    Ctrl-C into one line and exit code 130.

    The disk-full line names the file being written when the writer said which
    (stages.common.infra.atomic names its outputs). First, a closed stderr is made /dev/null
    (:func:`stderr_or_nothing`), so no diagnostic ever reaches stdout."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        stderr_or_nothing()
        try:
            return fn(*args, **kwargs)
        except (ParamError, StageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except (KeyboardInterrupt, Interrupted) as exc:
            print(f"interrupted: {exc if isinstance(exc, Interrupted) else RERUN}",
                  file=sys.stderr, flush=True)
            raise SystemExit(INTERRUPTED_EXIT) from None
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: cannot write{where} ({os.strerror(exc.errno)}); free space and rerun",
                  file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
