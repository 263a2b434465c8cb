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

import numpy as np

from stages.common.alarm.labelled import alarm_under
from stages.common.alarm.point import OperatingPoint
from stages.common.inference.corrupted import Classify, corrupted_logits


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


def jobs_of(measure: dict[str, list[int]]) -> list[tuple[str, int]]:
    """``conditions.measure``'s (condition, severity) pairs, in the order the suite runs
    them."""
    return [(condition, severity) for condition, severities in measure.items()
            for severity in severities]


def suite(pixels: np.ndarray, keys: list[str], targets: np.ndarray, classes: list[str],
          point: OperatingPoint, classify: Classify, measure: dict[str, list[int]], seed: int,
          pictures=None, batch_size: int = 256, threads: int = 1) -> dict:
    """The figures clean and for each condition and severity in ``measure``.

    ``pixels``: uint8 N x H x W x 3 RGB crops; ``keys``: each crop's name inside its set (its
    corruptions' seed, so a crop keeps them whatever else is in the set); ``targets``: class
    indices into ``classes``; ``classify``: one batch of at most ``batch_size`` crops -> logits."""
    clean_logits = np.concatenate([classify(pixels[i:i + batch_size])
                                   for i in range(0, len(pixels), batch_size)])
    clean = alarm_under(clean_logits, targets, classes, point, pictures)
    jobs = jobs_of(measure)
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
