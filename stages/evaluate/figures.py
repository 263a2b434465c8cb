"""PNG figures for evaluate: confusion matrix (counts and normalised by true class), the person
alarm's curves, learning curves from DVCLive's TSVs, the most confident mistakes."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and air-gapped boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stages.common.infra.atomic import atomic_file  # noqa: E402
from stages.common.alarm.statement import threshold_text  # noqa: E402
from stages.common.config.labels import ALARM_LABEL  # noqa: E402

# Deterministic PNG bytes: no creation time or software version in the metadata.
PNG_META = {"Software": None}


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata=PNG_META)
    plt.close(fig)


def _matrix(ax, values: np.ndarray, text: np.ndarray, classes: list[str], title: str) -> None:
    ax.imshow(values, cmap="Blues", vmin=0)
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = values.max() / 2 if values.size else 0
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            ax.text(j, i, text[i, j], ha="center", va="center",
                    color="white" if values[i, j] > threshold else "black")


def confusion_png(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Counts beside the matrix normalised by true class (each row sums to 1: its recall on the
    diagonal), so a rare class's misses are as visible as a common one's."""
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape), where=totals > 0)
    fig, axes = plt.subplots(1, 2, figsize=(9.6, 4.2))
    _matrix(axes[0], matrix, matrix.astype(str), classes, "counts")
    _matrix(axes[1], share, np.vectorize(lambda v: f"{v:.2f}")(share), classes,
            "share of each true class")
    fig.suptitle(title)
    fig.tight_layout()
    _save(fig, path)


def alarm_png(curves: dict, bins: dict, metrics: dict, path: Path) -> None:
    """Precision-recall per class, the person ROC with the operating point marked, and the
    reliability diagram before / after calibration."""
    op, cal = metrics["operating_point"], metrics["calibration"]
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.2))
    ax = axes[0]
    for name, rows in curves["pr"].items():
        recall, precision = [r[0] for r in rows], [r[1] for r in rows]
        ax.plot(recall, precision, label=name, drawstyle="steps-post")
    if op["test_person_precision"] is not None:
        ax.plot(op["test_person_recall"], op["test_person_precision"], "ko",
                label=f"{ALARM_LABEL} alarm >= " + threshold_text(op["threshold"],
                                                          op["threshold_log_odds"]))
    ax.set(xlabel="recall", ylabel="precision", title="precision-recall (test)",
           xlim=(0, 1.02), ylim=(0, 1.02))
    ax = axes[1]
    ax.plot([r[0] for r in curves["roc"]], [r[1] for r in curves["roc"]], label=ALARM_LABEL)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    if op["false_alarms_per_1000"] is not None:
        ax.plot(op["false_alarms_per_1000"] / 1000, op["test_person_recall"], "ko",
                label="operating point")
    ax.set(xlabel="false alarm rate (non-persons)", ylabel="person recall",
           title="person ROC (test)", xlim=(-0.02, 1.02), ylim=(0, 1.02))
    ax = axes[2]
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="perfectly calibrated")
    for name, ece_key in (("before", "ece_before"), ("after", "ece_after")):
        rows = bins[name]
        ax.plot([r[0] for r in rows], [r[1] for r in rows], marker="o", ms=3,
                label=f"{name} (ECE {cal[ece_key]:.3f})")
    ax.set(xlabel="confidence (top class)", ylabel="accuracy",
           title=f"reliability (test), temperature {cal['temperature']:.3g}",
           xlim=(0, 1.02), ylim=(0, 1.02))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    _save(fig, path)


def read_history(live_dir: Path) -> pd.DataFrame:
    """DVCLive's per-metric TSVs joined into one frame: epoch, train_loss, val_loss, ..."""
    frame = None
    for split in ("train", "val"):
        for metric in ("loss", "acc"):
            tsv = live_dir / "plots" / "metrics" / split / f"{metric}.tsv"
            if not tsv.is_file():
                continue
            part = pd.read_csv(tsv, sep="\t").rename(columns={metric: f"{split}_{metric}"})
            frame = part if frame is None else frame.merge(part, on="step", how="outer")
    if frame is None:
        return pd.DataFrame()
    frame["epoch"] = frame["step"] + 1
    return frame


def learning_curves_png(history: pd.DataFrame, path: Path, best_epoch: int | None) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric, label in [(axes[0], "loss", "focal loss"), (axes[1], "acc", "accuracy")]:
        for split in ("train", "val"):
            col = f"{split}_{metric}"
            if col in history:
                ax.plot(history["epoch"], history[col], marker="o", ms=3, label=split)
        if best_epoch:
            ax.axvline(best_epoch, color="grey", ls="--", lw=1, label=f"best (epoch {best_epoch})")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def mistakes_png(items: list[dict], path: Path, title: str, total: int, columns: int = 4) -> None:
    """A grid of wrong predictions, most confident first: picture, true / predicted label, p.

    ``items``: dicts with ``image`` (RGB array), ``true``, ``pred``, ``confidence``, ``name``.
    With no mistakes the PNG says so, so the plot is always there to look at.
    """
    if not items:
        fig, ax = plt.subplots(figsize=(4.8, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no mistakes among {total} test crops", ha="center", va="center")
        ax.set_title(title)
        _save(fig, path)
        return
    cols = min(columns, len(items))
    rows = -(-len(items) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.8 * rows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, item in zip(axes.flat, items):
        ax.imshow(item["image"])
        ax.set_title(f"{item['name']}\ntrue {item['true']}, pred {item['pred']}\n"
                     f"confidence {item['confidence']:.3f}", fontsize=8,
                     color="firebrick" if item["true"] == ALARM_LABEL else "black")
    fig.suptitle(f"{title} ({len(items)} shown, of {total} test crops)")
    fig.tight_layout()
    _save(fig, path)
