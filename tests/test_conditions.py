"""The camera-condition suite: each corrupted crop a pure function of (seed, condition,
severity, crop), pinned byte for byte; the figures under a condition are the alarm's own (a model
the condition does not touch keeps them; one that darkness blinds loses its target, and the
bound says so); every bad param stops the run in one line before any work."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.common.config import params as P
from stages.common.infra import errors
from stages.conditions import corrupt as C
from stages.conditions import measure as M
from tests import paramfile

CLASSES = ["animal", "object", "person"]
PERSON = CLASSES.index("person")


def crops(n: int = 3, side: int = 32) -> list[np.ndarray]:
    """Fixed crops: a gradient, a noise field and blocks, the same on every machine."""
    y, x = np.mgrid[0:side, 0:side]
    gradient = np.stack([x * 255 // (side - 1), y * 255 // (side - 1),
                         (x + y) * 255 // (2 * side - 2)], axis=2).astype(np.uint8)
    noise = np.random.default_rng(7).integers(0, 256, (side, side, 3), dtype=np.uint8)
    blocks = np.where(((x // 8 + y // 8) % 2)[..., None] == 1, 200, 40).astype(np.uint8)
    blocks = np.repeat(blocks, 3, axis=2)
    return [gradient, noise, blocks][:n]


# sha256 of the three crops above under each condition, severities 1, 3 and 5 concatenated
# (seed 42, keys a.png, b.png, c.png): a change here changes every stored figure.
PINS = {
    "night": "bdd59e050d698cd3a55df8db0e4b96b5653c21f0cdf60787957537d8d520aac5",
    "infrared": "cb2ba0cd810f24a6b2f7fd9545afb86986a36ca094268fb86386eb84d621735a",
    "motion_blur": "098a634561edad1767fb4d1ef3deb40ccdef8dffa1d4635ef17f3eed475dc81f",
    "defocus": "09ff4f40ee5ed09ae6543a406238e56b1cb9990bf5d162ec190cfdc3da80c6de",
    "fog": "b38b106cd4362f2273d857dc788a0f4716350acb62c8aaf026a2c8bf8ce0f433",
    "rain": "07e6f60e6dc0d36e126fc9f045327cda61d9e3b3191c0489aa9672383d7d89d7",
    "snow": "7ccc62a1882820b771320848545c514de9fa3eeff5267999e1e20c9fd379ba68",
    "jpeg": "ce3be58739557c6d193d9463ea467ad0fbddf6bcc7eb2d0c2604e18544a87e0c",
    "low_resolution": "f9f47c527d74eb3eca774f82d80f956976460efa469a600a9561a1eb3adce8a5",
    "glare": "47754d5c461b110cb47b3a08837542a82358c54277395d2ec949b639736a8355",
}


def digest(condition: str) -> str:
    h = hashlib.sha256()
    for severity in (1, 3, 5):
        for crop, key in zip(crops(), ("a.png", "b.png", "c.png")):
            h.update(C.corrupt(crop, condition, severity, 42, key).tobytes())
    return h.hexdigest()


def test_the_conditions_are_the_params_schemas():
    assert tuple(C.FUNCTIONS) == C.CONDITIONS == P.CONDITIONS
    assert all(len(C.SEVERITIES[c]) == len(P.SEVERITIES) for c in C.CONDITIONS)


@pytest.mark.parametrize("condition", C.CONDITIONS)
def test_each_condition_is_pinned_byte_for_byte(condition):
    assert digest(condition) == PINS[condition]


@pytest.mark.parametrize("condition", C.CONDITIONS)
def test_a_corrupted_crop_depends_on_its_own_four_values_only(condition):
    crop = crops()[1]
    once = C.corrupt(crop, condition, 3, 42, "person/x.jpg")
    assert once.dtype == np.uint8 and once.shape == crop.shape
    assert np.array_equal(once, C.corrupt(crop.copy(), condition, 3, 42, "person/x.jpg"))
    assert not np.array_equal(once, crop)  # severity 3 changes every crop
    worse = C.corrupt(crop, condition, 5, 42, "person/x.jpg")
    assert not np.array_equal(once, worse)


def test_the_draws_differ_by_seed_and_crop_and_not_by_thread_count():
    crop = crops()[0]
    base = C.corrupt(crop, "rain", 3, 42, "person/x.jpg")
    assert not np.array_equal(base, C.corrupt(crop, "rain", 3, 43, "person/x.jpg"))
    assert not np.array_equal(base, C.corrupt(crop, "rain", 3, 42, "person/y.jpg"))
    pixels, keys = np.stack(crops()), ["a", "b", "c"]
    jobs = [("night", 2), ("fog", 4), ("snow", 1)]

    def means(batch):  # a classify that shows every pixel
        return batch.reshape(len(batch), -1, 3).mean(1).astype(np.float64)

    one = M.corrupted_logits(pixels, keys, jobs, 42, means, batch_size=2, threads=1)
    many = M.corrupted_logits(pixels, keys, jobs, 42, means, batch_size=5, threads=4)
    assert all(np.array_equal(a, b) for a, b in zip(one, many))


# ----- the figures ------------------------------------------------------------------------------

POINT = {"temperature": 1.0, "threshold_log_odds": 0.0, "target_recall": 0.99}


def banded(labels: list[int], side: int = 24) -> np.ndarray:
    """Crops whose label is the one bright vertical band of three."""
    out = np.zeros((len(labels), side, side, 3), np.uint8)
    for i, label in enumerate(labels):
        out[i, :, label * side // 3:(label + 1) * side // 3] = 255
    return out


def band_classify(pixels: np.ndarray) -> np.ndarray:
    """Reads only which third of the crop is brightest: blur, JPEG and a far person keep it."""
    side = pixels.shape[2]
    grey = pixels.astype(np.float64).mean(axis=3)
    return np.stack([grey[:, :, k * side // 3:(k + 1) * side // 3].mean(axis=(1, 2)) / 25
                     for k in range(3)], axis=1)


def test_a_model_the_condition_leaves_alone_keeps_its_figures():
    labels = [PERSON] * 300 + [0] * 30 + [1] * 30
    pixels = banded(labels)
    keys = [f"{i}.png" for i in range(len(labels))]
    measure = {"jpeg": [1, 5], "defocus": [1, 5], "low_resolution": [1, 5], "motion_blur": [3]}
    out = M.suite(pixels, keys, np.array(labels), CLASSES, POINT, band_classify, measure, 42)
    clean = out["clean"]
    assert clean["person_recall"] == 1.0 and clean["false_alarms_per_1000"] == 0.0
    assert clean["error"] == 0.0
    for name, severities in measure.items():
        for s in severities:
            assert out["conditions"][name][f"s{s}"] == {**clean, "ce": None}, (name, s)
        assert out["conditions"][name]["ce"] is None  # clean error 0: CE undefined
    assert out["mce"] is None and out["mean_error"] == 0.0


def brightness_classify(pixels: np.ndarray) -> np.ndarray:
    """Calls a crop person when it is bright: what darkness blinds."""
    person = (pixels.astype(np.float64).mean(axis=(1, 2, 3)) / 255 - 0.35) * 40
    return np.stack([np.zeros(len(pixels)), np.zeros(len(pixels)), person], axis=1)


def test_night_that_blinds_the_model_is_caught_by_the_bound():
    """400 persons (one a picture; 398 bright, 2 dimmer) and 40 dark others: clean, all 400
    raise the alarm (lower bound 0.9925 >= 0.99: the target is met). At night severity 2 the two
    dimmer ones go quiet: recall 0.995 still reads above the target, and the lower bound shows
    it is not met; from severity 3 the alarm is silent."""
    rng = np.random.default_rng(3)
    persons = np.concatenate([rng.integers(150, 256, (398, 16, 16, 3), dtype=np.uint8),
                              rng.integers(120, 161, (2, 16, 16, 3), dtype=np.uint8)])
    others = rng.integers(0, 60, (40, 16, 16, 3), dtype=np.uint8)
    pixels = np.concatenate([persons, others])
    labels = np.array([PERSON] * 400 + [0] * 40)
    keys = [f"{i}.png" for i in range(len(labels))]
    out = M.suite(pixels, keys, labels, CLASSES, POINT, brightness_classify,
                  {"night": [1, 2, 3, 4, 5]}, 42, batch_size=128)
    assert out["clean"]["target_met"] and out["clean"]["person_recall_lower_95"] >= 0.99
    night = out["conditions"]["night"]
    assert night["s1"]["target_met"]
    assert night["s2"]["person_recall"] == 0.995 and night["s2"]["persons_missed"] == 2
    assert night["s2"]["person_recall_lower_95"] < 0.99 and not night["s2"]["target_met"]
    assert night["kept_target_to_severity"] == 1
    assert night["s5"]["person_recall"] == 0.0 and night["s5"]["false_alarms_per_1000"] == 0.0
    assert night["s5"]["error"] > out["clean"]["error"] == 0.0
    assert night["ce"] is None  # clean error 0: CE undefined, the errors say it


def test_without_conditions_the_suite_gives_the_clean_figures_alone():
    """What a site's acceptance test needs: crops, labels, a model and the point -> figures."""
    labels = [PERSON, PERSON, 0, 1]
    out = M.suite(banded(labels), list("abcd"), np.array(labels), CLASSES, POINT,
                  band_classify, {}, 42)
    assert out["conditions"] == {} and out["mce"] is None and out["mean_error"] is None
    assert out["clean"] == M.alarm_under(band_classify(banded(labels)), np.array(labels),
                                         CLASSES, POINT)
    assert out["clean"]["persons"] == 2 and out["clean"]["person_recall"] == 1.0


