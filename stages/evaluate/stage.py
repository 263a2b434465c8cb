"""Stage `evaluate`: score the best checkpoint on the held-out test split, once.

Writes metrics/eval.json (accuracy, macro / weighted F1, per-class precision / recall / F1 /
support, person recall, the report's goals as pass/fail, speed), plots/eval/confusion.csv (for
DVC's confusion template) and PNGs of the confusion matrix, the learning curves and the most
confident mistakes (the gallery lives here because this stage already holds every prediction).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import classification_report, confusion_matrix
from PIL import Image

from stages.common import params
from stages.common.atomic import atomic_file, write_json
from stages.common.batches import CropSet, batch_len, batches, normalise
from stages.common.errors import main_guard
from stages.common.inference import predict
from stages.common.model import check_logits, load_checkpoint, pick_device
from stages.common.predictor import checked_crops, softmax
from stages.common.progress import tracked
from stages.common.speed import speed_figures
from stages.evaluate import figures

CHECKPOINT = Path("data/model/best.pt")
TEST_DIR = Path("data/split/test")
LIVE_DIR = Path("plots/train")
TRAIN_METRICS = Path("metrics/train.json")
METRICS_FILE = Path("metrics/eval.json")
PLOTS_DIR = Path("plots/eval")
GOAL = 0.90  # the report's target for accuracy and F1


def load_test_set(meta: dict, device: torch.device) -> CropSet:
    return checked_crops(TEST_DIR, meta, CHECKPOINT, device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def measure_speed(model, crops: CropSet, meta: dict, device: torch.device, batch_size: int,
                  runs: int) -> dict:
    """Median forward time at batch 1 (an operator's single picture) and at ``batch_size``."""
    n = min(batch_size, len(crops))
    batch = normalise(crops.take(torch.arange(n), device), meta["mean"], meta["std"])
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
    if "person" in per_class:  # the figure that matters at the fence
        result["person_recall"] = per_class["person"]["recall"]
    return result


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
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        items.append({"image": pixels, "true": classes[targets[i]], "pred": classes[pred],
                      "confidence": float(probs[i, pred]), "name": path.name})
    figures.mistakes_png(items, PLOTS_DIR / "mistakes.png", title, total=len(targets))


def best_epoch() -> int | None:
    import json

    if TRAIN_METRICS.is_file():
        return json.loads(TRAIN_METRICS.read_text()).get("best_epoch")
    return None


@main_guard
def main() -> None:
    cfg = params.load().evaluate
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    crops = load_test_set(meta, device)
    model = model.to(device, memory_format=torch.channels_last)
    test_batches = batches(crops, torch.arange(len(crops)), cfg.batch_size, device,
                           meta["mean"], meta["std"])
    logits, targets = predict(model, tracked(test_batches, "evaluate", len(crops),
                                             size=batch_len), device)
    check_logits(logits, len(crops), len(meta["classes"]), CHECKPOINT)
    preds = logits.argmax(1).numpy()
    probs = softmax(logits.numpy())
    targets = targets.numpy()
    classes = meta["classes"]

    metrics = score(targets, preds, classes)
    metrics["speed"] = measure_speed(model, crops, meta, device, cfg.batch_size, cfg.speed_runs)
    metrics["arch"] = meta["arch"]
    write_json(METRICS_FILE, metrics)

    PLOTS_DIR.mkdir(parents=True, exist_ok=True)
    write_confusion_csv(PLOTS_DIR / "confusion.csv", targets, preds, classes)
    matrix = confusion_matrix(targets, preds, labels=list(range(len(classes))))
    figures.confusion_png(matrix, classes, PLOTS_DIR / "confusion.png",
                          f"{meta['arch']} test (n={len(targets)})")
    figures.learning_curves_png(figures.read_history(LIVE_DIR), PLOTS_DIR / "learning_curves.png",
                                best_epoch())
    mistakes_gallery(crops, probs, targets, cfg.mistakes,
                     f"{meta['arch']}: most confident test mistakes")

    print(classification_report(targets, preds, labels=list(range(len(classes))),
                                target_names=classes, digits=4, zero_division=0))
    print(f"accuracy {metrics['accuracy']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
          f"person recall {metrics.get('person_recall', float('nan')):.4f}  "
          f"batch-1 {metrics['speed']['batch1_ms_per_image']} ms/image on {device.type}")
