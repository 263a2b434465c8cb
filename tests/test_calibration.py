"""The person alarm's math on constructed logits: temperature, threshold, ECE, the point file."""
import dataclasses
import json
import math

import numpy as np
import pytest

from stages import calibrate
from stages.common.alarm import calibration as cal, guarantee, point as pt
from stages.common.config.paths import OPERATING_POINT
from stages.common.infra.errors import StageError
from stages.common.model.checkpoint import ModelMeta
from stages.evaluate.stage import alarm_metrics
from tests import reference


def sampled(n: int, temperature: float, seed: int = 0):
    """Logits whose softmax at ``temperature`` is the true distribution the targets are drawn
    from: the temperature that calibrates them is ``temperature``."""
    rng = np.random.default_rng(seed)
    true_logits = rng.normal(0, 2.0, (n, 3))
    probs = cal.softmax(true_logits)
    targets = (rng.random(n)[:, None] > probs.cumsum(axis=1)).sum(axis=1)
    return true_logits * temperature, targets


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_a_known_temperature_is_recovered(temperature):
    logits, targets = sampled(40_000, temperature)
    fitted = cal.fit_temperature(logits, targets)
    assert fitted == pytest.approx(temperature, rel=0.05)
    # and it is the minimum of the NLL, not just near the truth
    assert cal.nll(logits, targets, fitted) <= cal.nll(logits, targets, fitted * 1.02)
    assert cal.nll(logits, targets, fitted) <= cal.nll(logits, targets, fitted / 1.02)


def test_temperature_scaling_keeps_every_argmax():
    logits, targets = sampled(1000, 3.0, seed=1)
    t = cal.fit_temperature(logits, targets)
    assert (cal.softmax(logits, t).argmax(1) == logits.argmax(1)).all()


def test_the_fit_is_the_same_number_every_time():
    logits, targets = sampled(5000, 1.7, seed=2)
    assert cal.fit_temperature(logits, targets) == cal.fit_temperature(logits.copy(), targets)


def test_no_val_crops_is_one_line():
    with pytest.raises(StageError, match="no val crops"):
        cal.fit_temperature(np.zeros((0, 3)), np.zeros(0, int))


def recall_at(scores, is_person, t):
    return (scores[is_person] >= t).mean()


@pytest.mark.parametrize("persons, target, k", [(100, 0.99, 99), (100, 0.95, 95), (20, 0.9, 18),
                                                 (7, 0.5, 4), (3, 1.0, 3), (100, 0.29, 29)])
def test_the_threshold_meets_the_target_exactly_on_a_crafted_set(persons, target, k):
    # persons score 1 ... persons; a non-person just below each person: 0.5, 1.5, ...
    rng = np.random.default_rng(3)
    person_scores = np.arange(1, persons + 1, dtype=float)
    other_scores = person_scores - 0.5
    order = rng.permutation(2 * persons)
    scores = np.concatenate([person_scores, other_scores])[order]
    is_person = (np.arange(2 * persons) < persons)[order]
    top = cal.highest_threshold(scores, is_person, target)
    assert top == persons - k + 1  # the k-th highest person score
    t = cal.person_threshold(scores, is_person, target)
    assert t == top - 0.25  # halfway to the non-person just below it
    assert recall_at(scores, is_person, t) == k / persons >= target - 1e-12
    # any higher threshold that changes the figures misses the target
    assert recall_at(scores, is_person, top + 0.5) < target
    # the non-persons above the k-th person: the fewest a threshold reaching the target raises
    assert cal.alarm_figures(scores, is_person, t)["false_alarms"] == k - 1


def false_alarms(scores, is_person, t):
    return int((scores[~is_person] >= t).sum())


