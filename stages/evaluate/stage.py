"""Stage `evaluate`: score the best checkpoint on the held-out test split, once.

Writes metrics/eval.json (accuracy, macro / weighted F1, per-class precision / recall / F1 /
support, person recall, the report's goals as pass/fail, and the person alarm at calibrate's
operating point: ``operating_point.*`` with one-sided 95 % Clopper-Pearson bounds of test recall
and false alarms, counted over source pictures (data/split/manifest.csv: crops of one picture
are not independent; stages.common.alarm.guarantee says why pictures), and ``calibration.*``:
ECE, NLL and Brier score before and after temperature scaling), metrics/speed/eval.json (ms / image at batch 1 and images / s at
``evaluate.batch_size`` on the evaluation device: medians with their quartiles, apart from the
scores because they swing with the machine's load), plots/eval/confusion.csv (for DVC's
confusion template), CSVs for DVC's linear template (precision-recall per class and the person
ROC, thresholds as log-odds; the reliability diagram before and after calibration) and PNGs of
the confusion matrix (counts and normalised by true class), the curves, the learning curves and
the most confident mistakes (the gallery lives here because this stage already holds every
prediction).
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import (classification_report, confusion_matrix,
                             precision_recall_curve, roc_curve)

from stages.common.alarm.calibration import (alarm_figures, brier, crop_pictures, ece, nll,
                                             operating_point_for, person_log_odds, reliability,
                                             softmax, unlisted_line)
from stages.common.alarm.statement import (InconsistentFigures, point_facts, statement,
                                           tested_facts, threshold_text)
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL
from stages.common.config.paths import (CHECKPOINT, EVAL_METRICS, EVAL_PLOTS, EVAL_SPEED,
                                        OPERATING_POINT, SPLIT_MANIFEST, TEST_SPLIT,
                                        TRAIN_METRICS, TRAIN_PLOTS)
from stages.common.inference.batches import CropSet, normalise
from stages.common.inference.logits import labelled_logits
from stages.common.inference.speed import speed_figures
from stages.common.infra.atomic import atomic_file, clean_dead_leftovers, write_json
from stages.common.infra.errors import StageError, main_guard
from stages.common.model.build import load_checkpoint
from stages.common.model.checkpoint import ModelMeta
from stages.common.model.device import pick_device
from stages.common.pictures import decode as pictures
from stages.evaluate import figures

GOAL = 0.90  # the report's target for accuracy and F1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure_speed(model, crops: CropSet, meta: ModelMeta, device: torch.device, batch_size: int,
                  runs: int) -> dict:
    """Median forward time at batch 1 (an operator's single picture) and at ``batch_size``, with
    the quartiles of the passes."""
    n = min(batch_size, len(crops))
    batch = normalise(crops.take(torch.arange(n), device), meta.mean, meta.std)
    one = batch[:1].contiguous(memory_format=torch.channels_last)
    timing = speed_figures(model, one, batch, n, runs, sync=lambda: _sync(device))
    return {"device": device.type, "threads": torch.get_num_threads(), **timing}


def score(targets: np.ndarray, preds: np.ndarray, classes: list[str]) -> dict:
    report = classification_report(targets, preds, labels=list(range(len(classes))),
                                   target_names=classes, output_dict=True, zero_division=0)
    per_class = {c: {"precision": round(report[c]["precision"], 4),
                     "recall": round(report[c]["recall"], 4),
                     "f1": round(report[c]["f1-score"], 4),
                     "support": int(report[c]["support"])} for c in classes}
    accuracy = float((targets == preds).mean())
    macro_f1 = report["macro avg"]["f1-score"]
    result = {
        "accuracy": round(accuracy, 4),
        "macro_f1": round(macro_f1, 4),
        "weighted_f1": round(report["weighted avg"]["f1-score"], 4),
        "per_class": per_class,
        "test_crops": int(len(targets)),
        "goals": {"accuracy_ge_0_90": bool(accuracy >= GOAL), "macro_f1_ge_0_90": bool(macro_f1 >= GOAL)},
    }
    if ALARM_LABEL in per_class:  # the figure that matters at the fence
        result["person_recall"] = per_class[ALARM_LABEL]["recall"]
    return result


def stated(facts: dict) -> list[str]:
    """The alarm's statement of ``facts``; figures no reader could put into words stop the
    stage in one line (the point is sealed, so only a bad calibrate writes them)."""
    try:
        return statement(facts)
    except InconsistentFigures as exc:
        raise StageError(f"{OPERATING_POINT}: its figures cannot be stated ({exc}); "
                         "run `dvc repro calibrate` again") from None


def alarm_metrics(logits: np.ndarray, targets: np.ndarray, classes: list[str],
                  point: dict, pictures=None) -> dict:
    """The person alarm at calibrate's operating point, on test: the alarm's statement figures
    (stages.common.alarm.statement: what the point gives new persons, the test counts with
    one-sided 95 % Clopper-Pearson bounds over ``pictures`` (each crop's source picture; None:
    every crop its own) and the verdict met / not shown / not met), and the
    calibration's effect (ECE, NLL, Brier before / after)."""
    temperature = point["temperature"]
    before, after = softmax(logits), softmax(logits, temperature)
    person = classes.index(ALARM_LABEL)
    alarm = alarm_figures(person_log_odds(logits, temperature, person),
                          targets == person, point["threshold_log_odds"], pictures)
    op = {**point_facts(point), **tested_facts(alarm, point["target_recall"]),
          "point_sha256": point["point_sha256"]}  # export embeds only the point evaluated here
    stated(op)
    return {
        "operating_point": op,
        "calibration": {"temperature": round(temperature, 4),
                        "ece_before": round(ece(before, targets), 4),
                        "ece_after": round(ece(after, targets), 4),
                        "nll_before": round(nll(logits, targets, 1.0), 4),
                        "nll_after": round(nll(logits, targets, temperature), 4),
                        "brier_before": round(brier(before, targets), 4),
                        "brier_after": round(brier(after, targets), 4)},
    }


def _rows(path: Path, header: str, rows) -> None:
    with atomic_file(path) as f:
        f.write(header + "\n")
        for row in rows:
            f.write(",".join(f"{v:.6g}" if isinstance(v, float) else str(v) for v in row) + "\n")


def write_curves(log_odds: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    """CSVs for DVC's linear template, one point per threshold where the curve turns; returns
    the curves for the PNG. ``log_odds``: each class's calibrated log-odds (N x classes), so a
    threshold keeps its resolution where the probability rounds to 1; thresholds are written
    so (``threshold_log_odds``), and the ROC's first point, where no picture raises the alarm,
    as ``inf``."""
    curves = {"pr": {}, "reliability": {}}
    for k, name in enumerate(classes):
        precision, recall, thresholds = precision_recall_curve(
            targets == k, log_odds[:, k], drop_intermediate=True)
        # the last point (recall 0, precision 1) has no threshold
        rows = list(zip(recall[:-1].tolist(), precision[:-1].tolist(), thresholds.tolist()))
        _rows(EVAL_PLOTS / "pr" / f"{name}.csv", "recall,precision,threshold_log_odds", rows)
        curves["pr"][name] = rows
    person = classes.index(ALARM_LABEL)
    fpr, tpr, thresholds = roc_curve(targets == person, log_odds[:, person],
                                     drop_intermediate=True)
    curves["roc"] = list(zip(fpr.tolist(), tpr.tolist(), thresholds.tolist()))
    _rows(EVAL_PLOTS / "roc_person.csv", "fpr,tpr,threshold_log_odds", curves["roc"])
    return curves


def class_log_odds(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Every class's calibrated log-odds, one column per class."""
    return np.stack([person_log_odds(logits, temperature, k) for k in range(logits.shape[1])],
                    axis=1)


def write_reliability(before: np.ndarray, after: np.ndarray, targets: np.ndarray) -> dict:
    bins = {"before": reliability(before, targets), "after": reliability(after, targets)}
    for name, rows in bins.items():
        _rows(EVAL_PLOTS / "reliability" / f"{name}.csv", "confidence,accuracy,count", rows)
    return bins


def write_confusion_csv(path: Path, targets, preds, classes) -> None:
    with atomic_file(path) as f:
        f.write("actual,predicted\n")
        for t, p in zip(targets, preds):
            f.write(f"{classes[t]},{classes[p]}\n")


def most_confident_mistakes(probs: np.ndarray, targets: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` wrong predictions with the highest confidence, ties by index."""
    preds = probs.argmax(1)
    wrong = np.flatnonzero(preds != targets)
    confidence = probs[wrong, preds[wrong]]
    order = np.lexsort((wrong, -confidence))  # last key first: confidence down, then index up
    return [int(i) for i in wrong[order][:k]]


def mistakes_gallery(crops: CropSet, probs: np.ndarray, targets: np.ndarray, k: int,
                     title: str) -> None:
    classes = crops.classes
    items = []
    for i in most_confident_mistakes(probs, targets, k):
        path = Path(crops.paths[i])
        pred = int(probs[i].argmax())
        pixels = pictures.decode(path.read_bytes(), colours=pictures.RGB, checked=False)
        items.append({"image": pixels, "true": classes[targets[i]], "pred": classes[pred],
                      "confidence": float(probs[i, pred]), "name": path.name})
    figures.mistakes_png(items, EVAL_PLOTS / "mistakes.png", title, total=len(targets))


def best_epoch() -> int | None:
    from stages.common.infra.jsonfile import JsonProblem, read_json

    if not TRAIN_METRICS.exists():
        return None
    try:
        scores = read_json(TRAIN_METRICS)
    except (OSError, JsonProblem) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StageError(f"{TRAIN_METRICS}: cannot read it ({why}); run `dvc repro train`") \
            from None
    return scores.get("best_epoch") if isinstance(scores, dict) else None


@main_guard
def main() -> None:
    clean_dead_leftovers()
    cfg = params.load().evaluate
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    point = operating_point_for(CHECKPOINT, OPERATING_POINT)  # before the minutes of inference
    stated(point_facts(point))
    model = model.to(device, memory_format=torch.channels_last)
    crops, logits, targets = labelled_logits(model, meta, TEST_SPLIT, CHECKPOINT, device,
                                             cfg.batch_size, "evaluate")
    preds = logits.argmax(1)
    probs = softmax(logits, point["temperature"])  # argmax unchanged; what predict shows
    classes = meta.classes

    metrics = score(targets, preds, classes)
    pictures, unlisted = crop_pictures(crops.paths, SPLIT_MANIFEST)
    metrics.update(alarm_metrics(logits, targets, classes, point, pictures))
    metrics["arch"] = meta.arch
    speed = {"arch": meta.arch,
             **measure_speed(model, crops, meta, device, cfg.batch_size, cfg.speed_runs)}
    write_json(EVAL_SPEED, speed)
    write_json(EVAL_METRICS, metrics)

    EVAL_PLOTS.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(EVAL_PLOTS / "confusion.csv", targets, preds, classes)
    matrix = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    figures.confusion_png(matrix, classes, EVAL_PLOTS / "confusion.png",
                          f"{meta.arch} test (n={len(targets)})")
    curves = write_curves(class_log_odds(logits, point["temperature"]), targets, classes)
    bins = write_reliability(softmax(logits), probs, targets)
    figures.alarm_png(curves, bins, metrics, EVAL_PLOTS / "alarm.png")
    figures.learning_curves_png(figures.read_history(TRAIN_PLOTS),
                                EVAL_PLOTS / "learning_curves.png", best_epoch())
    mistakes_gallery(crops, probs, targets, cfg.mistakes,
                     f"{meta.arch}: most confident test mistakes")

    print(classification_report(targets, preds, labels=list(range(len(classes))),
                                target_names=classes, digits=4, zero_division=0))
    print(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
          f"person recall {metrics.get('person_recall', float('nan')):.4f}  "
          f"batch-1 {speed['batch1_ms_per_image']} ms/image on {device.type} (median; "
          f"quartiles {speed['batch1_ms_q1']}-{speed['batch1_ms_q3']})")
    op = metrics["operating_point"]
    print(f"person alarm at {threshold_text(op['threshold'], op['threshold_log_odds'])} "
          f"(calibrated, temperature {metrics['calibration']['temperature']}): "
          + " ".join(statement(op)))
    line = unlisted_line(unlisted, len(targets), SPLIT_MANIFEST)
    if line:
        print(line, file=sys.stderr)
