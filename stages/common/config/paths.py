"""Every artifact path of the pipeline, relative to the project root (where dvc.yaml is).

The one place a stage, a command or a test learns where an output lies: a folder renamed here
and in dvc.yaml moves it everywhere. tests/test_layout.py checks that every path here is one of
dvc.yaml's outs, metrics or plots (or lies inside one) but those in NOT_OUTPUTS, that every
output of dvc.yaml is named here, and that no other module of stages/ spells one.
"""
from __future__ import annotations

from pathlib import Path

# download
RAW = Path("data/raw")
DOWNLOAD_METRICS = Path("metrics/download.json")

# extract_crops
CROPS = Path("data/crops")
CROPS_METRICS = Path("metrics/crops.json")

# split: one ImageFolder (<label>/<crop>) per split
SPLIT_DIR = Path("data/split")
TRAIN_SPLIT = SPLIT_DIR / "train"
VAL_SPLIT = SPLIT_DIR / "val"
TEST_SPLIT = SPLIT_DIR / "test"
CALIBRATION_SPLIT = SPLIT_DIR / "calibration"  # only when split.calibration > 0
SPLIT_MANIFEST = SPLIT_DIR / "manifest.csv"  # each crop's split, label and source ImageID
SPLIT_METRICS = Path("metrics/split.json")

# train
MODEL_DIR = Path("data/model")
CHECKPOINT = MODEL_DIR / "best.pt"
TRAIN_PLOTS = Path("plots/train")  # DVCLive's folder
TRAIN_METRICS = Path("metrics/train.json")
# What an interrupted train resumes from (stages/train/state.py): on purpose no output of
# dvc.yaml, so that `dvc exp run`, which checks the committed outputs out first, keeps it.
TRAIN_RESUME = Path("data/train_resume")
NOT_OUTPUTS = {TRAIN_RESUME}
# Timings live apart from the scores, one file per stage that measures: they swing with the
# machine's load; dvc.yaml makes them outs, not metrics, so `dvc metrics diff` shows quality.
TRAIN_SPEED = Path("metrics/speed/train.json")

# calibrate
CALIBRATION_DIR = Path("data/calibration")
OPERATING_POINT = CALIBRATION_DIR / "operating_point.json"

# evaluate
EVAL_PLOTS = Path("plots/eval")
EVAL_METRICS = Path("metrics/eval.json")
EVAL_SPEED = Path("metrics/speed/eval.json")

# conditions
CONDITIONS_PLOTS = Path("plots/conditions")  # one CSV per condition, the grid PNG
CONDITIONS_METRICS = Path("metrics/conditions.json")

# accept: a site's own labelled crops (params accept.folders)
ACCEPT_METRICS = Path("metrics/accept.json")

# export
EXPORT_DIR = Path("data/export")
EXPORT_METRICS = Path("metrics/export.json")
EXPORT_SPEED = Path("metrics/speed/export.json")

SPEED_FILES = (TRAIN_SPEED, EVAL_SPEED, EXPORT_SPEED)  # the timings, in pipeline order