def test_the_threshold_on_random_sets_reaches_the_target_with_the_fewest_false_alarms():
    rng = np.random.default_rng(4)
    for _ in range(300):
        n = int(rng.integers(1, 300))
        scores = np.round(rng.normal(0, 3, n), 1)  # ties included
        is_person = rng.random(n) < 0.5
        if not is_person.any():
            continue
        target = float(rng.uniform(0.01, 1.0))
        top = cal.highest_threshold(scores, is_person, target)
        t = cal.person_threshold(scores, is_person, target)
        assert recall_at(scores, is_person, t) >= target and t <= top
        above = scores[is_person & (scores > top)]
        if len(above):  # top is the highest threshold that reaches the target
            assert recall_at(scores, is_person, above.min()) < target
        # no other threshold that reaches the target raises fewer non-persons
        assert false_alarms(scores, is_person, t) == false_alarms(scores, is_person, top)
        assert not ((scores >= t) & (scores < top) & ~is_person).any()


def test_with_no_non_person_below_the_threshold_is_the_highest():
    scores, is_person = np.array([3.0, 5.0, 9.0]), np.array([True, True, False])
    assert cal.person_threshold(scores, is_person, 1.0) == 3.0


def test_person_log_odds_is_the_log_odds_of_the_calibrated_probability():
    logits, _ = sampled(300, 1.0, seed=9)
    p = reference.softmax(logits, 1.7)[:, 2]
    np.testing.assert_allclose(cal.person_log_odds(logits, 1.7, 2), np.log(p / (1 - p)),
                               rtol=1e-9, atol=1e-9)
    assert cal.log_odds(0.5) == 0 and cal.log_odds(0.0) == -math.inf
    assert cal.log_odds(1.0) == math.inf
    assert cal.probability(cal.log_odds(0.3)) == pytest.approx(0.3)


def test_the_alarm_keeps_its_resolution_where_probabilities_round_to_one():
    # gaps of 60 and 70 logits: both probabilities are exactly 1.0 in float64
    logits = np.array([[0.0, 0.0, 60.0], [0.0, 0.0, 70.0], [0.0, 0.0, 2.0]])
    assert (cal.softmax(logits)[:2, 2] == 1.0).all()
    scores = cal.person_log_odds(logits, 1.0, 2)
    assert scores[1] > scores[0] > scores[2]
    t = cal.highest_threshold(scores, np.array([True, True, False]), 0.5)
    assert t == scores[1]  # one of two persons is enough: the higher one
    assert cal.alarm_figures(scores, np.array([True, True, False]), t)["persons_missed"] == 1


def test_no_person_in_val_is_one_line():
    with pytest.raises(StageError, match="val holds no person crops"):
        cal.person_threshold(np.array([0.3, 0.9]), np.array([False, False]), 0.99)


def test_ece_of_a_perfectly_calibrated_set_is_zero():
    # per confidence level, exactly that share of the top-class answers is right
    probs, targets = [], []
    for conf, n in [(0.4, 100), (0.6, 200), (0.75, 400), (0.9, 1000)]:
        right = round(conf * n)
        rest = (1 - conf) / 2
        probs += [[conf, rest, rest]] * n
        targets += [0] * right + [1] * (n - right)
    probs, targets = np.array(probs), np.array(targets)
    assert cal.ece(probs, targets) == pytest.approx(0, abs=1e-12)
    # a sampled calibrated set: near 0 too
    logits, sampled_targets = sampled(50_000, 1.0, seed=5)
    assert cal.ece(cal.softmax(logits), sampled_targets) < 0.01


