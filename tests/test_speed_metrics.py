"""Timings apart from the scores: evaluate, export and train write their timings to
metrics/speed/, each a median over repeated passes with its quartiles; `dvc metrics show` /
`diff` show the scores alone, and the offline report the scores first. On a shared CPU one pass
can take 100x another; a comparison of two experiments must lead with quality. Timings are never
asserted here: the clock is replaced where a figure is checked."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from stages import export as export_stage
from stages import report
from stages.common.alarm import calibration as cal, point as pt
from stages.common.config.paths import (EVAL_METRICS, EVAL_SPEED, EXPORT_METRICS, EXPORT_SPEED,
                                        SPEED_FILES, TRAIN_SPEED)
from stages.common.inference import speed
from stages.common.infra.atomic import write_json
from stages.common.infra.digest import file_sha256
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.conditions import stage as conditions
from stages.evaluate import stage as evaluate
from tests import paramfile
from tests.tiny_project import write_noise_test_split

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["animal", "object", "person"]
SIZE = 32
TIMING_FIELDS = {"speed", "train_seconds", "train_images_per_s"}


def test_speed_figures_are_medians_with_their_quartiles(monkeypatch):
    """A clock that each pass moves on by a chosen time: 5 batch-1 passes of 1, 2, 3, 4 and 100
    ms (one slowed by a neighbour) give the median 3 ms and quartiles 2 and 4 ms (the inclusive
    method: the 2nd and 4th of 5 sorted values); 3 passes of 8 images in 10, 20 and 40 ms give
    800, 400 and 200 images/s: median 400, quartiles 300 and 600. Warm-up passes are untimed."""
    durations = {"one": [7.0] * speed.WARMUP + [0.003, 0.1, 0.001, 0.004, 0.002],
                 "batch": [7.0] * speed.WARMUP + [0.02, 0.01, 0.04]}
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def forward(x):
        clock[0] += durations[x].pop(0)

    figures = speed.speed_figures(forward, "one", "batch", 8, runs=5)
    assert figures == {"batch1_ms_per_image": 3.0, "batch1_ms_q1": 2.0, "batch1_ms_q3": 4.0,
                       "batch1_runs": 5, "batch1_images_per_s": 333.3, "batch_size": 8,
                       "batch_images_per_s": 400.0, "batch_images_per_s_q1": 300.0,
                       "batch_images_per_s_q3": 600.0, "batch_runs": 3}
    assert durations == {"one": [], "batch": []}  # every pass ran, warm-up included


def test_one_timed_pass_is_its_own_median_and_quartiles(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock[0])

    def forward(_):
        clock[0] += 0.005

    figures = speed.speed_figures(forward, "one", "batch", 4, runs=1)
    assert figures["batch1_ms_q1"] == figures["batch1_ms_per_image"] == \
        figures["batch1_ms_q3"] == 5.0 and figures["batch1_runs"] == 1
    assert figures["batch_runs"] == 3  # at least 3 passes of the batch


def stage_of(pipeline: dict, path: Path) -> list[str]:
    """The stages of dvc.yaml whose outs or metrics name ``path``."""
    return [name for name, stage in pipeline["stages"].items()
            for kind in ("outs", "metrics") for entry in stage.get(kind, [])
            if (entry if isinstance(entry, str) else next(iter(entry))) == path.as_posix()]


def test_each_timings_file_is_an_uncached_out_of_the_stage_that_measures_not_a_metric():
    """`dvc metrics diff` lists its files in no fixed order (a set's): a timings file among the
    metrics could lead a comparison of two experiments. So each is an uncached out of its stage
    (git-tracked beside the scores, rewritten by every run), and no metric of dvc.yaml."""
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "metrics" not in pipeline  # no top-level metrics
    for path, stage in zip(SPEED_FILES, ("train", "evaluate", "export")):
        assert stage_of(pipeline, path) == [stage], path
        outs = {next(iter(e)): e[next(iter(e))] for e in pipeline["stages"][stage]["outs"]
                if isinstance(e, dict)}
        assert outs[path.as_posix()] == {"cache": False}, path


def test_dvc_metrics_diff_shows_the_scores_and_its_targets_option_the_timings(tmp_path):
    """This project's dvc.yaml in a git repository with one small file per score and timing, a
    commit, then every file changed: `dvc metrics diff` holds the scores only, and
    `dvc metrics diff --targets metrics/speed -R` (what the docs give) the timings."""
    def run(*args: str) -> str:
        return subprocess.run(args, cwd=tmp_path, capture_output=True, text=True,
                              check=True).stdout

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    paramfile.write(tmp_path)  # dvc.yaml reads ${data.mirror}
    run("git", "init", "-q")
    run(sys.executable, "-m", "dvc", "init", "-q")
    pipeline = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    scores = {next(iter(e)) if isinstance(e, dict) else e
              for stage in pipeline["stages"].values() for e in stage.get("metrics", [])}
    timings = {p.as_posix() for p in SPEED_FILES}
    for figure in (1, 2):
        for name in sorted(scores | timings):
            write_json(tmp_path / name, {"figure": figure})
        if figure == 1:
            run("git", "add", "-A")
            run("git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false",
                "commit", "-qm", "run")
    dvc = (sys.executable, "-m", "dvc", "metrics", "diff", "--json")
    assert set(json.loads(run(*dvc))) == scores
    assert set(json.loads(run(*dvc, "--targets", "metrics/speed", "-R"))) == timings


def test_the_report_tables_put_the_timings_last():
    table = {name: {"figure": {"workspace": 1}} for name in
             [EXPORT_SPEED.as_posix(), EVAL_METRICS.as_posix(), TRAIN_SPEED.as_posix(),
              "metrics/split.json", EVAL_SPEED.as_posix(), EXPORT_METRICS.as_posix()]}
    page = report.compared_metrics_html(table, {}, ["workspace"], [], [])
    order = [name for name in table if f"<h3>{name}</h3>" in page]
    assert sorted(order, key=page.index) == [
        "metrics/eval.json", "metrics/export.json", "metrics/split.json",
        "metrics/speed/eval.json", "metrics/speed/export.json", "metrics/speed/train.json"]


@pytest.fixture
def evaluated_project(tmp_path, monkeypatch):
    """A project after calibrate (a random checkpoint, its sealed point, 2 test crops per
    label, metrics/split.json), params for seconds, evaluate, conditions and export run in
    it."""
    torch.manual_seed(0)
    checkpoint = tmp_path / "data/model/best.pt"
    checkpoint.parent.mkdir(parents=True)
    save_checkpoint(checkpoint, build_model("resnet18", 3, 0.3).eval(), ModelMeta(
        arch="resnet18", classes=CLASSES, image_size=SIZE, mean=IMAGENET_MEAN,
        std=IMAGENET_STD, dropout=0.3))
    write_json(tmp_path / "data/calibration/operating_point.json", pt.seal({
        "format": 1, "label": "person", "temperature": 1.5, "threshold": cal.probability(1.0),
        "threshold_log_odds": 1.0, "target_recall": 0.99,
        "val": {"persons": 29, "resolved": False}, "model": "data/model/best.pt",
        "model_sha256": file_sha256(checkpoint)}))
    write_noise_test_split(tmp_path, CLASSES, SIZE)
    counts = {"animal": 2, "object": 2, "person": 2, "total": 6}
    write_json(tmp_path / "metrics/split.json",
               {"crops": {"train": counts, "val": counts, "test": counts}})
    paramfile.write(tmp_path, {"evaluate": {"device": "cpu", "speed_runs": 2, "mistakes": 2,
                                            "batch_size": 16},
                               "conditions": {"device": "cpu", "measure": {"jpeg": [1]}},
                               "export": {"speed_runs": 2, "batch_size": 2}})
    monkeypatch.chdir(tmp_path)
    evaluate.main()
    conditions.main()
    export_stage.main()
    return tmp_path


def test_evaluate_and_export_write_their_timings_apart_from_their_scores(evaluated_project):
    scores = json.loads(EVAL_METRICS.read_text())
    exported = json.loads(EXPORT_METRICS.read_text())
    assert not TIMING_FIELDS & (set(scores) | set(exported))
    assert {"accuracy", "macro_f1", "operating_point"} <= set(scores)
    assert {"arch", "onnx_mb", "opset", "parity"} <= set(exported)

    figures = set(speed.speed_figures(lambda _: None, 0, 0, 1, runs=1))
    timed = json.loads(EVAL_SPEED.read_text())
    assert set(timed) == figures | {"arch", "device", "threads"}
    assert timed["arch"] == "resnet18" and timed["batch1_runs"] == 2 \
        and timed["batch_size"] == 6  # evaluate.batch_size 16, at most the 6 test crops
    assert timed["batch1_ms_q1"] <= timed["batch1_ms_per_image"] <= timed["batch1_ms_q3"]

    timed = json.loads(EXPORT_SPEED.read_text())
    assert set(timed["pytorch_eager"]) == set(timed["onnxruntime"]) == figures
    assert {"arch", "device", "threads", "onnxruntime_speedup_batch1"} < set(timed)
    onnx = timed["onnxruntime"]
    card = Path("data/export/MODEL_CARD.md").read_text()
    assert (f"Batch 1: {onnx['batch1_ms_per_image']} ms/image in ONNX Runtime, "
            f"{timed['pytorch_eager']['batch1_ms_per_image']} ms in") in card
    assert f"{onnx['batch1_ms_q1']} to {onnx['batch1_ms_q3']} ms" in card

