"""The person alarm on labelled crops, clean and under each camera condition, at a sealed
operating point: the figures and bounds evaluate gives (one bound function,
stages.common.alarm.statement.tested_facts, counted over source pictures), per condition and
severity, and ImageNet-C's corruption error.

:func:`suite` takes crops as pixels, their labels and picture ids, a ``classify`` function
(uint8 pixels -> logits) and the point, so any labelled set can be measured the same way: the
test split here, a site's own ImageFolder later.

Corruption error (Hendrycks & Dietterich 2019): ImageNet-C divides a model's top-1 error under a
corruption by a baseline's (AlexNet's); here the baseline is the same model on the clean crops,
CE = error under the condition / clean error, per severity, and per condition the mean over its
severities' errors divided by the clean error. A clean error of 0 leaves CE undefined (any error
under the condition is infinitely worse, none is as good): it is written as null, and the errors
themselves are always there.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from stages.common.alarm.labelled import alarm_under
from stages.conditions.corrupt import corrupt

Classify = Callable[[np.ndarray], np.ndarray]  # uint8 N x H x W x 3 -> logits N x classes


def corruption_error(error: float, clean_error: float) -> float | None:
    """ImageNet-C's CE against the clean model; None when the clean error is 0."""
    return round(error / clean_error, 4) if clean_error > 0 else None


def kept_to(by_severity: dict[int, dict]) -> int:
    """The highest severity up to which every measured severity meets the target; 0 when the
    lowest measured one does not."""
    kept = 0
    for severity in sorted(by_severity):
        if not by_severity[severity]["target_met"]:
            break
        kept = severity
    return kept


def corrupted_logits(pixels: np.ndarray, keys: list[str], jobs: list[tuple[str, int]],
                     seed: int, classify: Classify, batch_size: int, threads: int
                     ) -> list[np.ndarray]:
    """The logits of every crop under each (condition, severity) of ``jobs``: each corrupted
    crop computed once and classified in batches of ``batch_size`` that run across jobs, so no
    job's short last batch is paid for. Each of ``threads`` workers corrupts a batch and
    classifies it (OpenCV, numpy and the forward pass release the GIL), so the corruptions of
    one batch overlap the forward pass of another with no barrier between them, and memory
    holds ``threads`` batches; each crop's draws are its own, so the count changes nothing."""
    n, total = len(keys), len(keys) * len(jobs)

    def batch_logits(start: int) -> np.ndarray:
        return classify(np.stack([corrupt(pixels[k % n], *jobs[k // n], seed, keys[k % n])
                                  for k in range(start, min(start + batch_size, total))]))

    with ThreadPoolExecutor(max(1, threads)) as pool:
        rows = list(pool.map(batch_logits, range(0, total, batch_size)))
    logits = np.concatenate(rows) if rows else np.zeros((0, 0))
    return [logits[j * n:(j + 1) * n] for j in range(len(jobs))]


def suite(pixels: np.ndarray, keys: list[str], targets: np.ndarray, classes: list[str],
          point: dict, classify: Classify, measure: dict[str, list[int]], seed: int,
          pictures=None, batch_size: int = 256, threads: int = 1) -> dict:
    """The figures clean and for each condition and severity in ``measure``.

    ``pixels``: uint8 N x H x W x 3 RGB crops; ``keys``: each crop's name inside its set (its
    corruptions' seed, so a crop keeps them whatever else is in the set); ``targets``: class
    indices into ``classes``; ``classify``: one batch of at most ``batch_size`` crops -> logits."""
    clean_logits = np.concatenate([classify(pixels[i:i + batch_size])
                                   for i in range(0, len(pixels), batch_size)])
    clean = alarm_under(clean_logits, targets, classes, point, pictures)
    jobs = [(condition, severity) for condition, severities in measure.items()
            for severity in severities]
    logits = dict(zip(jobs, corrupted_logits(pixels, keys, jobs, seed, classify, batch_size,
                                             threads)))
    out = {"clean": clean, "conditions": {}}
    errors = []
    for condition, severities in measure.items():
        by_severity = {}
        for severity in severities:
            figures = alarm_under(logits[condition, severity], targets, classes, point,
                                  pictures)
            figures["ce"] = corruption_error(figures["error"], clean["error"])
            by_severity[severity] = figures
        mean_error = float(np.mean([f["error"] for f in by_severity.values()]))
        errors.append(mean_error)
        out["conditions"][condition] = {
            **{f"s{s}": f for s, f in by_severity.items()},
            "kept_target_to_severity": kept_to(by_severity),
            "ce": corruption_error(mean_error, clean["error"])}
    mean = float(np.mean(errors)) if errors else None  # no conditions: the clean figures only
    out["mce"] = None if mean is None else corruption_error(mean, clean["error"])
    out["mean_error"] = None if mean is None else round(mean, 4)
    return out
