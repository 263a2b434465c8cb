"""An arch that is not a ResNet through the stages after split: train, calibrate, evaluate,
conditions and export run on a tiny colour split, each in its own process as `dvc repro` runs them, and the
arch, its normalisation and its head reach the checkpoint, the metrics and the ONNX file.

No `training` marker: it checks that the stages run and agree, never what the model learnt.
The full `dvc exp run -S model.arch=mobilenet_v3_large` on the sample is run by hand (its
figures are in the branch's report); tests/test_model.py builds, trains and exports every family.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from stages.common.model.build import load_checkpoint, normalisation
from stages.common.model.onnx import verified_bytes
from tests import paramfile
from tests.tiny_project import COLOURS, ROOT, write_colour_split

ARCH = "mobilenet_v3_small"
COUNTS = {"train": 8, "val": 4, "calibration": 6, "test": 4}


def run_stage(root: Path, stage: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{stage} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


def test_a_mobilenet_runs_train_calibrate_evaluate_and_export(tmp_path):
    write_colour_split(tmp_path, np.random.default_rng(0), COUNTS, 40)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/split.json").write_text(json.dumps({"crops": {
        split: {**{label: n for label in COLOURS}, "total": n * len(COLOURS)}
        for split, n in COUNTS.items()}}))
    paramfile.write(tmp_path, {
        "model": {"arch": ARCH, "weights": "none", "zero_init_residual": True,
                  "dropout": 0.3, "trainable": "all"},
        "train": {"epochs": 1, "batch_size": 8, "num_workers": 1, "device": "cpu", "nproc": 1,
                  "amp": "off", "compile": False},
        "split": {"calibration": 0.2},  # calibrate fits on data/split/calibration
        "calibrate": {"device": "cpu", "batch_size": 8},
        "evaluate": {"device": "cpu", "batch_size": 8, "speed_runs": 1, "mistakes": 2},
        "conditions": {"device": "cpu", "measure": {"night": [3], "fog": [3]}},
        "export": {"speed_runs": 1, "batch_size": 2}})

    log = run_stage(tmp_path, "train")
    assert f"model.zero_init_residual applies to resnet only; {ARCH} starts" in log
    model, meta = load_checkpoint(tmp_path / "data/model/best.pt")
    assert meta.arch == ARCH and (meta.mean, meta.std) == normalisation(ARCH)
    assert model.classifier[-1][1].out_features == len(COLOURS)
    for stage in ("calibrate", "evaluate", "conditions", "export"):
        run_stage(tmp_path, stage)  # export fails if ONNX and PyTorch logits differ

    assert json.loads((tmp_path / "metrics/eval.json").read_text())["arch"] == ARCH
    assert json.loads((tmp_path / "metrics/export.json").read_text())["arch"] == ARCH
    _, stored, _ = verified_bytes(tmp_path / "data/export/model.onnx")
    assert json.loads(stored["arch"]) == ARCH and json.loads(stored["mean"]) == meta.mean
    assert torch.isfinite(next(model.parameters())).all()
