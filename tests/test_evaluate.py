"""evaluate's scoring: figures match a hand count; the report's goals become pass/fail."""
import numpy as np
import pytest

from stages.evaluate.stage import score, write_confusion_csv

CLASSES = ["animal", "object", "person"]


def test_score_matches_a_hand_count():
    # 10 test crops; two persons taken for objects (the report's soldier-with-a-rifle mistake)
    targets = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    preds = np.array([0, 0, 0, 1, 1, 1, 2, 2, 1, 1])
    m = score(targets, preds, CLASSES)
    assert m["accuracy"] == 0.8
    assert m["person_recall"] == 0.5
    assert m["per_class"]["person"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667,
                                        "support": 4}
    assert m["per_class"]["object"]["precision"] == 0.6
    assert m["per_class"]["object"]["f1"] == pytest.approx(0.75)
    assert m["macro_f1"] == pytest.approx(round((1 + 0.75 + 2 / 3) / 3, 4))
    assert m["goals"] == {"accuracy_ge_0_90": False, "macro_f1_ge_0_90": False}
    assert m["test_crops"] == 10


def test_goals_pass_when_met():
    targets = np.array([0, 1, 2] * 10)
    m = score(targets, targets.copy(), CLASSES)
    assert m["goals"] == {"accuracy_ge_0_90": True, "macro_f1_ge_0_90": True}


def test_confusion_csv_has_one_row_per_crop_with_names(tmp_path):
    path = tmp_path / "confusion.csv"
    write_confusion_csv(path, [2, 0], [1, 0], CLASSES)
    assert path.read_text() == "actual,predicted\nperson,object\nanimal,animal\n"


def test_curve_thresholds_are_log_odds_and_the_roc_start_is_inf(tmp_path, monkeypatch):
    import pandas as pd

    from stages.evaluate import stage
    from tests import reference

    monkeypatch.setattr(stage, "EVAL_PLOTS", tmp_path)
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 3, 200)
    # confident logits: most person probabilities round to 1.0 in float64
    logits = rng.normal(0, 1, (200, 3)) + 60.0 * np.eye(3)[targets]
    scores = stage.class_log_odds(logits, 0.5)
    for k in range(3):  # each class's log-odds against the rest, as scipy's log_softmax gives it
        np.testing.assert_allclose(scores[:, k], reference.log_odds(logits, 0.5, k),
                                   rtol=1e-9, atol=1e-9)
    curves = stage.write_curves(scores, targets, ["animal", "object", "person"])
    roc = pd.read_csv(tmp_path / "roc_person.csv")
    assert list(roc.columns) == ["fpr", "tpr", "threshold_log_odds"]
    assert roc["threshold_log_odds"].iloc[0] == np.inf  # no alarm at all, written as such
    finite = roc["threshold_log_odds"].iloc[1:]
    assert np.isfinite(finite).all() and finite.nunique() == len(finite)
    assert (finite > 37).any()  # its probability is exactly 1.0: the log-odds keeps it apart
    assert "1" not in (tmp_path / "roc_person.csv").read_text().splitlines()[2].split(",")[2:]
    pr = pd.read_csv(tmp_path / "pr" / "person.csv")
    assert list(pr.columns) == ["recall", "precision", "threshold_log_odds"]
    assert np.isfinite(pr["threshold_log_odds"]).all() and pr["threshold_log_odds"].nunique() > 1
    assert len(curves["roc"]) == len(roc) and len(curves["pr"]["person"]) == len(pr)
