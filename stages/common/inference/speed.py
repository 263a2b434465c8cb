"""Timing a forward pass: median wall time at batch 1 (one operator's picture) and at batch N.

Shared by evaluate (PyTorch on the evaluation device) and export (PyTorch eager against ONNX
Runtime on the CPU), so every speed figure in metrics/ is measured the same way. The figures are
measurements of this machine, reported, never asserted.
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

WARMUP = 3  # untimed passes first: allocator, oneDNN / cuDNN kernel choice, ORT's arena


def median_seconds(run: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None
                   ) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after :data:`WARMUP` untimed ones."""
    for _ in range(WARMUP):
        run()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def speed_figures(forward: Callable[[Any], Any], one: Any, batch: Any, batch_size: int, runs: int,
                  sync: Callable[[], None] = lambda: None) -> dict:
    """ms / image at batch 1 (``runs`` passes) and images / s at ``batch_size`` (runs // 5, >= 3).

    ``forward`` takes an input batch; ``one`` holds one image and ``batch`` holds ``batch_size``.
    """
    t1 = median_seconds(lambda: forward(one), runs, sync)
    tb = median_seconds(lambda: forward(batch), max(3, runs // 5), sync)
    return {"batch1_ms_per_image": round(t1 * 1000, 2),
            "batch1_images_per_s": round(1 / t1, 1),
            "batch_size": batch_size,
            "batch_images_per_s": round(batch_size / tb, 1)}
