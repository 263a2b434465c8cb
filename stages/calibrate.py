"""Stage `calibrate`: the person alarm's operating point, fitted on val (or the calibration
split) only.

Reads data/model/best.pt and data/split/val, or data/split/calibration when
``split.calibration`` > 0 (val also picks the best epoch, which flatters both numbers below; the
test split stays unseen until evaluate), and writes data/calibration/operating_point.json:
  * ``temperature``: one scalar that divides the logits before the softmax, fitted by minimising
    the negative log-likelihood (stages.common.alarm.calibration), with a seeded bootstrap interval
    (``temperature_interval``); stderr warns when T sits at an end of its range or the crops
    hold no error to learn from;
  * ``threshold``: the calibrated person probability at or above which a picture raises the
    alarm, chosen by the rule ``calibrate.guarantee`` names (how, and what each rule promises:
    docs/stages.md, "The person alarm's operating point");
  * the figures at that point (``val``, whichever split it was fitted on): recall and false
    alarms with their one-sided 95 % Clopper-Pearson bounds, what the threshold promises on new
    persons, the checkpoint's SHA-256 (predict uses the file only for that checkpoint), and
    whether the split held enough persons for the rule (``persons_needed``; fewer: every person
    there must raise the alarm, ``resolved: false``, and the stage says so in one line).
  * ``point_sha256``: the seal over all of the above (stages.common.alarm.calibration.seal); every
    reader refuses a file whose content no longer matches it.
evaluate scores the operating point on test; export embeds it in the ONNX file; predict answers
with it.
"""
from __future__ import annotations

import sys

import torch

from stages.common.alarm.calibration import (ALARM_LABEL, FORMAT, alarm_figures, ece,
                                             fit_temperature, nll, person_log_odds,
                                             person_threshold, probability, seal,
                                             softmax, temperature_interval, temperature_warnings,
                                             threshold_order)
from stages.common.alarm.guarantee import alarm_bounds, assurance, persons_needed
from stages.common.alarm.statement import UNRESOLVED, point_facts, point_parts, threshold_text
from stages.common.config import params
from stages.common.config.paths import CALIBRATION_SPLIT, CHECKPOINT, OPERATING_POINT, VAL_SPLIT
from stages.common.inference.logits import labelled_logits
from stages.common.infra.atomic import write_json
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError, main_guard
from stages.common.model.build import load_checkpoint
from stages.common.model.device import pick_device


def operating_point(logits, targets, classes: list[str], target: float,
                    rule: str = "none", delta: float = 0.05, seed: int = 0) -> dict:
    """Temperature, threshold and the figures for ``logits`` and ``targets`` (val or the
    calibration split; the figures are under ``val`` either way)."""
    if ALARM_LABEL not in classes:
        raise StageError(f"{CHECKPOINT} was trained on {classes}, with no '{ALARM_LABEL}' "
                         "label; add it under data.labels and retrain")
    temperature = fit_temperature(logits, targets)
    before, after = softmax(logits), softmax(logits, temperature)
    person = classes.index(ALARM_LABEL)
    is_person = targets == person
    scores = person_log_odds(logits, temperature, person)
    threshold = person_threshold(scores, is_person, target, rule, delta)
    _, k, resolved = threshold_order(scores, is_person, target, rule, delta)
    figures = alarm_figures(scores, is_person, threshold)
    return {
        "format": FORMAT, "label": ALARM_LABEL, "temperature": temperature,
        "temperature_interval": temperature_interval(logits, targets, seed),
        "threshold": probability(threshold), "threshold_log_odds": threshold,
        "target_recall": target, "guarantee": rule, "delta": delta,
        "val": {"crops": int(len(targets)), **figures, **alarm_bounds(figures, target),
                **assurance(figures["persons"], k, target),
                "persons_needed": persons_needed(rule, target, delta), "resolved": resolved,
                "nll_before": round(nll(logits, targets, 1.0), 4),
                "nll_after": round(nll(logits, targets, temperature), 4),
                "ece_before": round(ece(before, targets), 4),
                "ece_after": round(ece(after, targets), 4)},
    }


def statement_lines(point: dict) -> tuple[list[str], list[str]]:
    """(what the point gives new persons, for stdout; warnings, for stderr), from the alarm's
    statement (stages.common.alarm.statement): too few persons for the rule, and the caveat
    when val both picked the epoch and fitted the point."""
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
    everything = params.load()
    cfg = everything.calibrate
    source = CALIBRATION_SPLIT if everything.split.calibration > 0 else VAL_SPLIT
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    model = model.to(device, memory_format=torch.channels_last)
    _, logits, targets = labelled_logits(model, meta, source, CHECKPOINT, device,
                                         cfg.batch_size, "calibrate")
    point = operating_point(logits, targets, meta["classes"], cfg.person_recall_target,
                            cfg.guarantee, cfg.delta, everything.seed)
    point = seal({**point, "fitted_on": str(source), "model": str(CHECKPOINT),
                  "model_sha256": file_sha256(CHECKPOINT)})
    write_json(OPERATING_POINT, point)

    val, interval = point["val"], point["temperature_interval"]
    print(f"calibrate on {source}: temperature {point['temperature']:.4f} (95 % bootstrap "
          f"{interval['low']} to {interval['high']}; NLL {val['nll_before']} -> "
          f"{val['nll_after']}, ECE {val['ece_before']} -> {val['ece_after']})\n"
          f"person threshold {threshold_text(point['threshold'], point['threshold_log_odds'])} "
          f"for recall >= {cfg.person_recall_target} (guarantee {cfg.guarantee}): "
          f"recall {val['person_recall']} (95 % lower bound {val['person_recall_lower_95']}), "
          f"{val['false_alarms']} false alarms of {val['non_persons']} non-persons")
    said, warned = statement_lines(point)
    if said:
        print(" ".join(said))
    for line in temperature_warnings(point["temperature"], logits, targets) + warned:
        print(line, file=sys.stderr)

if __name__ == "__main__":
    main()
