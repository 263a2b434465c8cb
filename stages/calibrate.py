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
  * ``modes`` (only with ``calibrate.modes``): one threshold per camera mode (Mondrian
    calibration), each fitted by the same rule on the split's crops as that mode sees them
    (under its conditions, stages.common.pictures.corrupt; none: the clean crops), with its own
    figures, bounds, persons needed and ``resolved`` (:func:`camera_mode`); the top-level
    threshold stays the clean one, what predict uses unless told ``--mode``;
  * ``point_sha256``: the seal over all of the above (stages.common.alarm.point.seal); every
    reader refuses a file whose content no longer matches it.
evaluate scores the operating point on test; export embeds it in the ONNX file; predict answers
with it.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np
import torch

from stages.common.alarm.calibration import (alarm_figures, crop_pictures, ece,
                                             fit_temperature, interval_warnings, nll,
                                             person_log_odds, person_threshold, picture_codes,
                                             probability, softmax, temperature_interval,
                                             temperature_warnings, threshold_order,
                                             unlisted_line)
from stages.common.alarm.guarantee import alarm_bounds, assurance, persons_needed
from stages.common.alarm.point import FORMAT, MODES_KEY, ModeThreshold, OperatingPoint, seal
from stages.common.alarm.statement import UNRESOLVED, point_facts, point_parts, threshold_text
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL
from stages.common.config.paths import (CALIBRATION_SPLIT, CHECKPOINT, OPERATING_POINT,
                                        SPLIT_MANIFEST, VAL_SPLIT)
from stages.common.inference.batches import CropSet
from stages.common.inference.corrupted import (crop_keys, host_pixels, mode_labels,
                                               pixel_classifier, under_mode)
from stages.common.inference.logits import checked_crops, labelled_logits
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
    threshold, val = fitted_threshold(logits, targets, classes, temperature, target, rule,
                                      delta, pictures)
    return {
        "format": FORMAT, "label": ALARM_LABEL, "temperature": temperature,
        "temperature_interval": temperature_interval(logits, targets, seed, pictures=pictures),
        "threshold": probability(threshold), "threshold_log_odds": threshold,
        "target_recall": target, "guarantee": rule, "delta": delta,
        "val": {**val,
                # on the crops T was fitted on: evaluate's calibration.* are out of sample
                "in_sample_nll_before": round(nll(logits, targets, 1.0), 4),
                "in_sample_nll_after": round(nll(logits, targets, temperature), 4),
                "in_sample_ece_before": round(ece(before, targets), 4),
                "in_sample_ece_after": round(ece(after, targets), 4)},
    }


def fitted_threshold(logits, targets, classes: list[str], temperature: float, target: float,
                     rule: str, delta: float, pictures=None) -> tuple[float, dict]:
    """The person threshold (log-odds) ``rule`` chooses on these crops at ``temperature``, and
    its figures there: recall and false alarms with their bounds, what it promises new persons,
    the pictures with persons the rule needs and whether these held them (``resolved``)."""
    person = classes.index(ALARM_LABEL)
    is_person = targets == person
    scores = person_log_odds(logits, temperature, person)
    threshold = person_threshold(scores, is_person, target, rule, delta, pictures)
    _, k, resolved = threshold_order(scores, is_person, target, rule, delta, pictures)
    figures = alarm_figures(scores, is_person, threshold, pictures)
    return threshold, {"crops": int(len(targets)),
                       "pictures": len(np.unique(picture_codes(pictures, len(targets)))),
                       **figures, **alarm_bounds(figures, target),
                       **assurance(figures["person_pictures"], k, target),
                       "persons_needed": persons_needed(rule, target, delta),
                       "resolved": resolved}


def camera_mode(mode, logits, targets, classes: list[str], temperature: float, target: float,
                rule: str, delta: float, pictures=None) -> dict:
    """One camera mode's threshold (Mondrian calibration: the rule run on that mode's crops
    alone, so its guarantee is its own): ``logits``, ``targets`` and ``pictures`` are the
    calibration crops as the mode sees them, each corrupted copy of a crop under the picture of
    that crop (the copies of one picture are not independent, and the rule counts pictures).
    The temperature stays the point's: one calibrated probability per picture for predict to
    show, whatever the mode."""
    threshold, val = fitted_threshold(logits, targets, classes, temperature, target, rule,
                                      delta, pictures)
    return {"name": mode.name, "conditions": list(mode.conditions),
            "severities": list(mode.severities), "threshold": probability(threshold),
            "threshold_log_odds": threshold, "val": val}


