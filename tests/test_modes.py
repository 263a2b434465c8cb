"""Camera modes (calibrate.modes, Mondrian calibration): their params, a threshold of their own
fitted on the calibration crops as the mode sees them, the grey test predict's --mode auto uses,
and the model card's table. predict's --mode: tests/test_predict_alarm.py."""
import copy
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from stages import calibrate
from stages.common.alarm import calibration as cal, point as pt
from stages.common.config import params as P
from stages.common.infra.errors import ParamError
from stages.common.pictures.corrupt import corrupt
from stages.common.serving.predictor import is_grey
from tests.paramfile import project_defaults

CLASSES = ["animal", "object", "person"]
PERSON = 2
DEFAULTS = project_defaults()


def with_modes(modes) -> dict:
    raw = copy.deepcopy(DEFAULTS)
    raw["calibrate"]["modes"] = modes
    return raw


def test_modes_default_to_none_and_complete_their_severities():
    assert P.parse(DEFAULTS).calibrate.modes == []  # the committed params: one threshold
    modes = P.parse(with_modes([{"name": "day"}, {"name": "infrared",
                                                  "conditions": ["infrared"]}])).calibrate.modes
    assert [(m.name, m.conditions, m.severities) for m in modes] == \
        [("day", [], []), ("infrared", ["infrared"], [1, 2, 3, 4, 5])]


@pytest.mark.parametrize("modes, needle", [
    ({"name": "day"}, "calibrate.modes={'name': 'day'} is not allowed"),
    ([{"name": "Day"}], "calibrate.modes[0].name='Day'"),
    ([{"name": "auto"}], "not 'auto', which is predict's own choice"),
    ([{"name": "a"}, {"name": "a"}], "calibrate.modes[1].name='a' is not allowed; expected a "
                                     "name no other mode has"),
    ([{"name": "ir", "conditions": ["infra"]}], "calibrate.modes[0].conditions=['infra']"),
    ([{"name": "ir", "conditions": ["fog"], "severities": [6]}], "modes[0].severities=[6]"),
    ([{"name": "day", "severities": [1]}], "and only with conditions"),
    ([{"name": "ir", "condition": ["fog"]}], "expected a mapping of name and optional"),
])
def test_a_bad_mode_param_is_one_line(modes, needle):
    with pytest.raises(ParamError) as caught:
        P.parse(with_modes(modes))
    assert needle in str(caught.value) and "\n" not in str(caught.value)


# ----- calibrate: each mode's own threshold on the crops as it sees them --------------------------

