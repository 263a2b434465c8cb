"""The operating point as one typed record: read and checked in stages.common.alarm.point only,
refused in one line when a key is missing or of the wrong type, and read without torch."""
import json
import subprocess
import sys

import pytest

from stages.common.alarm import calibration as cal, point as pt
from stages.common.infra.errors import StageError
from tests.paramfile import ROOT


def content(**change) -> dict:
    """A point's keys as calibrate writes them (unsealed), with ``change`` made."""
    point = {"format": 1, "label": "person", "temperature": 1.5,
             "threshold": cal.probability(1.0), "threshold_log_odds": 1.0,
             "target_recall": 0.99, "guarantee": "probability", "delta": 0.05,
             "fitted_on": "data/split/calibration", "val": {"persons": 29},
             "model": "data/model/best.pt", "model_sha256": "0" * 64, **change}
    return {k: v for k, v in point.items() if v is not ...}


def mode(name: str, log_odds: float, conditions=(), severities=()) -> dict:
    return {"name": name, "conditions": list(conditions), "severities": list(severities),
            "threshold": cal.probability(log_odds), "threshold_log_odds": log_odds,
            "val": {"persons": 29, "resolved": False}}


def test_a_point_reads_into_its_record(tmp_path):
    path = tmp_path / "operating_point.json"
    path.write_text(json.dumps(pt.seal(content())))
    point = pt.read_operating_point(path)
    assert isinstance(point, pt.OperatingPoint)
    assert (point.temperature, point.threshold_log_odds, point.target_recall) == (1.5, 1.0, 0.99)
    assert (point.guarantee, point.delta, point.fitted_on) == \
        ("probability", 0.05, "data/split/calibration")
    assert point.val == {"persons": 29} and point.modes == () and point.source == str(path)
    assert point.model_sha256 == "0" * 64 and point.content == json.loads(path.read_text())
    with pytest.raises(AttributeError):
        point.threshold = 0.5  # frozen: a reader cannot move the alarm


@pytest.mark.parametrize("change, needle", [
    ({"temperature": ...}, "temperature None is not a number"),
    ({"threshold_log_odds": ...}, "threshold_log_odds None is not a finite number"),
    ({"val": ...}, "val None is not the val figures"),
    ({"target_recall": "0.99"}, "target_recall '0.99' is not a number in (0, 1]"),
    ({"guarantee": 3}, "guarantee 3 is not a text"),
    ({"delta": "small"}, "delta 'small' is not a number from 0 to 1"),
    ({"modes": []}, "modes [] is not a non-empty list of camera modes"),
    ({"modes": [mode("day", 1.0), mode("day", 0.5)]}, "the name 'day': not a distinct"),
    ({"modes": [mode("auto", 1.0)]}, "the name 'auto': not a distinct mode name"),
    ({"modes": [{**mode("ir", 0.5), "threshold": 0.9}]},
     "modes.ir.threshold 0.9 is not the probability of modes.ir.threshold_log_odds 0.5"),
    ({"modes": [mode("ir", 0.5, ["infrared"], [9])]}, "modes.ir.severities [9] is not"),
])
def test_a_missing_key_or_a_wrong_type_is_one_line(tmp_path, change, needle):
    path = tmp_path / "operating_point.json"
    path.write_text(json.dumps(pt.seal(content(**change))))  # sealed: only the check refuses it
    with pytest.raises(StageError) as caught:
        pt.read_operating_point(path)
    line = str(caught.value)
    assert line.startswith(f"{path}: ") and needle in line and "\n" not in line
    assert line.endswith("run `dvc repro calibrate` again")


def test_a_file_that_is_not_a_point_is_one_line(tmp_path):
    path = tmp_path / "operating_point.json"
    for text, needle in [("[1, 2]", "not a JSON object"), ("{", "cannot read it"),
                         (json.dumps(content()), "point_sha256 None is not a digest")]:
        path.write_text(text)
        with pytest.raises(StageError, match="dvc repro calibrate") as caught:
            pt.read_operating_point(path)
        assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_modes_read_into_their_records_and_an_unknown_one_is_one_line(tmp_path):
    point = pt.OperatingPoint.parse(pt.seal(content(modes=[
        mode("day", 1.0), mode("infrared", -0.5, ["infrared"], [1, 2, 3, 4, 5])])))
    assert point.mode_names == ["day", "infrared"]
    infrared = point.mode("infrared")
    assert (infrared.conditions, infrared.severities) == (("infrared",), (1, 2, 3, 4, 5))
    assert infrared.threshold_log_odds == -0.5 and infrared.val["persons"] == 29
    with pytest.raises(StageError) as caught:
        point.mode("night")
    assert "--mode 'night' is not a camera mode" in str(caught.value)
    assert "it holds day, infrared" in str(caught.value)


def test_the_seal_is_the_checkpoint_metadata_recipe_without_torch():
    from stages.common.model.checkpoint import weights_digest

    point = content(modes=[mode("day", 1.0)])
    assert pt.point_digest(point) == weights_digest(point, {})
    code = ("import json, sys; from stages.common.alarm import point as pt; "
            f"pt.OperatingPoint.parse(pt.seal(json.loads({json.dumps(json.dumps(content()))})));"
            " print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"