def test_softmax_nll_and_ece_agree_with_independent_references():
    """scipy's softmax / log_softmax, scikit-learn's log_loss, an ECE written as a loop over bins
    (tests/reference.py); large gaps included, where a naive exp overflows."""
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, (600, 3))
    logits[:50] += 400.0 * np.eye(3)[rng.integers(0, 3, 50)]
    targets = rng.integers(0, 3, 600)
    for t in (0.3, 1.0, 2.5):
        probs = cal.softmax(logits, t)
        np.testing.assert_allclose(probs, reference.softmax(logits, t), rtol=1e-12, atol=1e-300)
        assert cal.nll(logits, targets, t) == \
            pytest.approx(reference.nll(logits, targets, t), rel=1e-12)
        assert cal.ece(probs, targets) == pytest.approx(reference.ece(probs, targets), abs=1e-12)
        np.testing.assert_allclose(cal.person_log_odds(logits, t, 2),
                                   reference.log_odds(logits, t, 2), rtol=1e-9, atol=1e-9)
    # scikit-learn's log_loss, where no target probability falls below its clip (2.2e-16)
    assert cal.nll(logits[50:], targets[50:], 2.5) == \
        pytest.approx(reference.log_loss_nll(logits[50:], targets[50:], 2.5), rel=1e-12)
    # NLL by hand: logits [0, 0, ln 2] give p = [1/4, 1/4, 1/2]; targets 2 and 0: (ln 2 + ln 4) / 2
    two = np.array([[0.0, 0.0, math.log(2)]] * 2)
    assert cal.nll(two, np.array([2, 0]), 1.0) == pytest.approx(1.5 * math.log(2), rel=1e-12)
    # a gap of 1000 logits: the target's probability underflows, its log-likelihood does not
    assert cal.nll(np.array([[1000.0, 0.0, 0.0]]), np.array([1]), 1.0) == pytest.approx(1000.0)


def test_ece_by_hand_over_four_bins():
    # top-class confidence (15 bins of width 1/15), answers right, gap |accuracy - confidence|:
    #   0.34 x 1 (bin 6), 0 right: 0.34 x 1 = 0.34    0.5 x 4 (bin 8), 1 right: 0.25 x 4 = 1.0
    #   0.8 x 3 (bin 12), 3 right: 0.2 x 3 = 0.6      0.94 and 1.0 (bin 15), 1 right:
    #   |0.5 - 0.97| x 2 = 0.94;  ECE = (0.34 + 1.0 + 0.6 + 0.94) / 10 = 0.288
    def row(top):
        return [top, (1 - top) / 2, (1 - top) / 2]

    probs = np.array([row(0.34)] + [row(0.5)] * 4 + [row(0.8)] * 3 + [row(0.94), row(1.0)])
    targets = np.array([1] + [0, 1, 1, 1] + [0, 0, 0] + [0, 2])
    assert cal.ece(probs, targets) == pytest.approx(0.288, abs=1e-12)
    assert [n for _, _, n in cal.reliability(probs, targets)] == [1, 4, 3, 2]


def test_ece_of_an_overconfident_set_is_the_gap():
    probs = np.array([[0.9, 0.05, 0.05]] * 10)
    targets = np.array([0] * 6 + [1] * 4)  # 60 % right at 90 % confidence
    assert cal.ece(probs, targets) == pytest.approx(0.3)
    assert cal.reliability(probs, targets) == [(pytest.approx(0.9), pytest.approx(0.6), 10)]


def test_reliability_bins_are_15_equal_widths_closed_above():
    # bins (k/15, (k+1)/15]: 0.4 closes bin 6 (0.333, 0.4]; 0.41 opens bin 7; 0.98 and 1.0: bin 15
    probs = np.array([[0.4, 0.3, 0.3], [0.41, 0.3, 0.29], [1.0, 0, 0], [0.98, 0.01, 0.01]])
    rows = cal.reliability(probs, np.array([0, 1, 0, 0]))
    assert [n for _, _, n in rows] == [1, 1, 2]  # 0.4 | 0.41 | 0.98 and 1.0 share the top bin
    assert rows[0] == (pytest.approx(0.4), 1.0, 1) and rows[1] == (pytest.approx(0.41), 0.0, 1)


def test_calibrated_overconfident_logits_lower_the_ece():
    logits, targets = sampled(20_000, 3.0, seed=6)
    point = calibrate.operating_point(logits, targets, ["animal", "object", "person"], 0.95)
    val = point["val"]
    assert point["temperature"] == pytest.approx(3.0, rel=0.05)
    assert val["in_sample_ece_after"] < val["in_sample_ece_before"]
    assert val["in_sample_nll_after"] < val["in_sample_nll_before"]
    assert val["person_recall"] >= 0.95 and val["resolved"]


