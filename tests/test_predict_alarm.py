"""predict's alarm: calibrated probabilities and ``alarm`` in the table, CSV and JSON, from the
point beside a checkpoint or inside an ONNX file, overridden by --person-threshold."""
import csv
import io
import json
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from stages.common.alarm import calibration as cal, point as pt
from stages.common.infra.digest import file_sha256
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.model.onnx import export
from stages.common.serving.classifiers import OnnxClassifier, TorchClassifier
from stages.common.serving.predictor import expand, predict_paths
from tests import reference

SIZE = 32
CLASSES = ["animal", "object", "person"]
TEMPERATURE = 2.5


# Run from an empty folder: the project's own data/calibration must not answer here.
pytestmark = pytest.mark.usefixtures("elsewhere")


@pytest.fixture(scope="module")
def models(elsewhere, tmp_path_factory):
    """A random checkpoint with its operating point beside it, and its ONNX export carrying
    the point; the threshold is the median person probability of the pictures below, so some
    raise the alarm and some do not."""
    d = tmp_path_factory.mktemp("alarm")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 0.3).eval()
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    save_checkpoint(d / "best.pt", model, ModelMeta(**meta))
    pics = d / "pics"
    pics.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        cv2.imwrite(str(pics / f"p{i}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8))
    (pics / "broken.jpg").write_bytes(b"not a picture")
    plain = TorchClassifier(d / "best.pt")  # no point yet: T = 1
    logits = np.stack([p.logits for p in predict_paths(plain, expand([pics])) if not p.error])
    person = cal.softmax(logits, TEMPERATURE)[:, 2]
    threshold = float(np.median(person))
    point = pt.seal({"format": 1, "label": "person", "temperature": TEMPERATURE,
                      "threshold": cal.probability(cal.log_odds(threshold)),
                      "threshold_log_odds": cal.log_odds(threshold), "target_recall": 0.99,
                      "val": {}, "model_sha256": file_sha256(d / "best.pt")})
    (d / "operating_point.json").write_text(json.dumps(point))
    export(model, ModelMeta(**meta), d / "model.onnx", 18,
           point_for=lambda g: pt.embedded(pt.OperatingPoint.parse(point), g))
    return SimpleNamespace(pt=d / "best.pt", onnx=d / "model.onnx", pics=pics, point=point,
                           logits=logits)


@pytest.fixture
def run(predict_in_process):
    return predict_in_process


def expected_alarms(models, threshold):
    person = reference.softmax(models.logits, models.point["temperature"])[:, 2]
    return [bool(v >= threshold) for v in person]


@pytest.mark.parametrize("which", ["pt", "onnx"])
def test_json_answers_calibrated_probabilities_and_the_alarm(run, models, which):
    proc = run(models.pics, "--model", getattr(models, which), "--format", "json")
    assert proc.returncode == 1  # broken.jpg
    doc = json.loads(proc.stdout)
    assert doc["operating_point"]["threshold"] == models.point["threshold"]
    assert doc["operating_point"]["temperature"] == TEMPERATURE
    assert "embedded" in doc["operating_point"]["source"] if which == "onnx" else \
        doc["operating_point"]["source"].endswith("operating_point.json")
    answers = [p for p in doc["predictions"] if "error" not in p]
    calibrated = reference.softmax(models.logits, TEMPERATURE)  # scipy's
    for p, probs in zip(answers, calibrated):
        assert [p["probabilities"][c] for c in CLASSES] == pytest.approx(probs, abs=2e-5)
    assert [p["alarm"] for p in answers] == expected_alarms(models, models.point["threshold"])
    assert True in [p["alarm"] for p in answers] and False in [p["alarm"] for p in answers]
    assert "alarm" not in [p for p in doc["predictions"] if "error" in p][0]
    assert "warning" not in proc.stderr


def test_csv_and_table_carry_the_alarm(run, models):
    wanted = expected_alarms(models, models.point["threshold"])
    proc = run(models.pics, "--model", models.pt, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert list(rows[0]) == ["path", "label", "probability", "alarm", *CLASSES, "error"]
    assert rows[0]["error"] and rows[0]["alarm"] == ""  # broken.jpg sorts first
    assert [r["alarm"] == "yes" for r in rows[1:]] == wanted
    assert {r["alarm"] for r in rows[1:]} == {"yes", "no"}
    table = run(models.pics, "--model", models.pt).stdout.splitlines()
    assert table[0].split()[:4] == ["file", "label", "prob", "alarm"]
    assert [line.split()[3] == "yes" for line in table[2:]] == wanted


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_person_threshold_overrides_the_point_for_one_run(run, models, fmt):
    for threshold, alarm in [(0.0, True), (1.0, False)]:
        proc = run(models.pics, "--model", models.onnx, "--format", fmt,
                   "--person-threshold", threshold)
        if fmt == "json":
            doc = json.loads(proc.stdout)
            assert doc["operating_point"]["source"] == "--person-threshold"
            got = {p["alarm"] for p in doc["predictions"] if "error" not in p}
        elif fmt == "csv":
            got = {r["alarm"] == "yes" for r in csv.DictReader(io.StringIO(proc.stdout))
                   if not r["error"]}
        else:
            got = {line.split()[3] == "yes" for line in proc.stdout.splitlines()[2:]}
        assert got == {alarm}, (threshold, fmt)


@pytest.mark.parametrize("value", ["-0.1", "1.5", "nan", "high"])
def test_a_bad_person_threshold_is_one_line_exit_2(run, models, value):
    proc = run(models.pics, "--model", models.pt, "--person-threshold", value)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--person-threshold" in proc.stderr and proc.stdout == ""


def test_without_a_point_stderr_says_so_and_the_alarm_is_the_top_label(run, models, tmp_path):
    bare = tmp_path / "best.pt"
    bare.write_bytes(models.pt.read_bytes())  # same checkpoint, no operating_point.json beside
    proc = run(models.pics, "--model", bare, "--format", "json")
    assert "warning:" in proc.stderr and "dvc repro calibrate" in proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["operating_point"] == {"threshold": None, "threshold_log_odds": None,
                                      "source": None, "temperature": 1.0}
    answers = [p for p in doc["predictions"] if "error" not in p]
    plain = reference.softmax(models.logits)
    for p, probs in zip(answers, plain):
        assert [p["probabilities"][c] for c in CLASSES] == pytest.approx(probs, abs=2e-5)
        assert p["alarm"] == (p["label"] == "person")


def test_a_point_fitted_for_another_checkpoint_is_not_used(run, models, tmp_path):
    other = tmp_path / "best.pt"
    torch.manual_seed(1)
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    save_checkpoint(other, build_model("resnet18", 3, 0.3).eval(), ModelMeta(**meta))
    (tmp_path / "operating_point.json").write_text((models.pt.parent / "operating_point.json")
                                                   .read_text())
    assert TorchClassifier(other).operating_point is None
    assert TorchClassifier(models.pt).operating_point.threshold == models.point["threshold"]


def test_the_onnx_file_carries_the_point_under_its_digest(models):
    loaded = OnnxClassifier(models.onnx).operating_point
    bound = pt.embedded(pt.OperatingPoint.parse(models.point), loaded.graph_sha256)
    assert loaded.content == bound  # bound to the file's graph
    assert "model_sha256" not in loaded.content  # a file inside a model names no other file
    assert loaded.model_sha256 is None


# ----- camera modes (calibrate.modes): --mode NAME | auto ---------------------------------------

NEVER, ALWAYS = 50.0, -50.0  # log-odds no random model's person score reaches / falls below


def mode_entry(name: str, log_odds: float, conditions=()) -> dict:
    return {"name": name, "conditions": list(conditions),
            "severities": [1, 2, 3, 4, 5] if conditions else [],
            "threshold": cal.probability(log_odds), "threshold_log_odds": log_odds,
            "val": {"persons": 29, "resolved": False}}


@pytest.fixture(scope="module")
def moded(models, tmp_path_factory):
    """The checkpoint with a point of two camera modes beside it: day never raises the alarm,
    infrared always does; and a colour and a grey picture."""
    d = tmp_path_factory.mktemp("modes")
    (d / "best.pt").write_bytes(models.pt.read_bytes())
    point = pt.seal({**{k: v for k, v in models.point.items() if k != pt.SEAL_KEY},
                     "modes": [mode_entry("day", NEVER),
                               mode_entry("infrared", ALWAYS, ["infrared"])]})
    (d / "operating_point.json").write_text(json.dumps(point))
    pics = d / "pics"
    pics.mkdir()
    rng = np.random.default_rng(2)
    cv2.imwrite(str(pics / "colour.png"), rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8))
    grey = rng.integers(0, 255, (SIZE, SIZE), np.uint8)
    cv2.imwrite(str(pics / "grey.jpg"), np.repeat(grey[..., None], 3, axis=2))  # as IR cameras
    return SimpleNamespace(pt=d / "best.pt", pics=pics, point=point)


def test_mode_infrared_answers_with_its_own_threshold_and_says_so(run, moded):
    proc = run(moded.pics, "--model", moded.pt, "--format", "json", "--mode", "infrared")
    assert proc.returncode == 0 and proc.stderr == ""
    doc = json.loads(proc.stdout)
    head = doc["operating_point"]
    assert (head["mode"], head["threshold_log_odds"]) == ("infrared", ALWAYS)
    assert head["modes"] == {"infrared": {"threshold": cal.probability(ALWAYS),
                                          "threshold_log_odds": ALWAYS}}
    assert [(p["mode"], p["alarm"]) for p in doc["predictions"]] == [("infrared", True)] * 2


def test_mode_auto_takes_the_infrared_threshold_for_a_grey_picture(run, moded):
    doc = json.loads(run(moded.pics, "--model", moded.pt, "--format", "json", "--mode",
                         "auto").stdout)
    assert doc["operating_point"]["mode"] == "auto"
    assert set(doc["operating_point"]["modes"]) == {"day", "infrared"}
    got = {p["path"].rsplit("/", 1)[1]: (p["mode"], p["alarm"]) for p in doc["predictions"]}
    assert got == {"colour.png": ("day", False), "grey.jpg": ("infrared", True)}
    plain = json.loads(run(moded.pics, "--model", moded.pt, "--format", "json").stdout)
    assert "mode" not in plain["operating_point"]  # without --mode: the point's own threshold
    assert "mode" not in plain["predictions"][0]
    assert plain["operating_point"]["threshold"] == moded.point["threshold"]


@pytest.mark.parametrize("args, needle", [
    (["--mode", "night"], "--mode 'night' is not a camera mode of the operating point "),
    (["--mode", "auto", "--person-threshold", "0.5"], "both choose the threshold"),
])
def test_a_bad_mode_is_one_line_exit_2(run, moded, args, needle):
    proc = run(moded.pics, "--model", moded.pt, *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert needle in proc.stderr and ("it holds day, infrared" in proc.stderr
                                      or "--person-threshold" in proc.stderr)


def test_mode_auto_without_modes_is_one_line(run, models):
    proc = run(models.pics, "--model", models.pt, "--mode", "auto")
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1
    assert "--mode auto needs exactly one camera mode fitted on clean crops" in proc.stderr
    assert "no camera modes (calibrate.modes is empty)" in proc.stderr
