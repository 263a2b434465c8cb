"""Stage `calibrate`: the person alarm's operating point, fitted on val (or the calibration
split) only.

Reads data/model/best.pt and data/split/val, or data/split/calibration when
``split.calibration`` > 0 (val also picks the best epoch, which flatters both numbers below; the
test split stays unseen until evaluate), with data/split/manifest.csv for each crop's source
picture, and writes data/calibration/operating_point.json:
  * ``temperature``: one scalar that divides the logits before the softmax, fitted by minimising
    the negative log-likelihood (stages.common.alarm.calibration), with a seeded bootstrap interval
    (``temperature_interval``, resampling pictures); stderr warns when T or its interval sits at
    an end of its range or the crops hold no error to learn from;
  * ``threshold``: the calibrated person probability at or above which a picture raises the
    alarm, chosen by the rule ``calibrate.guarantee`` names (how, and what each rule promises:
    docs/stages.md, "The person alarm's operating point");
  * the figures at that point (``val``, whichever split it was fitted on): recall and false
    alarms with their one-sided 95 % Clopper-Pearson bounds, what the threshold promises on new
    persons, the checkpoint's SHA-256 (predict uses the file only for that checkpoint), and
    whether the split held enough pictures with persons for the rule (``persons_needed``
    counts pictures, read from data/split/manifest.csv: crops of one picture are not
    independent; fewer: every person there must raise the alarm, ``resolved: false``, and the
    stage says so in one line); NLL and ECE before / after T as ``in_sample_*``: measured on
    the crops T was fitted on (evaluate's ``calibration.*`` are the out-of-sample figures).
  * ``point_sha256``: the seal over all of the above (stages.common.alarm.calibration.seal); every
    reader refuses a file whose content no longer matches it.
evaluate scores the operating point on test; export embeds it in the ONNX file; predict answers
with it.
"""
from __future__ import annotations

import sys

import numpy as np
import torch

from stages.common.alarm.calibration import (FORMAT, alarm_figures, crop_pictures, ece,
                                             fit_temperature, interval_warnings, nll,
                                             person_log_odds, person_threshold, picture_codes,
                                             probability, seal, softmax, temperature_interval,
                                             temperature_warnings, threshold_order,
                                             unlisted_line)
from stages.common.alarm.guarantee import alarm_bounds, assurance, persons_needed
from stages.common.alarm.statement import UNRESOLVED, point_facts, point_parts, threshold_text
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL
from stages.common.config.paths import (CALIBRATION_SPLIT, CHECKPOINT, OPERATING_POINT,
                                        SPLIT_MANIFEST, VAL_SPLIT)
from stages.common.inference.logits import labelled_logits
from stages.common.infra.atomic import clean_dead_leftovers, write_json
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError, main_guard
from stages.common.model.build import load_checkpoint
from stages.common.model.device import pick_device


