"""Signs of life inside long work (an epoch, the test set, many pictures), on stderr.

On a terminal, a tqdm bar. Elsewhere (a pipe, `dvc repro`'s log, CI, `dvc queue logs`), a plain
line every ``PROGRESS_EVERY_S`` seconds (environment; default 10), e.g.
``train epoch 3/12: 3,200/41,000 images (8%), 312 images/s, ETA 2:01``. Work shorter than
the interval prints nothing extra. Counting costs no device sync: it counts what the loop has
already handed over.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
EVERY_S = 10.0
ENV_EVERY = "PROGRESS_EVERY_S"


def interval() -> float:
    """Seconds between plain lines: $PROGRESS_EVERY_S, else 10. A value that is not a
    non-negative number is ignored (progress never stops a run)."""
    try:
        value = float(os.environ.get(ENV_EVERY, EVERY_S))
    except ValueError:
        return EVERY_S
    return value if value >= 0 else EVERY_S


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def line(what: str, done: int, total: int, unit: str, elapsed: float) -> str:
    """``what: done/total unit (pct%), rate unit/s, ETA m:ss``."""
    rate = done / elapsed if elapsed > 0 else 0.0
    text = f"{what}: {done:,}/{total:,} {unit}"
    if total:
        text += f" ({100 * done // total}%)"
    text += f", {rate:,.0f} {unit}/s"
    if rate > 0 and total >= done:
        text += f", ETA {duration((total - done) / rate)}"
    return text


def tracked(items: Iterable[T], what: str, total: int, unit: str = "images",
            size: Callable[[T], int] = lambda item: 1, stream: TextIO | None = None,
            enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``items`` as they come, with progress on ``stream`` (stderr) counted by ``size(item)``."""
    stream = stream if stream is not None else sys.stderr
    if not enabled or stream is None:
        yield from items
        return
    if is_terminal(stream):
        from tqdm import tqdm

        with tqdm(total=total, desc=what, unit=unit.rstrip("s") or unit, file=stream,
                  leave=False, dynamic_ncols=True) as bar:
            for item in items:
                yield item
                bar.update(size(item))
        return
    every = interval()
    started = last = clock()
    done = 0
    for item in items:
        yield item
        done += size(item)
        now = clock()
        if now - last >= every and done < total:
            stream.write(line(what, done, total, unit, now - started) + "\n")
            stream.flush()
            last = now


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