def test_pictures_are_counted_as_evaluate_counts_them():
    """Two person crops of one picture: one miss is one picture missed of one."""
    pixels = banded([PERSON, PERSON, 0])
    pixels[1] = 0  # a crop the band reader calls animal
    out = M.suite(pixels, ["a", "b", "c"], np.array([PERSON, PERSON, 0]), CLASSES, POINT,
                  band_classify, {"jpeg": [1]}, 42, pictures=["p1", "p1", "p2"])
    assert out["clean"]["persons"] == 2 and out["clean"]["person_pictures"] == 1
    assert out["clean"]["person_pictures_missed"] == 1
    assert out["clean"]["person_recall_lower_95"] == 0.0


def test_kept_to_is_the_last_severity_of_an_unbroken_run():
    met = {True: {"target_met": True}, False: {"target_met": False}}
    assert M.kept_to({1: met[True], 2: met[True], 3: met[False], 4: met[True]}) == 2
    assert M.kept_to({1: met[False], 2: met[True]}) == 0
    assert M.kept_to({2: met[True], 5: met[True]}) == 5
    assert M.corruption_error(0.2, 0.1) == 2.0 and M.corruption_error(0.2, 0.0) is None


def test_the_model_card_says_per_condition_up_to_which_severity():
    from stages.export import conditions_section

    def cell(met):
        return {"target_met": met, "person_recall": 0.5, "person_recall_lower_95": 0.4}

    measured = {"clean": cell(True), "target_recall": 0.99, "conditions": {
        "fog": {"s1": cell(True), "s2": cell(True), "s3": cell(False),
                "kept_target_to_severity": 2, "ce": 1.5},
        "night": {"s2": cell(False), "s4": cell(False), "kept_target_to_severity": 0,
                  "ce": None}}}
    card = conditions_section(measured)
    assert "| fog | up to severity 2 | 0.5 (>= 0.4) | 1.5 |" in card
    assert "| night | not at severity 2 | 0.5 (>= 0.4) | None |" in card
    assert "do not show the target either" not in card
    measured["clean"] = cell(False)
    assert "The clean test crops do not meet the target either" in conditions_section(measured)
    measured["clean"].update(target_verdict="not shown", person_pictures=39,
                             pictures_to_show=299)
    assert ("The clean test crops do not show the target either (39 pictures with persons; 299 "
            "with none missed would), so no condition can.") in conditions_section(measured)
    assert conditions_section({}) == ""


