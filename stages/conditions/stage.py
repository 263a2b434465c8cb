"""Stage `conditions`: the person alarm on the test split under each camera condition.

At calibrate's sealed operating point (read and checked as evaluate reads it), for every
condition and severity of ``conditions.measure``: accuracy, person recall with its one-sided 95 %
Clopper-Pearson lower bound, false alarms per 1,000 with the upper bound (over source pictures,
as evaluate counts them), whether the target is met, and ImageNet-C's corruption error against
the clean crops. Writes metrics/conditions.json, plots/conditions/<condition>.csv (recall and its
bound by severity, severity 0 the clean crops; dvc.yaml's plots) and plots/conditions/grid.png
(condition x severity, coloured by the recall's lower bound). Each corrupted crop is computed
once, from (seed, condition, severity, crop) alone, and the model sees them in batches.

Which conditions the model was trained on is read from its checkpoint's recipe (train.augment:
conditions and train.augment_conditions), not from params.yaml: each condition's ``trained_on``
says it, and ``train_augment`` the recipe's augmentation; the others are held out (measured,
never trained on).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and air-gapped boxes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from stages.common.alarm.calibration import crop_pictures, unlisted_line  # noqa: E402
from stages.common.alarm.point import operating_point_for  # noqa: E402
from stages.common.config import params  # noqa: E402
from stages.common.config.paths import (CHECKPOINT, CONDITIONS_METRICS,  # noqa: E402
                                        CONDITIONS_PLOTS, OPERATING_POINT, SPLIT_MANIFEST,
                                        TEST_SPLIT)
from stages.common.inference.corrupted import (crop_keys, host_pixels,  # noqa: E402
                                               pixel_classifier)
from stages.common.inference.logits import checked_crops  # noqa: E402
from stages.common.infra.atomic import atomic_file, clean_dead_leftovers, write_json  # noqa: E402
from stages.common.infra.errors import main_guard  # noqa: E402
from stages.common.model.build import load_checkpoint  # noqa: E402
from stages.common.model.device import pick_device, torch_threads  # noqa: E402
from stages.conditions.measure import suite  # noqa: E402

PNG_META = {"Software": None}  # deterministic PNG bytes: no software version in the metadata
CSV_COLUMNS = ("person_recall", "person_recall_lower_95", "false_alarms_per_1000",
               "false_alarms_per_1000_upper_95", "accuracy")


def trained_on(recipe: dict | None) -> list[str]:
    """The conditions a checkpoint's recipe (stages.train.stage.recipe) trained on: those of
    augment_conditions under augment: conditions; none under the report's recipe or AugMix."""
    recipe = recipe or {}
    return list(recipe.get("augment_conditions", [])) if recipe.get("augment") == "conditions" \
        else []


def mark_training(result: dict, recipe: dict | None) -> None:
    """``train_augment`` and each condition's ``trained_on`` into ``result``."""
    trained = trained_on(recipe)
    result["train_augment"] = (recipe or {}).get("augment", "report")
    for name, figures in result["conditions"].items():
        figures["trained_on"] = name in trained


def condition_label(name: str, figures: dict) -> str:
    return f"{name} (trained on)" if figures.get("trained_on") else name


def write_csvs(result: dict, folder: Path) -> None:
    """One CSV per condition for DVC's linear template: a row per severity, 0 the clean crops."""
    for condition, figures in result["conditions"].items():
        rows = [(0, result["clean"])] + [(int(k[1:]), v) for k, v in figures.items()
                                          if k.startswith("s") and k[1:].isdigit()]
        with atomic_file(folder / f"{condition}.csv") as f:
            f.write("severity," + ",".join(CSV_COLUMNS) + "\n")
            for severity, row in rows:
                f.write(f"{severity}," + ",".join("" if row[c] is None else f"{row[c]:.6g}"
                                                  for c in CSV_COLUMNS) + "\n")