def mode_crops(mode, crops: CropSet, logits: np.ndarray, targets: np.ndarray, pictures: list,
               classify, seed: int, batch_size: int):
    """(logits, targets, pictures) of the calibration crops as ``mode`` sees them: the clean
    crops for a mode without conditions, else every crop under each of its conditions at each
    of its severities (stages.common.pictures.corrupt, seeded per crop as the conditions stage
    seeds test crops)."""
    if not mode.conditions:
        return logits, targets, pictures
    seen = under_mode(mode, host_pixels(crops), crop_keys(crops.paths), seed, classify,
                      batch_size, threads=os.cpu_count() or 1)
    return (seen, *mode_labels(mode, targets, pictures))


def statement_lines(point: OperatingPoint) -> tuple[list[str], list[str]]:
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
    if cfg.modes:  # none (the default): no key, the file as before modes existed
        point[MODES_KEY] = camera_modes(cfg, everything.seed, source, model, meta, device,
                                        point["temperature"], logits, targets, pictures)
    written = seal({**point, "fitted_on": str(source), "model": str(CHECKPOINT),
                    "model_sha256": file_sha256(CHECKPOINT)})
    # read back as every reader will: a point calibrate writes must pass the readers' check
    point = OperatingPoint.parse(written, source=str(OPERATING_POINT))
    write_json(OPERATING_POINT, written)

    val, interval = point.val, written["temperature_interval"]
    print(f"calibrate on {source}: temperature {point.temperature:.4f} (95 % bootstrap "
          f"{interval['low']} to {interval['high']}; in-sample NLL "
          f"{val['in_sample_nll_before']} -> {val['in_sample_nll_after']}, ECE "
          f"{val['in_sample_ece_before']} -> {val['in_sample_ece_after']})\n"
          f"person threshold {threshold_text(point.threshold, point.threshold_log_odds)} "
          f"for recall >= {cfg.person_recall_target} (guarantee {cfg.guarantee}): "
          f"recall {val['person_recall']} (95 % lower bound {val['person_recall_lower_95']}), "
          f"{val['false_alarms']} false alarms of {val['non_persons']} non-persons")
    said, warned = statement_lines(point)
    if said:
        print(" ".join(said))
    for line in (temperature_warnings(point.temperature, logits, targets)
                 + interval_warnings(interval)):
        print(line, file=sys.stderr)
    note = unlisted_line(unlisted, len(targets), SPLIT_MANIFEST)
    for line in ([note] if note else []) + warned:
        print(line, file=sys.stderr)
    for mode in point.modes:
        said, warned = mode_lines(point, mode)
        print(said)
        for line in warned:
            print(line, file=sys.stderr)


def camera_modes(cfg, seed: int, source: Path, model, meta, device, temperature: float,
                 logits: np.ndarray, targets: np.ndarray, pictures: list) -> list[dict]:
    """Each of ``cfg.modes`` (calibrate.modes) with its own threshold and figures, on the
    calibration crops as that mode sees them; corrupted crops start from pixels decoded on the
    CPU (the same bytes on every machine, as the conditions stage's)."""
    host = (checked_crops(source, meta, CHECKPOINT, torch.device("cpu"), keep="host")
            if any(mode.conditions for mode in cfg.modes) else None)
    classify = pixel_classifier(model, meta, device, CHECKPOINT)
    out = []
    for mode in cfg.modes:
        seen = mode_crops(mode, host, logits, targets, pictures, classify, seed,
                          cfg.batch_size)
        out.append(camera_mode(mode, seen[0], seen[1], meta.classes, temperature,
                               cfg.person_recall_target, cfg.guarantee, cfg.delta, seen[2]))
    return out


def mode_lines(point: OperatingPoint, mode: ModeThreshold) -> tuple[str, list[str]]:
    """(the mode's threshold and figures, for stdout; its warnings, for stderr): the same
    statement as the point's, on the mode's own crops."""
    val = mode.val
    crops = (f"under {', '.join(mode.conditions)} at severities "
             f"{', '.join(map(str, mode.severities))}" if mode.conditions else "clean")
    said = (f"camera mode {mode.name} ({val['crops']} crops {crops}): person threshold "
            f"{threshold_text(mode.threshold, mode.threshold_log_odds)}: recall "
            f"{val['person_recall']} (95 % lower bound {val['person_recall_lower_95']}), "
            f"{val['false_alarms']} false alarms of {val['non_persons']} non-persons")
    told, warned = statement_lines(dataclasses.replace(
        point, threshold=mode.threshold, threshold_log_odds=mode.threshold_log_odds,
        val=mode.val, modes=()))
    said = " ".join([said + "."] + told) if told else said
    return said, [f"warning: camera mode {mode.name}: {line[len('warning: '):]}"
                  for line in warned]


if __name__ == "__main__":
    main()