def test_trained_on_conditions_are_read_from_the_checkpoints_recipe_and_marked():
    from stages.conditions.stage import mark_training, summary_lines
    from stages.export import conditions_section

    def measured():
        cell = {"target_met": True, "person_recall": 1.0, "person_recall_lower_95": 0.9,
                "target_verdict": "met"}
        return {"clean": cell, "target_recall": 0.99, "conditions": {
            name: {"s1": cell, "kept_target_to_severity": 1, "ce": None}
            for name in ("fog", "rain")}}

    for recipe in (None, {"seed": 1}, {"augment": "augmix"},
                   {"augment": "report", "augment_conditions": ["fog"]}):
        result = measured()
        mark_training(result, recipe)
        assert not any(f["trained_on"] for f in result["conditions"].values()), recipe
        assert "trained on" not in conditions_section(result) + " ".join(
            summary_lines(result, 0.99))
    result = measured()
    mark_training(result, {"augment": "conditions", "augment_conditions": ["night", "fog"]})
    assert result["train_augment"] == "conditions"
    assert result["conditions"]["fog"]["trained_on"] is True
    assert result["conditions"]["rain"]["trained_on"] is False  # held out
    assert "| fog (trained on) | up to severity 1 |" in conditions_section(result)
    assert "| rain | up to severity 1 |" in conditions_section(result)
    assert "fog (trained on): the alarm keeps" in "\n".join(summary_lines(result, 0.99))


