"""Stage `calibrate`: the person alarm's operating point, fitted on the val split only.

Reads data/model/best.pt and data/split/val (the test split stays unseen until evaluate) and
writes data/calibration/operating_point.json:
  * ``temperature``: one scalar that divides the logits before the softmax, fitted by minimising
    the val negative log-likelihood (stages.common.calibration);
  * ``threshold``: the calibrated person probability at or above which a picture raises the
    alarm: val person recall >= ``calibrate.person_recall_target`` with the fewest val false
    alarms, halfway (in log-odds) between the last person it must catch and the first
    non-person below it (stages.common.calibration.person_threshold);
  * the val figures at that point, the checkpoint's SHA-256 (predict uses the file only for that
    checkpoint), and whether val held enough persons to resolve the target (1 / (1 - target)
    persons; fewer: every val person must raise the alarm, and the stage says so).
  * ``point_sha256``: the seal over all of the above (stages.common.calibration.seal); every
    reader refuses a file whose content no longer matches it.
evaluate scores the operating point on test; export embeds it in the ONNX file; predict answers
with it.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from stages.common import params
from stages.common.atomic import write_json
from stages.common.calibration import (ALARM_LABEL, FORMAT, OPERATING_POINT, alarm_figures,
                                       ece, fit_temperature, nll, person_log_odds,
                                       person_threshold, persons_needed, probability,
                                       seal, softmax, threshold_text)
from stages.common.digest import file_sha256
from stages.common.errors import StageError, main_guard
from stages.common.model import load_checkpoint, pick_device
from stages.common.predictor import labelled_logits

CHECKPOINT = Path("data/model/best.pt")
VAL_DIR = Path("data/split/val")


def operating_point(logits, targets, classes: list[str], target: float) -> dict:
    """Temperature, threshold and the val figures for val ``logits`` and ``targets``."""
    if ALARM_LABEL not in classes:
        raise StageError(f"{CHECKPOINT} was trained on {classes}, with no '{ALARM_LABEL}' "
                         "label; add it under data.labels and retrain")
    temperature = fit_temperature(logits, targets)
    before, after = softmax(logits), softmax(logits, temperature)
    person = classes.index(ALARM_LABEL)
    is_person = targets == person
    scores = person_log_odds(logits, temperature, person)
    threshold = person_threshold(scores, is_person, target)
    needed = persons_needed(target)
    return {
        "format": FORMAT, "label": ALARM_LABEL, "temperature": temperature,
        "threshold": probability(threshold), "threshold_log_odds": threshold,
        "target_recall": target,
        "val": {"crops": int(len(targets)),
                **alarm_figures(scores, is_person, threshold),
                "persons_needed": needed, "resolved": bool(is_person.sum() >= needed),
                "nll_before": round(nll(logits, targets, 1.0), 4),
                "nll_after": round(nll(logits, targets, temperature), 4),
                "ece_before": round(ece(before, targets), 4),
                "ece_after": round(ece(after, targets), 4)},
    }


@main_guard
def main() -> None:
    cfg = params.load().calibrate
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    model = model.to(device, memory_format=torch.channels_last)
    _, logits, targets = labelled_logits(model, meta, VAL_DIR, CHECKPOINT, device,
                                         cfg.batch_size, "calibrate")
    point = operating_point(logits, targets, meta["classes"], cfg.person_recall_target)
    point = seal({**point, "model": str(CHECKPOINT), "model_sha256": file_sha256(CHECKPOINT)})
    write_json(OPERATING_POINT, point)

    val = point["val"]
    print(f"calibrate: temperature {point['temperature']:.4f} (val NLL {val['nll_before']} -> "
          f"{val['nll_after']}, ECE {val['ece_before']} -> {val['ece_after']})\n"
          f"person threshold {threshold_text(point['threshold'], point['threshold_log_odds'])} "
          f"for recall >= {cfg.person_recall_target}: "
          f"val recall {val['person_recall']}, {val['false_alarms']} false alarms of "
          f"{val['non_persons']} non-persons")
    if not val["resolved"]:
        print(f"warning: val holds {val['persons']} persons; a recall target of "
              f"{cfg.person_recall_target} needs {val['persons_needed']} to be resolved, so every "
              "val person must raise the alarm (a stricter threshold than the target asks); "
              "more data or a larger split.val resolves it", file=sys.stderr)


if __name__ == "__main__":
    main()
