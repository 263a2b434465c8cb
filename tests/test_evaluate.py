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
