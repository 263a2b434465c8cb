"""A load generator: busy processes that keep CPU cores loaded as a video decoder does.

    python -m benchmarks.load --cores 2 --seconds 60      # in one shell
    python -m stages.predict ... --threads 1              # in another, under that load

An edge box decodes its cameras' video on the same cores that run the classifier. Each worker
process here decodes one 1280 x 720 JPEG frame (the intra frame of an MJPEG stream; libjpeg-turbo
through simplejpeg, the decoder extract_crops uses) again and again, as fast as it can, at the
normal priority a decoder runs at: a core kept busy with the same kind of work (entropy
decoding, IDCT, colour conversion, memory traffic), without any video file. ``--cores N``
workers keep N cores busy. It prints the frames each worker decoded per second, so a run says
how much work the load did, besides what it did to what ran beside it.

In Python, :class:`Load` is a context manager (benchmarks/model_table.py's loaded columns):

    with Load(cores=2):
        time_something()
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import numpy as np

from stages.common.infra.errors import ArgumentParser, ParamError, main_guard

WIDTH, HEIGHT = 1280, 720  # a 720p camera stream
STOP_WAIT_S = 5.0  # how long stop() waits for a worker to see the stop flag before killing it


def frame(seed: int = 0) -> bytes:
    """A 720p JPEG whose content decodes like a camera frame's: smooth gradients plus noise
    (flat colour would decode far faster than a real scene)."""
    import simplejpeg

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    base = np.stack([(x * 255 // WIDTH), (y * 255 // HEIGHT), ((x + y) * 255 // (WIDTH + HEIGHT))],
                    axis=-1)
    noise = rng.integers(-40, 40, size=base.shape)
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    return simplejpeg.encode_jpeg(pixels, quality=85, colorspace="RGB")


def decode_until(stop, frames, seed: int) -> None:
    """A worker: decode one frame over and over until ``stop`` is set, counting in ``frames``."""
    import simplejpeg

    data = frame(seed)
    while not stop.is_set():
        simplejpeg.decode_jpeg(data)
        with frames.get_lock():
            frames.value += 1


class Load:
    """``cores`` decoding processes, started by :meth:`start` (or ``with``) and ended by
    :meth:`stop`; :meth:`pause` and :meth:`resume` stop and continue them (SIGSTOP, SIGCONT)
    in a moment, so quiet and loaded timings can alternate; ``frames_per_s()``: what each did
    per second of running."""

    def __init__(self, cores: int):
        if cores < 1:
            raise ValueError(f"cores={cores}; expected 1 or more")
        self.cores = cores
        # spawn, not fork: the parent may hold OpenMP or ONNX Runtime threads that a forked
        # child would inherit half-initialised
        self.context = multiprocessing.get_context("spawn")
        self.stop_flag = self.context.Event()
        self.counters = [self.context.Value("q", 0) for _ in range(cores)]
        self.workers: list = []
        self.started = 0.0
        self.first = [0] * cores
        self.paused_at: float | None = None
        self.paused_s = 0.0

    def start(self) -> Load:
        self.workers = [self.context.Process(target=decode_until, daemon=True,
                                             args=(self.stop_flag, counter, i))
                        for i, counter in enumerate(self.counters)]
        for worker in self.workers:
            worker.start()
        # Busy only once every worker decodes (spawn imports take a second or more): timing
        # started before would be timing a quiet machine.
        deadline = time.monotonic() + 60
        while any(c.value == 0 for c in self.counters) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.started = time.monotonic()
        self.first = [c.value for c in self.counters]
        return self

    def frames_per_s(self) -> list[float]:
        now = time.monotonic()
        paused = self.paused_s + (now - self.paused_at if self.paused_at is not None else 0.0)
        elapsed = max(now - self.started - paused, 1e-9)
        return [round((c.value - f) / elapsed, 1) for c, f in zip(self.counters, self.first)]

    def _signal(self, sig: int) -> None:
        for worker in self.workers:
            if worker.is_alive():
                os.kill(worker.pid, sig)

    def pause(self) -> None:
        if self.paused_at is None:
            self._signal(signal.SIGSTOP)
            self.paused_at = time.monotonic()

    def resume(self) -> None:
        if self.paused_at is not None:
            self._signal(signal.SIGCONT)
            self.paused_s += time.monotonic() - self.paused_at
            self.paused_at = None

    def stop(self) -> None:
        self.resume()  # a stopped process would never see the flag
        self.stop_flag.set()
        for worker in self.workers:
            worker.join(STOP_WAIT_S)
            if worker.is_alive():
                worker.kill()
                worker.join()

    def __enter__(self) -> Load:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@main_guard
def main(argv: list[str] | None = None) -> None:
    ap = ArgumentParser(prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                    help="decoding processes, one per core to keep busy (default: every core)")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long (default 60)")
    args = ap.parse_args(argv)
    if args.cores < 1 or args.seconds <= 0:
        raise ParamError(f"--cores {args.cores} --seconds {args.seconds:g}: expected at least "
                         "one core and more than 0 seconds")
    with Load(args.cores) as load:
        print(f"{args.cores} decoding processes (pids "
              f"{', '.join(str(w.pid) for w in load.workers)}) for {args.seconds:g} s",
              flush=True)
        try:
            time.sleep(args.seconds)
        except KeyboardInterrupt:
            pass
        rates = load.frames_per_s()
    print(f"720p JPEG frames decoded per second, per process: {rates}")


if __name__ == "__main__":
    main()
