"""The operating point is sealed like the model: an edited point (a flipped digit in the log-odds,
a temperature typed in, the shown threshold alone) is refused in one line, exit code 2, by every
reader (predict on a checkpoint and on an ONNX file, evaluate, export); a missing key is one line;
the threshold shown is the one that answers; the model card states the point the ONNX file
carries, and export embeds only the point evaluate scored."""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from stages import export as export_stage, predict
from stages.common.alarm import calibration as cal, statement
from stages.common.infra.atomic import write_json
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.model.onnx import POINT_KEY, export, seal
from stages.common.serving.classifiers import OnnxClassifier
from stages.conditions import stage as conditions
from stages.evaluate import stage as evaluate
from tests import paramfile, reference
from tests.tiny_project import write_noise_test_split

SIZE = 32
CLASSES = ["animal", "object", "person"]
LOG_ODDS, TEMPERATURE = 1.663, 1.5
FILE = Path("data/calibration/operating_point.json")
CHECKPOINT = Path("data/model/best.pt")
RECALIBRATE = ("the file is damaged, edited or not calibrate's; run `dvc repro calibrate` "
               "again")
# The attacks on the file's text, as a user's editor makes them.
EDITS = {
    "log-odds bit flip": ('"threshold_log_odds": 1.663', '"threshold_log_odds": 9.663'),
    "temperature 20": ('"temperature": 1.5', '"temperature": 20'),
    "threshold alone": ('"threshold": ' + json.dumps(cal.probability(LOG_ODDS)),
                        '"threshold": 0.5'),
}


def fitted_point(checkpoint: Path, **extra) -> dict:
    return cal.seal({"format": 1, "label": "person", "temperature": TEMPERATURE,
                     "threshold": cal.probability(LOG_ODDS), "threshold_log_odds": LOG_ODDS,
                     "target_recall": 0.99, "val": {"persons": 29, "resolved": False},
                     "model": str(CHECKPOINT), "model_sha256": file_sha256(checkpoint),
                     **extra})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder after calibrate: a random checkpoint, its sealed point, a test split of
    2 crops per label, params for a run of seconds, and the ONNX export carrying the point."""
    root = tmp_path_factory.mktemp("project")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 0.3).eval()
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    (root / CHECKPOINT).parent.mkdir(parents=True)
    save_checkpoint(root / CHECKPOINT, model, ModelMeta(**meta))
    point = fitted_point(root / CHECKPOINT)
    (root / FILE).parent.mkdir(parents=True)
    write_json(root / FILE, point)
    write_noise_test_split(root, CLASSES, SIZE)
    paramfile.write(root, {"evaluate": {"device": "cpu", "speed_runs": 1, "mistakes": 2},
                           "conditions": {"device": "cpu",
                                          "measure": {"night": [1, 3], "glare": [2]}},
                           "export": {"speed_runs": 1, "batch_size": 2}})
    export(model, ModelMeta(**meta), root / "model.onnx", 18,
           point_for=lambda g: cal.embedded(point, g))
    return SimpleNamespace(root=root, point=point, text=(root / FILE).read_text(),
                           pics=root / "data/split/test/person")


@pytest.fixture
def inside(project, monkeypatch):
    """Run from the project folder; its point file is as calibrate wrote it before and after,
    and what a test's stages wrote is gone after it (tests run in random order)."""
    monkeypatch.chdir(project.root)
    yield project
    (project.root / FILE).write_text(project.text)
    for written in ("metrics", "plots", "data/export"):
        shutil.rmtree(project.root / written, ignore_errors=True)


def edited(text: str, edit: str) -> str:
    old, new = EDITS[edit]
    assert old in text, (old, text)  # the attack really changes the point
    return text.replace(old, new)


def stage_error(capsys, main, *args) -> str:
    """The one line a stage (or predict) ends with, exit code 2."""
    with pytest.raises(SystemExit) as exc:
        code = main(*args)
        raise SystemExit(code)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1, err
    return err.strip()


# ----- the file: every reader ------------------------------------------------------------------