# ----- bad params: one line, before any work ----------------------------------------------------

@pytest.mark.parametrize("measure,needle", [
    ({"nigth": [1]}, "conditions.measure.nigth is not a condition; expected one of night, "),
    ({"night": [0]}, "conditions.measure.night=[0] is not allowed; expected a non-empty list "
                     "of distinct severities from 1 to 5"),
    ({"night": [6]}, "conditions.measure.night=[6] is not allowed"),
    ({"night": []}, "conditions.measure.night=[] is not allowed"),
    ({"night": [2.5]}, "conditions.measure.night=[2.5] is not allowed"),
    ({"night": ["3"]}, "conditions.measure.night=['3'] is not allowed"),
    ({"night": [True]}, "conditions.measure.night=[True] is not allowed"),
    ({"night": [2, 2]}, "conditions.measure.night=[2, 2] is not allowed"),
    ({"night": 3}, "conditions.measure.night=3 is not allowed"),
    ({}, "conditions.measure={} is not allowed; expected a non-empty mapping"),
    ([], "conditions.measure=[] is not allowed; expected a non-empty mapping"),
])
def test_bad_conditions_are_one_line(measure, needle):
    raw = paramfile.params()
    raw["conditions"]["measure"] = measure
    with pytest.raises(errors.ParamError) as exc:
        P.parse(raw)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_severities_are_kept_in_order():
    raw = paramfile.params()
    raw["conditions"]["measure"] = {"fog": [5, 1, 3]}
    assert P.parse(raw).conditions.measure == {"fog": [1, 3, 5]}


def test_the_stage_stops_on_a_bad_condition_before_any_work(tmp_path, monkeypatch, capsys):
    from stages.conditions import stage

    values = paramfile.params({"conditions": {"measure": {"night": [1], "haze": [2]}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(values))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        stage.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: params.yaml: conditions.measure.haze is not a condition")
    assert not (tmp_path / "metrics").exists() and not (tmp_path / "plots").exists()