def test_too_few_val_persons_is_said_and_recorded():
    logits, targets = sampled(200, 1.0, seed=7)
    persons = int((targets == 2).sum())
    assert persons < 100
    point = calibrate.operating_point(logits, targets, ["animal", "object", "person"], 0.99)
    assert point["val"] == {**point["val"], "persons": persons, "persons_needed": 100,
                            "resolved": False, "person_recall": 1.0, "persons_missed": 0}
    assert guarantee.persons_needed("none", 0.99, 0.05) == 100
    assert guarantee.persons_needed("none", 0.9, 0.05) == 10
    assert guarantee.persons_needed("none", 1.0, 0.05) == 1


def test_a_checkpoint_without_a_person_label_is_one_line():
    logits, targets = sampled(50, 1.0)
    with pytest.raises(StageError, match="no 'person' label"):
        calibrate.operating_point(logits, targets, ["animal", "object", "vehicle"], 0.99)


def test_alarm_figures_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.95])
    is_person = np.array([True, True, True, False, False, False, False])
    got = cal.alarm_figures(scores, is_person, 0.75)
    assert got == {"persons": 3, "non_persons": 4, "persons_missed": 1, "false_alarms": 1,
                   "person_recall": 0.6667, "person_precision": 0.6667,
                   "false_alarms_per_1000": 250.0,  # without pictures: each crop its own
                   "person_pictures": 3, "person_pictures_missed": 1,
                   "non_person_pictures": 4, "false_alarm_pictures": 1}


def test_evaluate_writes_the_keys_dvc_metrics_diff_lines_up():
    logits, targets = sampled(500, 2.0, seed=8)
    point = pt.OperatingPoint(temperature=2.0, threshold=0.4,
                              threshold_log_odds=cal.log_odds(0.4), target_recall=0.99)
    m = alarm_metrics(logits, targets, ["animal", "object", "person"], point)
    assert {"threshold", "target_recall", "test_person_recall", "test_person_precision",
            "false_alarms_per_1000"} <= set(m["operating_point"])
    assert set(m["calibration"]) == {"ece_before", "ece_after", "temperature", "nll_before",
                                     "nll_after", "brier_before", "brier_after"}
    calibration = m["calibration"]  # rounded to 4 places: within 5e-5 of the reference
    assert calibration["nll_after"] == pytest.approx(reference.nll(logits, targets, 2.0), abs=6e-5)
    assert calibration["nll_before"] == pytest.approx(reference.nll(logits, targets, 1.0), abs=6e-5)
    probs = reference.softmax(logits, 2.0)
    assert calibration["ece_after"] == pytest.approx(reference.ece(probs, targets), abs=6e-5)
    assert calibration["ece_before"] == \
        pytest.approx(reference.ece(reference.softmax(logits), targets), abs=6e-5)
    persons = targets == 2
    assert m["operating_point"]["test_person_recall"] == \
        round(float((probs[persons, 2] >= 0.4).mean()), 4)


def test_evaluate_records_the_statement_figures_and_refuses_a_point_it_cannot_state():
    logits, targets = sampled(500, 2.0, seed=8)
    val = {"persons": 29, "persons_needed": 299, "resolved": False, "expected_recall": 0.9667,
           "chance_recall_below_target": 0.7472}
    point = pt.OperatingPoint(temperature=2.0, threshold=0.4,
                              threshold_log_odds=cal.log_odds(0.4), target_recall=0.99,
                              guarantee="probability", delta=0.05,
                              fitted_on="data/split/calibration", val=val)
    op = alarm_metrics(logits, targets, ["animal", "object", "person"], point)["operating_point"]
    assert {"expected_recall": 0.9667, "chance_recall_below_target": 0.7472,
            "persons_needed": 299, "calibration_persons": 29, "resolved": False,
            "fitted_on": "data/split/calibration"}.items() <= op.items()
    assert op["threshold_log_odds"] == cal.log_odds(0.4)  # unrounded: the alarm itself
    assert op["target_verdict"] in ("met", "not shown", "not met")
    assert op["test_pictures_to_show"] == 299
    assert op["test_person_pictures"] == op["test_persons"]  # no pictures: each crop its own
    broken = dataclasses.replace(point, val={**val, "resolved": True})  # 29 cannot resolve it
    with pytest.raises(StageError, match="its figures cannot be stated .resolved True "
                                         "contradicts calibration_persons 29 against 299"):
        alarm_metrics(logits, targets, ["animal", "object", "person"], broken)


