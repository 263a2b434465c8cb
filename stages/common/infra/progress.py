"""Signs of life inside long work (an epoch, the test set, many pictures, a download), on stderr.

On a terminal, a tqdm bar. Elsewhere (a pipe, `dvc repro`'s log, CI, `dvc queue logs`), a plain
line every ``PROGRESS_EVERY_S`` seconds (environment; default 10), e.g.
``train epoch 3/12: 3,200/41,000 images (8%), 312 images/s, ETA 2:01`` or
``download train/labels/detections.csv: 1.2 GB/2.1 GB (57%), 11.8 MB/s, ETA 1:15``. Work shorter
than the interval prints nothing extra. Counting costs no device sync: it counts what the loop has
already handed over.

Two ways in, one logic: :func:`tracked` wraps an iterable (a loop that owns its items);
:class:`Meter` is told how much is done (``update(n)``), from any thread, for work whose loop is
someone else's (a library's thread pool downloading images, a stream of byte chunks).
"""
from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
EVERY_S = 10.0
ENV_EVERY = "PROGRESS_EVERY_S"
BYTES = "bytes"   # the unit that is shown scaled (kB, MB, GB) rather than counted


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


def bytes_text(n: float) -> str:
    """Bytes in decimal units, as the docs and download sizes are quoted: ``2.1 GB``."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def line(what: str, done: int, total: int | None, unit: str, elapsed: float,
         start: int = 0) -> str:
    """``what: done/total unit (pct%), rate unit/s, ETA m:ss``. ``start``: what was already
    done when the clock started (a resumed download), so it does not count toward the rate.
    ``total`` None (a server that states no size): no percentage and no ETA."""
    rate = (done - start) / elapsed if elapsed > 0 else 0.0
    if unit == BYTES:
        of = f"/{bytes_text(total)}" if total is not None else ""
        text, speed = f"{what}: {bytes_text(done)}{of}", f"{bytes_text(rate)}/s"
    else:
        of = f"/{total:,}" if total is not None else ""
        text, speed = f"{what}: {done:,}{of} {unit}", f"{rate:,.0f} {unit}/s"
    if total:
        text += f" ({100 * done // total}%)"
    text += f", {speed}"
    if rate > 0 and total is not None and total >= done:
        text += f", ETA {duration((total - done) / rate)}"
    return text


class Meter:
    """Progress of one piece of work on ``stream`` (stderr), told as it goes: ``update(n)``.

    Thread-safe (image downloads finish in a pool's threads). A ``with`` block, or ``close()``,
    ends a terminal's bar. Disabled (``enabled`` False, or no stream) it costs one branch."""

    def __init__(self, what: str, total: int | None, unit: str = "images",
                 stream: TextIO | None = None, enabled: bool = True, initial: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled and self.stream is not None
        self.what, self.total, self.unit = what, total, unit
        self.start = self.done = initial
        self._lock = threading.Lock()
        self._bar: Any = None
        self._clock = clock
        self._every = interval()
        self._started = self._last = clock() if self.enabled else 0.0
        if self.enabled and is_terminal(self.stream):
            from tqdm import tqdm

            scaled = unit == BYTES
            self._bar = tqdm(total=total, initial=initial, desc=what,
                             unit="B" if scaled else unit.rstrip("s") or unit,
                             unit_scale=scaled, file=self.stream, leave=False,
                             dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        if not self.enabled:
            return
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
                return
            now = self._clock()
            # No line for the end: the work's own next message says it is done.
            if now - self._last >= self._every and (self.total is None or self.done < self.total):
                self.stream.write(line(self.what, self.done, self.total, self.unit,
                                       now - self._started, self.start) + "\n")
                self.stream.flush()
                self._last = now

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tracked(items: Iterable[T], what: str, total: int, unit: str = "images",
            size: Callable[[T], int] = lambda item: 1, stream: TextIO | None = None,
            enabled: bool = True, clock: Callable[[], float] = time.monotonic) -> Iterator[T]:
    """``items`` as they come, with progress on ``stream`` (stderr) counted by ``size(item)``."""
    with Meter(what, total, unit, stream, enabled, clock=clock) as meter:
        for item in items:
            yield item
            meter.update(size(item))


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
