"""PNG figures for evaluate: confusion matrix with counts, learning curves from DVCLive's TSVs."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and air-gapped boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from stages.common.atomic import atomic_file  # noqa: E402

# Deterministic PNG bytes: no creation time or software version in the metadata.
PNG_META = {"Software": None}


def _save(fig, path: Path) -> None:
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata=PNG_META)
    plt.close(fig)


def confusion_png(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(4.8, 4.2))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    threshold = matrix.max() / 2 if matrix.size else 0
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center",
                    color="white" if matrix[i, j] > threshold else "black")
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
                     color="firebrick" if item["true"] == "person" else "black")
    fig.suptitle(f"{title} ({len(items)} shown, of {total} test crops)")
    fig.tight_layout()
    _save(fig, path)