def colourful_crops(n: int, seed: int = 0):
    """n crops of 16 px: persons bright and colourful, the others dark and grey; two crops a
    picture."""
    rng = np.random.default_rng(seed)
    targets = np.array([PERSON if i % 2 else i % 4 // 2 for i in range(n)])
    pixels = np.empty((n, 16, 16, 3), np.uint8)
    for i, label in enumerate(targets):
        person = label == PERSON
        noise = rng.integers(-60, 60, (16, 16, 3 if person else 1))
        pixels[i] = np.clip((170 if person else 60) + noise, 0, 255)
    paths = [f"calibration/{CLASSES[t]}/c{i}.jpg" for i, t in enumerate(targets)]
    return pixels, targets, paths, [f"pic{i // 2}" for i in range(n)]


def person_score(pixels: np.ndarray) -> np.ndarray:
    """A constructed classifier's logits: the person logit grows with brightness and colour, so
    a grey (infrared) copy of a person scores lower than the person does in colour."""
    x = pixels.astype(np.float64) / 255
    bright = x.mean(axis=(1, 2, 3))
    colour = (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2))
    logits = np.zeros((len(x), 3))
    logits[:, PERSON] = 5 * (bright - 0.45) + 20 * colour
    return logits


class Crops:
    """What calibrate's mode_crops reads of a CropSet: its pixels and paths."""

    def __init__(self, pixels: np.ndarray, paths: list[str]):
        self.pixels, self.paths = torch.from_numpy(pixels).permute(0, 3, 1, 2), paths

    def __len__(self):
        return len(self.paths)

    def take(self, indices, device):
        return self.pixels[indices].to(device)


def test_the_infrared_mode_gets_its_own_lower_threshold_from_its_grey_crops():
    pixels, targets, paths, pictures = colourful_crops(40)
    logits = person_score(pixels)
    day, infrared = (SimpleNamespace(name="day", conditions=[], severities=[]),
                     SimpleNamespace(name="infrared", conditions=["infrared"],
                                     severities=[1, 5]))
    point = calibrate.operating_point(logits, targets, CLASSES, 0.9, "probability", 0.05,
                                      pictures=pictures)
    fitted = {}
    for mode in (day, infrared):
        seen = calibrate.mode_crops(mode, Crops(pixels, paths), logits, targets, pictures,
                                    person_score, seed=42, batch_size=16)
        fitted[mode.name] = calibrate.camera_mode(mode, seen[0], seen[1], CLASSES,
                                                  point["temperature"], 0.9, "probability",
                                                  0.05, seen[2]), seen
    (day_point, _), (ir_point, (ir_logits, ir_targets, ir_pictures)) = \
        fitted["day"], fitted["infrared"]
    # day sees the clean crops: the point's own threshold and figures
    assert day_point["threshold_log_odds"] == point["threshold_log_odds"]
    assert day_point["val"]["crops"] == 40 and day_point["conditions"] == []
    # infrared sees every crop under infrared at severities 1 and 5, each copy under its picture
    assert ir_point["val"]["crops"] == 80 and ir_point["severities"] == [1, 5]
    assert list(ir_targets) == list(targets) * 2 and ir_pictures == pictures * 2
    assert ir_point["val"]["person_pictures"] == day_point["val"]["person_pictures"] == 20
    # 20 pictures with persons cannot resolve 0.9 with probability 0.95 (29 needed): unresolved,
    # every person of the mode's crops raises its alarm, as the rule says for too few persons
    assert not ir_point["val"]["resolved"] and ir_point["val"]["persons_needed"] == 29
    assert ir_point["val"]["persons_missed"] == 0
    ir_scores = cal.person_log_odds(ir_logits, point["temperature"], PERSON)[ir_targets == PERSON]
    assert ir_point["threshold_log_odds"] < day_point["threshold_log_odds"]
    assert (ir_scores < day_point["threshold_log_odds"]).any()  # day's would miss grey persons
    assert (ir_scores >= ir_point["threshold_log_odds"]).all()
    # sealed with the point, the record reads both back
    record = pt.OperatingPoint.parse(pt.seal({**point, "modes": [day_point, ir_point],
                                              "model_sha256": "0" * 64}))
    assert record.mode("infrared").threshold_log_odds == ir_point["threshold_log_odds"]
    assert record.mode("infrared").val["crops"] == 80


# ----- predict's grey test -----------------------------------------------------------------------

def test_infrared_crops_and_grey_jpegs_are_grey_and_colour_is_not():
    rng = np.random.default_rng(3)
    colour = rng.integers(0, 255, (32, 32, 3), np.uint8)
    assert not is_grey(colour.transpose(2, 0, 1))
    for severity in (1, 5):
        assert is_grey(corrupt(colour, "infrared", severity, 42, "a").transpose(2, 0, 1))
    grey = np.repeat(rng.integers(0, 255, (32, 32, 1), np.uint8), 3, axis=2)
    ok, data = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 70])
    decoded = cv2.imdecode(data, cv2.IMREAD_COLOR)
    assert is_grey(decoded.transpose(2, 0, 1))
    marked = grey.copy()
    marked[:2, :2] = (255, 0, 0)  # a coloured timestamp corner: 0.4 % of the pixels
    assert is_grey(marked.transpose(2, 0, 1))
    marked[:8] = (255, 0, 0)  # a quarter of the picture in colour: not a grey camera
    assert not is_grey(marked.transpose(2, 0, 1))


# ----- the model card --------------------------------------------------------------------------

def test_the_card_lists_each_modes_threshold_only_when_there_are_modes():
    from stages.export import modes_section

    val = {"persons": 145, "persons_missed": 0, "person_pictures": 24,
           "person_recall_lower_95": 0.8826, "false_alarms": 10, "non_persons": 245,
           "resolved": False}
    point = pt.OperatingPoint(temperature=1.0, threshold=0.5, threshold_log_odds=0.0,
                              target_recall=0.99)
    assert modes_section(point) == "" and modes_section(None) == ""
    with_modes = pt.OperatingPoint(
        temperature=1.0, threshold=0.5, threshold_log_odds=0.0, target_recall=0.99,
        modes=(pt.ModeThreshold("infrared", ("infrared",), (1, 2, 3, 4, 5),
                                cal.probability(0.52), 0.52, val),))
    card = modes_section(with_modes)
    assert "| infrared | infrared at severities 1, 2, 3, 4, 5 | 0.627" in card
    assert "| 145 of 145 (24 pictures) | 0.8826 | 10 of 245 | no: every person there raises it |" \
        " not measured |" in card
    tested = {"infrared": {"persons": 290, "persons_missed": 3, "person_recall": 0.9897,
                           "person_recall_lower_95": 0.9701, "false_alarms_per_1000": 12.5,
                           "false_alarms_per_1000_upper_95": 24.1}}
    assert "| no: every person there raises it | 287 of 290, recall 0.9897 (>= 0.9701); 12.5 " \
        "(<= 24.1) false alarms / 1,000 |" in modes_section(with_modes, tested)
