"""Timing a forward pass: median wall time at batch 1 (one operator's picture) and at batch N,
with the quartiles of the passes as its spread.

Shared by evaluate (PyTorch on the evaluation device) and export (PyTorch eager against ONNX
Runtime on the CPU), so every speed figure in metrics/speed/ is measured the same way. The
figures are measurements of this machine, reported, never asserted; they live apart from the
scores (metrics/eval.json, metrics/export.json), as outs rather than DVC metrics, so that
`dvc metrics diff` of two experiments shows quality, never led by timings that swing with the
machine's load (`dvc metrics diff --targets metrics/speed -R` compares them).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

WARMUP = 3  # untimed passes first: allocator, oneDNN / cuDNN kernel choice, ORT's arena
MIN_RUNS = 3  # what a time budget still lets run: a median needs a few


def timed_seconds(run: Callable[[], Any], repeats: int,
                  sync: Callable[[], None] = lambda: None,
                  budget_s: float | None = None) -> list[float]:
    """Wall time of each of ``repeats`` calls of ``run()``, after :data:`WARMUP` untimed ones;
    with ``budget_s``, fewer once the timed calls took that long (never under
    :data:`MIN_RUNS`): on a loaded CPU one pass can take 100x its quiet time."""
    for _ in range(WARMUP):
        run()
    times: list[float] = []
    for _ in range(repeats):
        if budget_s is not None and len(times) >= MIN_RUNS and sum(times) >= budget_s:
            break
        sync()
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values``; one value is all three."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def speed_figures(forward: Callable[[Any], Any], one: Any, batch: Any, batch_size: int, runs: int,
                  sync: Callable[[], None] = lambda: None,
                  budget_s: float | None = None) -> dict:
    """ms / image at batch 1 (``runs`` passes) and images / s at ``batch_size`` (runs // 5, >= 3):
    each the median over its passes, with the first and third quartiles (``_q1``, ``_q3``) as
    its spread. On a shared CPU one pass can take 100x another: the median and the quartiles
    are what a comparison of two runs should read, and they are figures, never asserted.

    ``forward`` takes an input batch; ``one`` holds one image and ``batch`` holds ``batch_size``.
    ``budget_s``: at most about that many seconds of timed passes for each of the two (see
    :func:`timed_seconds`); ``batch1_runs`` and ``batch_runs`` say how many ran.
    """
    return figures_of(timed_seconds(lambda: forward(one), runs, sync, budget_s),
                      timed_seconds(lambda: forward(batch), max(3, runs // 5), sync, budget_s),
                      batch_size)


def figures_of(ones: list[float], batches: list[float], batch_size: int) -> dict:
    """:func:`speed_figures`' figures from the seconds of each batch-1 pass and of each pass
    at ``batch_size``, however they were timed (benchmarks/model_table.py times them in
    rounds, quiet and loaded in turn)."""
    q1, t1, q3 = quartiles(ones)
    # images/s of each pass: its quartiles are the time's, the other way round
    rates = [batch_size / t for t in batches]
    rq1, rate, rq3 = quartiles(rates)
    return {"batch1_ms_per_image": round(t1 * 1000, 2),
            "batch1_ms_q1": round(q1 * 1000, 2),
            "batch1_ms_q3": round(q3 * 1000, 2),
            "batch1_runs": len(ones),
            "batch1_images_per_s": round(1 / t1, 1),
            "batch_size": batch_size,
            "batch_images_per_s": round(rate, 1),
            "batch_images_per_s_q1": round(rq1, 1),
            "batch_images_per_s_q3": round(rq3, 1),
            "batch_runs": len(rates)}