def write_point(path, **change):
    """A point as calibrate seals it, with ``change`` made before the seal."""
    point = pt.seal({"format": 1, "label": "person", "temperature": 1.5,
                      "threshold": cal.probability(cal.log_odds(0.2)),
                      "threshold_log_odds": cal.log_odds(0.2), "target_recall": 0.99,
                      "val": {"persons": 29}, "model_sha256": "0" * 64, **change})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(point))
    return point


@pytest.mark.parametrize("change, needle", [
    ({"temperature": -1}, "temperature -1"), ({"threshold": 1.5}, "threshold 1.5"),
    ({"threshold": math.nan}, "NaN is not a finite number"), ({"format": 9}, "format 9"),
    ({"label": "cat"}, "label 'cat'"), ({"model_sha256": None}, "model_sha256")])
def test_a_damaged_operating_point_file_is_one_line(tmp_path, change, needle):
    path = tmp_path / "operating_point.json"
    write_point(path, **change)
    with pytest.raises(StageError, match="dvc repro calibrate") as err:
        pt.read_operating_point(path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(StageError, match="cannot read it"):
        pt.read_operating_point(path)


def test_the_point_beside_a_checkpoint_is_used_only_for_that_checkpoint(tmp_path, monkeypatch):
    from stages.common.infra.digest import file_sha256

    monkeypatch.chdir(tmp_path)  # no data/calibration here
    ckpt = tmp_path / "m" / "best.pt"
    ckpt.parent.mkdir()
    ckpt.write_bytes(b"weights")
    assert pt.beside(ckpt, OPERATING_POINT) is None
    write_point(ckpt.parent / "operating_point.json")  # fitted for other bytes
    assert pt.beside(ckpt, OPERATING_POINT) is None
    write_point(ckpt.parent / "operating_point.json", model_sha256=file_sha256(ckpt))
    point = pt.beside(ckpt, OPERATING_POINT)
    assert point.threshold == 0.2 and point.source == str(ckpt.parent / "operating_point.json")
    write_point(tmp_path / "other.json")
    with pytest.raises(StageError, match="fitted for another checkpoint"):
        pt.operating_point_for(ckpt, tmp_path / "other.json")
    assert pt.operating_point_for(ckpt, ckpt.parent / "operating_point.json").threshold == 0.2


def test_alarm_figures_count_pictures_by_hand():
    scores = np.array([0.9, 0.8, 0.3, 0.7, 0.2, 0.1, 0.95, 0.99])
    is_person = np.array([True, True, True, False, False, False, False, False])
    # picture a: persons 0.9, 0.3 (one missed) and non-person 0.7; b: person 0.8, non-person
    # 0.2; c: non-persons 0.1, 0.95 and 0.99 (two false alarms, one picture)
    pictures = ["a", "b", "a", "a", "b", "c", "c", "c"]
    got = cal.alarm_figures(scores, is_person, 0.75, pictures)
    assert (got["persons_missed"], got["false_alarms"]) == (1, 2)
    assert (got["person_pictures"], got["person_pictures_missed"]) == (2, 1)
    assert (got["non_person_pictures"], got["false_alarm_pictures"]) == (3, 1)
    # the crops' order does not matter, only which picture each belongs to
    order = np.array([7, 2, 5, 0, 3, 6, 1, 4])
    assert cal.alarm_figures(scores[order], is_person[order], 0.75,
                             np.array(pictures)[order]) == got
    with pytest.raises(ValueError, match="3 picture ids for 8 crops"):
        cal.alarm_figures(scores, is_person, 0.75, pictures[:3])


# ----- persons come in pictures: which picture each crop is from, T's bootstrap by picture -----

def test_crop_pictures_reads_the_split_manifest_and_makes_an_unlisted_crop_its_own(tmp_path):
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("crop,split,label,image_id,source\n"
                        "val/person/a_0.jpg,val,person,a,person/a_0.jpg\n"
                        "val/person/a_1.jpg,val,person,a,person/a_1.jpg\n"
                        "val/animal/b_0.jpg,val,animal,b,animal/b_0.jpg\n"
                        "val/object/c_0.jpg,val,object,,object/c_0.jpg\n")
    paths = ["data/split/val/person/a_0.jpg", "/abs/data/split/val/animal/b_0.jpg",
             "data/split/val/person/a_1.jpg", "data/split/val/object/c_0.jpg",
             "data/split/val/person/z_0.jpg"]
    ids, unlisted = cal.crop_pictures(paths, manifest)
    assert ids[:3] == ["a", "b", "a"] and unlisted == 2
    # no ImageID, or not listed: a picture of its own, never one shared with another crop
    assert len(set(ids)) == 4 and ids[3] != ids[4]
    line = cal.unlisted_line(unlisted, 5, manifest)
    assert "does not list 2 of the 5 crops" in line and "\n" not in line
    assert cal.unlisted_line(0, 5, manifest) is None
    # without a manifest (a split made by hand) every crop is its own picture, and it is said
    ids, unlisted = cal.crop_pictures(paths, tmp_path / "none.csv")
    assert len(set(ids)) == 5 and unlisted == 5


def test_an_unreadable_split_manifest_is_one_line(tmp_path):
    manifest = tmp_path / "manifest.csv"
    for text in ("crop,label\nval/person/a_0.jpg,person\n", "", "\x00\xff\xfe"):
        manifest.write_bytes(text.encode("latin-1"))
        with pytest.raises(StageError, match="dvc repro split") as err:
            cal.crop_pictures(["data/split/val/person/a_0.jpg"], manifest)
        assert "\n" not in str(err.value)


def test_the_temperature_bootstrap_resamples_pictures():
    logits, targets = sampled(60, 1.5, seed=11)
    single = cal.temperature_interval(logits, targets, seed=3, draws=60)
    # every picture is three copies of one crop: a picture bootstrap draws the same pictures
    # as the crop bootstrap of the singles, so the same interval; resampling the copies one by
    # one pretends to three times the data and narrows it
    copies = np.repeat(np.arange(60), 3)
    by_picture = cal.temperature_interval(logits[copies], targets[copies], seed=3, draws=60,
                                          pictures=copies)
    assert by_picture["resampled"] == "pictures" and by_picture["pictures"] == 60
    assert (by_picture["low"], by_picture["high"]) == pytest.approx(
        (single["low"], single["high"]), abs=2e-4)
    by_crop = cal.temperature_interval(logits[copies], targets[copies], seed=3, draws=60)
    assert by_crop["pictures"] == 180
    assert by_crop["high"] - by_crop["low"] < 0.8 * (by_picture["high"] - by_picture["low"])


def test_an_interval_reaching_a_search_bound_warns():
    assert cal.interval_warnings({"low": 0.2, "high": 5.0}) == []
    for low, high in [(cal.T_MIN, 0.4192), (0.3, cal.T_MAX), (0.054, 1.0)]:
        (line,) = cal.interval_warnings({"low": low, "high": high})
        assert "reaches an end of its search range" in line and "\n" not in line
    # one wrong crop among 30: the resamples that leave it out (about 36 %) have no error, so
    # T runs towards its lower end there, and the interval's low end is one of them
    logits = np.tile([[0.0, 0.0, 3.0]], (30, 1))
    targets = np.full(30, 2)
    targets[0] = 0
    interval = cal.temperature_interval(logits, targets, seed=0, draws=100)
    assert 20 <= interval["draws_without_error"] <= 50
    (line,) = cal.interval_warnings(interval)
    assert f"on {interval['draws_without_error']}% of the resampled" in line
    targets[1] = 1  # two wrong, far apart: only 13 % of resamples miss both; still too many
    assert cal.interval_warnings(cal.temperature_interval(logits, targets, seed=0, draws=100))
    # the share that decides: at or above the 2.5 % the lower end sits on
    steady = {"low": 0.3, "high": 5.0, "draws": 200, "confidence": 0.95}
    assert cal.interval_warnings({**steady, "draws_without_error": 4}) == []
    assert cal.interval_warnings({**steady, "draws_without_error": 5})


def test_calibrate_counts_the_pictures_the_split_manifest_names(tmp_path, monkeypatch, capsys):
    from types import SimpleNamespace

    from tests import paramfile

    logits, targets = sampled(120, 1.0, seed=12)
    labels = ["animal", "object", "person"]
    crops = [f"val/{labels[t]}/p{i // 2}_{i % 2}.jpg" for i, t in enumerate(targets)]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "model").mkdir(parents=True)
    (tmp_path / "data" / "model" / "best.pt").write_bytes(b"weights")
    monkeypatch.setattr(calibrate, "load_checkpoint",
                        lambda path: (FakeModel(), ModelMeta("resnet18", labels, 64, [0.5] * 3,
                                                             [0.25] * 3)))
    monkeypatch.setattr(calibrate, "labelled_logits", lambda *args: (
        SimpleNamespace(paths=[f"data/split/{c}" for c in crops]), logits, targets))
    paramfile.write(tmp_path, {"calibrate": {"device": "cpu"}})
    rows = [f"{c},val,x,p{i // 2},src" for i, c in enumerate(crops)]  # two crops a picture
    manifest = tmp_path / "data" / "split" / "manifest.csv"
    manifest.parent.mkdir(parents=True)
    for listed, unlisted in [(rows, 0), (rows[1:], 1)]:
        manifest.write_text("\n".join(["crop,split,label,image_id,source", *listed]) + "\n")
        calibrate.main()
        val = json.loads((tmp_path / OPERATING_POINT).read_text())["val"]
        person_pictures = len({i // 2 for i, t in enumerate(targets) if t == 2})
        assert (val["crops"], val["pictures"]) == (120, 60 + unlisted)
        assert val["person_pictures"] == person_pictures + (unlisted and targets[0] == 2)
        assert val["order_statistic"] == val["person_pictures"]  # unresolved: all of them
        err = capsys.readouterr().err
        assert ("does not list 1 of the 120 crops" in err) == bool(unlisted)
        assert f"in {val['person_pictures']} pictures" in err


class FakeModel:
    def to(self, *args, **kwargs):
        return self


def test_evaluate_bounds_the_alarm_by_picture():
    logits, targets = sampled(400, 2.0, seed=13)
    point = pt.OperatingPoint(temperature=2.0, threshold=0.4,
                              threshold_log_odds=cal.log_odds(0.4), target_recall=0.9)
    pictures = np.arange(400) // 4  # four crops a picture
    op = alarm_metrics(logits, targets, ["animal", "object", "person"], point,
                       pictures)["operating_point"]
    persons = targets == 2
    alarm = cal.person_log_odds(logits, 2.0, 2) >= cal.log_odds(0.4)
    with_persons = np.unique(pictures[persons])
    missed = np.unique(pictures[persons & ~alarm])
    raised = np.unique(pictures[~persons & alarm])
    assert (op["test_persons"], op["test_person_pictures"]) == (persons.sum(), len(with_persons))
    assert op["test_person_pictures_missed"] == len(missed) > 0
    assert op["test_non_person_pictures"] == len(np.unique(pictures[~persons]))
    assert op["test_false_alarm_pictures"] == len(raised)
    # the bounds count pictures: fewer of them than crops, so a wider (honest) bound
    low = guarantee.lower_bound(len(with_persons) - len(missed), len(with_persons))
    assert op["test_person_recall_lower_95"] == math.floor(low * 1e4 + 1e-9) / 1e4
    alone = alarm_metrics(logits, targets, ["animal", "object", "person"], point)
    assert alone["operating_point"]["test_person_pictures"] == persons.sum()
    assert op["test_person_recall_lower_95"] < alone["operating_point"][
        "test_person_recall_lower_95"]
    assert op["false_alarms_per_1000_upper_95"] > alone["operating_point"][
        "false_alarms_per_1000_upper_95"]