def grid_png(result: dict, target: float, path: Path) -> None:
    """Condition x severity, each cell coloured by the lower bound of person recall, its recall,
    bound and false alarms per 1,000 written in it, and framed where the bound reaches the
    target."""
    names = list(result["conditions"])
    severities = sorted({int(k[1:]) for c in result["conditions"].values() for k in c
                         if k.startswith("s") and k[1:].isdigit()})
    columns = [("clean", None)] + [(f"severity {s}", s) for s in severities]
    bounds = np.full((len(names), len(columns)), np.nan)
    fig, ax = plt.subplots(figsize=(1.3 * len(columns) + 2, 0.65 * len(names) + 1.6))
    for i, name in enumerate(names):
        for j, (_, severity) in enumerate(columns):
            cell = result["clean"] if severity is None else \
                result["conditions"][name].get(f"s{severity}")
            if cell is None or cell["person_recall_lower_95"] is None:
                continue
            bounds[i, j] = cell["person_recall_lower_95"]
            raised = cell["false_alarms_per_1000"]
            ax.text(j, i, f"{cell['person_recall']:.3f}\n>= {cell['person_recall_lower_95']:.3f}"
                    f"\nFA {'-' if raised is None else f'{raised:.0f}'}/1000", ha="center",
                    va="center", fontsize=6.5,
                    fontweight="bold" if cell["target_met"] else "normal")
            if cell["target_met"]:
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2,
                                           ec="black"))
    image = ax.imshow(bounds, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(columns)), [c for c, _ in columns], fontsize=8)
    ax.set_yticks(range(len(names)),
                  [condition_label(n, result["conditions"][n]) for n in names], fontsize=8)
    fig.colorbar(image, ax=ax, label="person recall, 95 % lower bound")
    ax.set_title(f"Person alarm under camera conditions (test): recall, its lower bound, false "
                 f"alarms per 1,000;\nframed, bold: lower bound >= target {target}", fontsize=9)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata=PNG_META)
    plt.close(fig)


def summary_lines(result: dict, target: float) -> list[str]:
    clean = result["clean"]
    lines = [f"clean: recall {clean['person_recall']} (>= {clean['person_recall_lower_95']}); "
             f"target {target}: {clean['target_verdict']}"]
    for name, figures in result["conditions"].items():
        kept = figures["kept_target_to_severity"]
        measured = [k for k in figures if k.startswith("s") and k[1:].isdigit()]
        lowest = min(int(k[1:]) for k in measured)
        said = (f"keeps its target {target} up to severity {kept}" if kept else
                f"does not keep its target {target} at severity {lowest}")
        lines.append(f"{condition_label(name, figures)}: the alarm {said}; CE {figures['ce']}")
    return lines


@main_guard
def main() -> None:
    clean_dead_leftovers()
    everything = params.load()
    cfg = everything.conditions
    device = pick_device(cfg.device)
    model, meta = load_checkpoint(CHECKPOINT)
    point = operating_point_for(CHECKPOINT, OPERATING_POINT)  # before any corruption
    model = model.to(device, memory_format=torch.channels_last)
    crops = checked_crops(TEST_SPLIT, meta, CHECKPOINT, torch.device("cpu"), keep="host")
    pixels, keys = host_pixels(crops), crop_keys(crops.paths)
    pictures, unlisted = crop_pictures(crops.paths, SPLIT_MANIFEST)
    classify = pixel_classifier(model, meta, device, CHECKPOINT)
    jobs = sum(len(s) for s in cfg.measure.values())
    # one worker per core, each corrupting a batch and running its forward pass on one
    # thread: no core waits at a barrier inside a layer (BENCHMARKS.md section 8)
    threads = torch.get_num_threads()
    workers = threads if device.type == "cpu" else os.cpu_count() or 1
    print(f"conditions: {len(keys)} test crops x {jobs} conditions and severities, batches of "
          f"{cfg.batch_size} on {device.type} in {workers} workers", flush=True)
    with torch_threads(1 if device.type == "cpu" else threads):
        result = suite(pixels, keys, crops.targets.numpy(), meta.classes, point, classify,
                       cfg.measure, everything.seed, pictures, cfg.batch_size, threads=workers)
    result.update({"point_sha256": point.point_sha256, "target_recall": point.target_recall,
                   "test_crops": len(keys), "seed": everything.seed})
    mark_training(result, meta.params)
    write_json(CONDITIONS_METRICS, result)
    CONDITIONS_PLOTS.mkdir(parents=True, exist_ok=True)
    write_csvs(result, CONDITIONS_PLOTS)
    grid_png(result, point.target_recall, CONDITIONS_PLOTS / "grid.png")
    print("\n".join(summary_lines(result, point.target_recall)))
    line = unlisted_line(unlisted, len(keys), SPLIT_MANIFEST)
    if line:
        print(line, file=sys.stderr)