def operating_point(logits, targets, classes: list[str], target: float,
                    rule: str = "none", delta: float = 0.05, seed: int = 0,
                    pictures=None) -> dict:
    """Temperature, threshold and the figures for ``logits`` and ``targets`` (val or the
    calibration split; the figures are under ``val`` either way). ``pictures``: the source
    picture of each crop (stages.common.alarm.calibration.crop_pictures); the rule, the bounds
    and T's bootstrap count pictures. None: every crop its own picture."""
    if ALARM_LABEL not in classes:
        raise StageError(f"{CHECKPOINT} was trained on {classes}, with no '{ALARM_LABEL}' "
                         "label; add it under data.labels and retrain")
    temperature = fit_temperature(logits, targets)
    before, after = softmax(logits), softmax(logits, temperature)
    person = classes.index(ALARM_LABEL)
    is_person = targets == person
    scores = person_log_odds(logits, temperature, person)
    threshold = person_threshold(scores, is_person, target, rule, delta, pictures)
    _, k, resolved = threshold_order(scores, is_person, target, rule, delta, pictures)
    figures = alarm_figures(scores, is_person, threshold, pictures)
    return {
        "format": FORMAT, "label": ALARM_LABEL, "temperature": temperature,
        "temperature_interval": temperature_interval(logits, targets, seed, pictures=pictures),
        "threshold": probability(threshold), "threshold_log_odds": threshold,
        "target_recall": target, "guarantee": rule, "delta": delta,
        "val": {"crops": int(len(targets)),
                "pictures": len(np.unique(picture_codes(pictures, len(targets)))),
                **figures, **alarm_bounds(figures, target),
                **assurance(figures["person_pictures"], k, target),
                "persons_needed": persons_needed(rule, target, delta), "resolved": resolved,
                # on the crops T was fitted on: evaluate's calibration.* are out of sample
                "in_sample_nll_before": round(nll(logits, targets, 1.0), 4),
                "in_sample_nll_after": round(nll(logits, targets, temperature), 4),
                "in_sample_ece_before": round(ece(before, targets), 4),
                "in_sample_ece_after": round(ece(after, targets), 4)},
    }


def statement_lines(point: dict) -> tuple[list[str], list[str]]:
    """(what the point gives new persons, for stdout; warnings, for stderr), from the alarm's
    statement (stages.common.alarm.statement): too few pictures with persons for the rule, and
    the caveat when val both picked the epoch and fitted the point."""
    parts = point_parts(point_facts(point))
    said, warned = [], []
    if parts["resolution"].startswith(UNRESOLVED):
        warned.append(f"warning: {parts['resolution'][len(UNRESOLVED):]} {parts['gives']} "
                      "More data or a larger split.calibration resolves it.")
    else:
        said = [parts["resolution"], parts["gives"]]
    if "caveat" in parts:
        warned.append("warning: " + parts["caveat"][len("Caveat: "):])
    return said, warned


@main_guard
def main() -> None:
    clean_dead_leftovers()
    everything = params.load()
    cfg = everything.calibrate
    source = CALIBRATION_SPLIT if everything.split.calibration > 0 else VAL_SPLIT
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    model = model.to(device, memory_format=torch.channels_last)
    crops, logits, targets = labelled_logits(model, meta, source, CHECKPOINT, device,
                                             cfg.batch_size, "calibrate")
    pictures, unlisted = crop_pictures(crops.paths, SPLIT_MANIFEST)
    point = operating_point(logits, targets, meta.classes, cfg.person_recall_target,
                            cfg.guarantee, cfg.delta, everything.seed, pictures)
    point = seal({**point, "fitted_on": str(source), "model": str(CHECKPOINT),
                  "model_sha256": file_sha256(CHECKPOINT)})
    write_json(OPERATING_POINT, point)

    val, interval = point["val"], point["temperature_interval"]
    print(f"calibrate on {source}: temperature {point['temperature']:.4f} (95 % bootstrap "
          f"{interval['low']} to {interval['high']}; in-sample NLL "
          f"{val['in_sample_nll_before']} -> {val['in_sample_nll_after']}, ECE "
          f"{val['in_sample_ece_before']} -> {val['in_sample_ece_after']})\n"
          f"person threshold {threshold_text(point['threshold'], point['threshold_log_odds'])} "
          f"for recall >= {cfg.person_recall_target} (guarantee {cfg.guarantee}): "
          f"recall {val['person_recall']} (95 % lower bound {val['person_recall_lower_95']}), "
          f"{val['false_alarms']} false alarms of {val['non_persons']} non-persons")
    said, warned = statement_lines(point)
    if said:
        print(" ".join(said))
    for line in (temperature_warnings(point["temperature"], logits, targets)
                 + interval_warnings(interval)):
        print(line, file=sys.stderr)
    note = unlisted_line(unlisted, len(targets), SPLIT_MANIFEST)
    for line in ([note] if note else []) + warned:
        print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