@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_point_file_is_refused_by_predict_evaluate_and_export(inside, capsys, edit):
    (inside.root / FILE).write_text(edited(inside.text, edit))
    refused = (f"error: {FILE}: its content does not match its point_sha256; {RECALIBRATE}")
    assert stage_error(capsys, predict.main, [str(inside.pics), "--model", str(CHECKPOINT)]) \
        == refused
    assert stage_error(capsys, evaluate.main) == refused
    assert stage_error(capsys, export_stage.main) == refused
    assert not Path("metrics").exists() and not Path("data/export").exists()  # no card written


def test_the_point_beside_a_checkpoint_is_checked_too(project, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/calibration here
    copy = tmp_path / "handed-on" / "best.pt"
    copy.parent.mkdir()
    copy.write_bytes((project.root / CHECKPOINT).read_bytes())
    beside = copy.parent / "operating_point.json"
    beside.write_text(edited(project.text, "log-odds bit flip"))
    line = stage_error(capsys, predict.main, [str(project.pics), "--model", str(copy)])
    assert line.startswith(f"error: {beside}: its content does not match its point_sha256")


@pytest.mark.parametrize("key", ["format", "label", "temperature", "threshold",
                                 "threshold_log_odds", "target_recall", "val", "model_sha256",
                                 "point_sha256"])
def test_a_missing_key_is_one_line_never_a_key_error(inside, capsys, key):
    point = {k: v for k, v in inside.point.items() if k != key}
    resealed = point if key == "point_sha256" else cal.seal(point)
    for content in (point, resealed):  # as edited, and as if a writer had left the key out
        (inside.root / FILE).write_text(json.dumps(content))
        line = stage_error(capsys, evaluate.main)
        assert line.startswith(f"error: {FILE}: ") and line.endswith(RECALIBRATE)
    assert key in line


@pytest.mark.parametrize("key, value", [("target_recall", "0.99"), ("target_recall", 0),
                                        ("val", [29]), ("model_sha256", "0"),
                                        ("temperature", True), ("point_sha256", 7)])
def test_a_key_of_the_wrong_type_is_one_line(tmp_path, key, value):
    path = tmp_path / "operating_point.json"
    (tmp_path / "x").write_bytes(b"weights")
    point = fitted_point(tmp_path / "x")
    point = cal.seal({**point, key: value}) if key != "point_sha256" else {**point, key: value}
    path.write_text(json.dumps(point))
    with pytest.raises(StageError) as err:
        cal.read_operating_point(path)
    assert "\n" not in str(err.value) and key in str(err.value) and \
        str(err.value).endswith(RECALIBRATE)


def test_a_threshold_that_is_not_the_probability_of_the_log_odds_is_refused(tmp_path):
    """Resealed by hand, the shown threshold still must be the alarm's own."""
    (tmp_path / "x").write_bytes(b"weights")
    point = cal.seal({**fitted_point(tmp_path / "x"), "threshold": 0.5})
    assert cal.point_problem(point) == (
        f"threshold 0.5 is not the probability of threshold_log_odds {LOG_ODDS!r} "
        f"({cal.probability(LOG_ODDS)!r})")
    assert cal.point_problem(cal.seal({**point, "threshold": cal.probability(LOG_ODDS)})) is None
    near_one = cal.seal({**point, "threshold_log_odds": 40.0, "threshold": 1.0})
    assert cal.point_problem(near_one) is None  # rounds to exactly 1.0 in float64: agrees


def test_the_seal_covers_every_key_present_nested_ones_too(tmp_path):
    """Keys calibrate may add later are under the seal without being named anywhere."""
    (tmp_path / "x").write_bytes(b"weights")
    point = fitted_point(tmp_path / "x", guarantee={"rule": "average", "delta": 0.05},
                         temperature_interval=(1.2, 1.9), note=None)
    path = tmp_path / "operating_point.json"
    write_json(path, point)  # as calibrate writes it: the tuple becomes a list
    assert cal.read_operating_point(path) == json.loads(path.read_text())
    for old, new in [('"delta": 0.05', '"delta": 0.5'), ("1.9", "9.1"),
                     ('"note": null', '"note": 0'), ('"persons": 29', '"persons": 290')]:
        path.write_text(json.dumps(point, indent=2, sort_keys=True).replace(old, new))
        assert old in json.dumps(point, indent=2, sort_keys=True)
        with pytest.raises(StageError, match="does not match its point_sha256"):
            cal.read_operating_point(path)


def test_the_seal_is_the_checkpoint_metadata_digest_recipe(tmp_path):
    """One recipe for digests: SHA-256 of sorted compact JSON, as best.pt's metadata."""
    import hashlib

    (tmp_path / "x").write_bytes(b"weights")
    point = fitted_point(tmp_path / "x")
    content = {k: v for k, v in point.items() if k != "point_sha256"}
    text = json.dumps(content, sort_keys=True, separators=(",", ":"))
    assert point["point_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert cal.seal(point) == point  # sealing again changes nothing


# ----- the copy inside an ONNX file ------------------------------------------------------------

def test_the_onnx_copy_names_no_file_and_carries_its_own_seal(project):
    copy = OnnxClassifier(project.root / "model.onnx").operating_point
    assert "model_sha256" not in copy and "model" not in copy
    assert copy["point_sha256"] != project.point["point_sha256"]
    assert cal.point_problem({k: v for k, v in copy.items() if k != "source"},
                             embedded=True) is None
    for key in ("temperature", "threshold_log_odds", "target_recall", "val"):
        assert copy[key] == project.point[key]


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_point_in_an_onnx_file_is_refused(project, tmp_path, capsys, edit):
    """The file's own digest recomputed (as a tool that rewrites metadata would): only the
    point's seal is left to catch the edit."""
    import onnx

    proto = onnx.load(str(project.root / "model.onnx"))
    for prop in proto.metadata_props:
        if prop.key == POINT_KEY:
            prop.value = edited(prop.value, edit)
    tampered = tmp_path / "model.onnx"
    tampered.write_bytes(seal(proto))
    line = stage_error(capsys, predict.main, [str(project.pics), "--model", str(tampered)])
    assert line == (f"error: {tampered}: ONNX metadata operating_point is not usable (its "
                    "content does not match its point_sha256); export it again with `dvc repro "
                    "export` (or python -m stages.export)")


# ----- the threshold shown is the one used -----------------------------------------------------

def answers(capsys, *args) -> dict:
    code = predict.main([str(a) for a in args] + ["--format", "json"])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def person_log_odds(project, paths) -> np.ndarray:
    from stages.common.serving.classifiers import TorchClassifier
    from stages.common.serving.predictor import expand, predict_paths

    plain = TorchClassifier(project.root / CHECKPOINT)
    logits = np.stack([p.logits for p in predict_paths(plain, expand(paths))])
    return reference.log_odds(logits, TEMPERATURE, 2)  # scipy's, not the code under test


@pytest.mark.parametrize("model", [CHECKPOINT, Path("model.onnx")])
def test_predict_states_the_threshold_that_answers(inside, capsys, model):
    doc = answers(capsys, inside.pics, "--model", model)
    head = doc["operating_point"]
    assert (head["threshold"], head["threshold_log_odds"], head["temperature"]) == \
        (inside.point["threshold"], LOG_ODDS, TEMPERATURE)
    scores = person_log_odds(inside, [inside.pics])
    assert [p["alarm"] for p in doc["predictions"]] == [bool(s >= LOG_ODDS) for s in scores]


def test_person_threshold_x_alarms_with_the_log_odds_of_x(inside, capsys, monkeypatch):
    """Even when X is the point's own threshold, the point's log-odds is not what answers."""
    scores = person_log_odds(inside, [inside.pics])
    x = float(cal.probability(np.median(scores)))
    real = predict.load_classifier

    def with_other_log_odds(*args, **kwargs):
        classifier = real(*args, **kwargs)
        classifier.operating_point = {**classifier.operating_point, "threshold": x,
                                      "threshold_log_odds": 9.663}
        return classifier

    monkeypatch.setattr(predict, "load_classifier", with_other_log_odds)
    doc = answers(capsys, inside.pics, "--model", CHECKPOINT, "--person-threshold", x)
    assert doc["operating_point"] == {"threshold": x, "threshold_log_odds": cal.log_odds(x),
                                      "source": "--person-threshold",
                                      "temperature": TEMPERATURE}
    alarms = [p["alarm"] for p in doc["predictions"]]
    assert alarms == [bool(s >= cal.log_odds(x)) for s in scores]
    assert True in alarms and False in alarms  # X sits among the scores: both answers occur


# ----- evaluate and export: the card never contradicts the embedded point ----------------------

def write_split_metrics() -> None:
    counts = {"animal": 2, "object": 2, "person": 2, "total": 6}
    write_json(Path("metrics/split.json"), {"crops": {"train": counts, "val": counts,
                                                      "test": counts}})


def test_export_refuses_an_evaluation_of_another_point(inside, capsys):
    evaluate.main()
    scored = json.loads(Path("metrics/eval.json").read_text())
    assert scored["operating_point"]["point_sha256"] == inside.point["point_sha256"]
    write_split_metrics()
    other = cal.seal({**inside.point, "temperature": 2.0})  # calibrate ran again since
    write_json(FILE, other)
    capsys.readouterr()
    line = stage_error(capsys, export_stage.main)
    assert line == (f"error: metrics/eval.json evaluated another operating point (point_sha256 "
                    f"{inside.point['point_sha256'][:12]}) than {FILE} "
                    f"({other['point_sha256'][:12]}); run `dvc repro evaluate` before export")
    assert not Path("data/export").exists()


def test_export_refuses_conditions_measured_at_another_point(inside, capsys):
    evaluate.main()
    conditions.main()
    write_split_metrics()
    measured = json.loads(Path("metrics/conditions.json").read_text())
    write_json(Path("metrics/conditions.json"), {**measured, "point_sha256": "0" * 64})
    capsys.readouterr()
    line = stage_error(capsys, export_stage.main)
    assert line == (f"error: metrics/conditions.json measured another operating point "
                    f"(point_sha256 000000000000) than {FILE} "
                    f"({inside.point['point_sha256'][:12]}); run `dvc repro conditions` before "
                    "export")
    assert not Path("data/export").exists()


def test_the_card_states_the_point_the_onnx_file_carries(inside, capsys):
    evaluate.main()
    threads = torch.get_num_threads()
    conditions.main()
    assert torch.get_num_threads() == threads  # its one-thread workers leave export's threads
    write_split_metrics()
    scores = json.loads(Path("metrics/eval.json").read_text())
    # What the card must not take from eval.json: shown figures that could drift from the point.
    scores["operating_point"].update(threshold=0.9, threshold_log_odds=2.1972)
    scores["calibration"]["temperature"] = 3.0
    write_json(Path("metrics/eval.json"), scores)
    export_stage.main()
    carried = OnnxClassifier("data/export/model.onnx").operating_point
    assert cal.embedded(inside.point, carried[cal.GRAPH_KEY]) == \
        {k: v for k, v in carried.items() if k != "source"}
    card = Path("data/export/MODEL_CARD.md").read_text()
    shown = statement.threshold_text(carried["threshold"], carried["threshold_log_odds"])
    assert f">= **{shown}**" in card and f"T = {round(carried['temperature'], 4)}" in card
    assert "0.9**" not in card and "T = 3.0" not in card
    measured = json.loads(Path("metrics/conditions.json").read_text())
    assert measured["point_sha256"] == inside.point["point_sha256"]
    assert set(measured["conditions"]) == {"night", "glare"}
    for name, figures in measured["conditions"].items():
        kept = figures["kept_target_to_severity"]
        lowest = min(int(k[1:]) for k in figures if k[0] == "s" and k[1:].isdigit())
        said = f"up to severity {kept}" if kept else f"not at severity {lowest}"
        assert f"| {name} | {said} | " in card
