"""The threshold's guarantee on constructed scores: exact Clopper-Pearson bounds, the rules'
order statistics, and (in seeded simulation) that each rule keeps its promise on new persons."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import beta, binom, norm

from stages import calibrate
from stages.common.alarm import calibration as cal, guarantee as g
from stages.common.alarm.point import OperatingPoint, seal
from stages.common.config.paths import OPERATING_POINT
from stages.common.infra.errors import StageError
from stages.common.model.checkpoint import ModelMeta
from tests import paramfile

DRAWS = 2000
Z = 3.29  # two-sided 0.1 %: the Monte-Carlo tolerance below is Z standard errors


def as_read(point: dict) -> OperatingPoint:
    """calibrate.operating_point's point as its readers get it: sealed, then read."""
    return OperatingPoint.parse(seal({**point, "fitted_on": "data/split/calibration"}),
                                embedded=True)


# ----- Clopper-Pearson -------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 10, 29, 58, 300])
def test_bounds_at_the_ends_have_closed_forms(n):
    # all n caught: P(n of n | p) = p^n = 0.05 at the bound; none raised: (1 - p)^n = 0.05
    assert g.lower_bound(n, n) == pytest.approx(0.05 ** (1 / n), rel=1e-12)
    assert g.upper_bound(0, n) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-12)
    assert g.lower_bound(0, n) == 0.0 and g.upper_bound(n, n) == 1.0
    assert g.lower_bound(0, 0) is None and g.upper_bound(0, 0) is None


# (x, n, lower, upper) from statsmodels 0.15.0, proportion_confint(x, n, alpha=0.10,
# method="beta"): the exact two-sided 90 % interval, whose ends are the one-sided 95 % bounds
# (beta.ppf(0.05, x, n - x + 1) and beta.ppf(0.95, x + 1, n - x); 0 and 1 at the ends). R agrees:
# binom.test(7, 10, alternative = "greater")$conf.int[1] = 0.3933758,
# binom.test(3, 10, alternative = "less")$conf.int[2] = 0.6066242.
CLOPPER_PEARSON = [
    (0, 1, 0.0, 0.95), (1, 1, 0.05, 1.0), (0, 10, 0.0, 0.2588655509),
    (10, 10, 0.7411344491, 1.0), (3, 10, 0.0872644339, 0.6066242161),
    (7, 10, 0.3933757839, 0.9127355661), (1, 2, 0.0253205655, 0.9746794345),
    (5, 20, 0.1040808359, 0.4555824040), (1, 137, 0.0003743335, 0.0341571972),
    (57, 58, 0.9208021895, 0.9991160238), (58, 58, 0.9496606617, 1.0),
    (95, 100, 0.8977466224, 0.9800944363), (0, 299, 0.0, 0.0099691468),
    (296, 299, 0.9742735326, 0.9972598177), (299, 299, 0.9900308532, 1.0),
    (990, 1000, 0.9830968249, 0.9945648599)]


@pytest.mark.parametrize("x, n, lower, upper", CLOPPER_PEARSON)
def test_bounds_agree_with_statsmodels_and_r(x, n, lower, upper):
    assert g.lower_bound(x, n) == pytest.approx(lower, abs=1e-9)
    assert g.upper_bound(x, n) == pytest.approx(upper, abs=1e-9)


def test_bounds_agree_with_their_definition():
    for x, n in [(1, 5), (57, 58), (95, 100), (990, 1000)]:
        low, high = g.lower_bound(x, n), g.upper_bound(x, n)
        # the bound is the p at which seeing x or more (x or fewer) has probability exactly 5 %
        assert binom.sf(x - 1, n, low) == pytest.approx(0.05, abs=1e-9)
        assert binom.cdf(x, n, high) == pytest.approx(0.05, abs=1e-9)
        assert low < x / n < high


def test_shown_bounds_round_outwards_and_target_met_needs_the_lower_bound():
    # 58 of 58 persons: recall 1.0, but the lower bound 0.9497 is below 0.99: not met
    figures = {"persons": 58, "persons_missed": 0, "non_persons": 137, "false_alarms": 1}
    bounds = g.alarm_bounds(figures, 0.99)
    # 0.9496606617 rounded down; 1 of 137: upper bound 0.0341571972 (CLOPPER_PEARSON above),
    # 34.1571972 per 1000 rounded up
    assert bounds == {"person_recall_lower_95": 0.9496, "false_alarms_per_1000_upper_95": 34.16,
                      "target_met": False}
    assert bounds["person_recall_lower_95"] <= g.lower_bound(58, 58)
    assert g.alarm_bounds(figures, 0.94)["target_met"] is True
    assert g.alarm_bounds({**figures, "persons": 0}, 0.9)["target_met"] is False


# ----- the rules' order statistics ------------------------------------------------------------

@pytest.mark.parametrize("rule, target, delta, needed", [
    ("probability", 0.99, 0.05, 299), ("probability", 0.95, 0.05, 59),
    ("probability", 0.9, 0.1, 22), ("average", 0.99, 0.05, 99), ("average", 0.9, 0.05, 9),
    ("none", 0.99, 0.05, 100), ("none", 0.9, 0.05, 10)])
def test_persons_needed_is_the_fewest_that_resolve(rule, target, delta, needed):
    assert g.persons_needed(rule, target, delta) == needed
    assert g.order_from_top(rule, needed, target, delta) is not None
    assert g.order_from_top(rule, needed - 1, target, delta) is None


def test_persons_needed_agrees_with_the_rules_over_many_targets():
    rng = np.random.default_rng(0)
    for _ in range(200):
        target, delta = float(rng.uniform(0.5, 0.995)), float(rng.uniform(0.01, 0.5))
        for rule in g.RULES:
            n = g.persons_needed(rule, target, delta)
            assert g.order_from_top(rule, n, target, delta) is not None
            assert n == 1 or g.order_from_top(rule, n - 1, target, delta) is None
        # the umbrella's closed form: the fewest n with target^n <= delta
        n = g.persons_needed("probability", target, delta)
        assert target ** n <= delta < target ** (n - 1)
    for rule in ("average", "probability"):  # no val set guarantees recall 1 on new persons
        assert g.persons_needed(rule, 1.0, 0.05) is None
        assert g.order_from_top(rule, 10_000, 1.0, 0.05) is None


@pytest.mark.parametrize("n, target, delta", [(100, 0.95, 0.1), (299, 0.99, 0.05),
                                              (1000, 0.99, 0.05), (60, 0.9, 0.2)])
def test_the_umbrella_takes_the_highest_admissible_order_statistic(n, target, delta):
    k = g.order_from_top("probability", n, target, delta)
    r = n + 1 - k  # counted from the lowest person score
    assert binom.cdf(r - 1, n, 1 - target) <= delta  # admissible
    assert r == n or binom.cdf(r, n, 1 - target) > delta  # one higher is not: fewest alarms
    assert g.assurance(n, k, target)["chance_recall_below_target"] <= delta + 1e-4


# ----- the guarantees in simulation -----------------------------------------------------------

def order_statistic_recalls(rule: str, n: int, target: float, delta: float,
                            draws: int = DRAWS) -> np.ndarray:
    """New-person recall of the rule's order statistic on ``draws`` val sets of n person scores
    drawn from N(0, 1): exactly norm.sf(threshold), no new draws needed."""
    rng = np.random.default_rng([n, int(target * 1000)])
    scores = -np.sort(-rng.normal(size=(draws, n)), axis=1)  # highest first
    k = g.order_from_top(rule, n, target, delta)
    return norm.sf(scores[:, k - 1])


def shipped_rule_recalls(rule: str, n: int, target: float, delta: float) -> np.ndarray:
    """The same with calibrate's threshold (halfway to the non-person below), non-persons from
    N(-2, 1) mixed in."""
    rng = np.random.default_rng([n, 7])
    out = []
    for _ in range(DRAWS):
        scores = np.concatenate([rng.normal(size=n), rng.normal(-2, 1, size=3 * n)])
        is_person = np.arange(4 * n) < n
        out.append(norm.sf(cal.person_threshold(scores, is_person, target, rule, delta)))
    return np.array(out)


def test_the_conformal_rule_reaches_the_target_on_average():
    n, target = 25, 0.9
    for recalls in (order_statistic_recalls("average", n, target, 0.05),
                    shipped_rule_recalls("average", n, target, 0.05)):
        tolerance = Z * recalls.std() / math.sqrt(DRAWS)
        assert recalls.mean() >= target - tolerance
    # exactly k / (n + 1) on average, as derived
    recalls = order_statistic_recalls("average", n, target, 0.05)
    k = g.order_from_top("average", n, target, 0.05)
    assert recalls.mean() == pytest.approx(k / (n + 1), abs=Z * recalls.std() / math.sqrt(DRAWS))
    # the check can fail: reaching the target on val only (none) falls short on new persons
    plain = order_statistic_recalls("none", n, target, 0.05)
    assert plain.mean() < target - Z * plain.std() / math.sqrt(DRAWS)


def test_the_umbrella_rule_misses_the_target_in_at_most_delta_of_draws():
    n, target, delta = 100, 0.95, 0.1
    tolerance = Z * math.sqrt(delta * (1 - delta) / DRAWS)
    for recalls in (order_statistic_recalls("probability", n, target, delta),
                    shipped_rule_recalls("probability", n, target, delta)):
        assert (recalls < target).mean() <= delta + tolerance
    # exactly binom.cdf(r - 1, n, 1 - target), as derived
    k = g.order_from_top("probability", n, target, delta)
    exact = binom.cdf(n - k, n, 1 - target)
    missed = (order_statistic_recalls("probability", n, target, delta) < target).mean()
    assert missed == pytest.approx(exact, abs=Z * math.sqrt(exact * (1 - exact) / DRAWS))
    # the check can fail: the conformal rule, right on average, misses far more often
    average = order_statistic_recalls("average", n, target, delta)
    assert (average < target).mean() > delta + tolerance


def test_the_shipped_default_misses_the_target_in_at_most_delta_of_draws():
    """params.yaml's setting: target 0.99, delta 0.05 (rule probability), with the 299 val
    persons it needs; at exactly 299 every val person must raise the alarm."""
    n, target, delta, draws = 299, 0.99, 0.05, 20_000
    assert g.persons_needed("probability", target, delta) == n
    assert g.order_from_top("probability", n, target, delta) == n  # the lowest person score
    exact = target ** n  # the chance that all 299 fall in the top 99 % of persons: 0.0495
    assert binom.cdf(0, n, 1 - target) == pytest.approx(exact) and exact <= delta
    tolerance = Z * math.sqrt(exact * (1 - exact) / draws)
    missed = (order_statistic_recalls("probability", n, target, delta, draws) < target).mean()
    assert missed == pytest.approx(exact, abs=tolerance)
    shipped = (shipped_rule_recalls("probability", n, target, delta) < target).mean()
    assert shipped <= delta + Z * math.sqrt(delta * (1 - delta) / DRAWS)
    # the check can fail: reaching 0.99 on val alone misses on new persons about half the time
    plain = (order_statistic_recalls("none", n, target, delta, draws) < target).mean()
    assert plain > delta + tolerance


# ----- the stage: too few persons, the point's keys, the split it reads ----------------------

def sampled(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 2.0, (n, 3))
    targets = (rng.random(n)[:, None] > cal.softmax(logits).cumsum(axis=1)).sum(axis=1)
    return logits, targets


@pytest.mark.parametrize("rule, needed", [("probability", 299), ("average", 99), ("none", 100)])
def test_too_few_persons_for_the_rule_is_one_line_and_recorded(rule, needed):
    logits, targets = sampled(150)
    persons = int((targets == 2).sum())
    point = calibrate.operating_point(logits, targets, ["animal", "object", "person"], 0.99,
                                      rule, 0.05, seed=1)
    val = point["val"]
    assert (point["guarantee"], val["persons_needed"], val["resolved"]) == (rule, needed, False)
    assert val["persons_missed"] == 0 and val["order_statistic"] == persons  # every one alarms
    said, warned = calibrate.statement_lines(as_read(point))
    (line,) = warned
    assert said == [] and line.startswith(
        f"warning: data/split/calibration holds {persons} persons in {persons} pictures, but "
        f"calibrate.guarantee {rule} needs {needed} pictures with persons")
    assert f"(expected recall {val['expected_recall']:g})" in line and "stricter" not in line
    assert f"falls below 0.99 is {val['chance_recall_below_target']:g}" in line
    assert "\n" not in line


def test_a_resolved_point_records_bounds_assurance_and_the_temperature_interval():
    logits, targets = sampled(3000, seed=2)
    point = calibrate.operating_point(logits * 2.0, targets, ["animal", "object", "person"],
                                      0.95, "probability", 0.05, seed=3)
    val = point["val"]
    said, warned = calibrate.statement_lines(as_read(point))
    assert val["resolved"] and warned == [] and said[0].startswith("Resolved: ")
    assert f"(expected recall {val['expected_recall']:g})" in said[1]
    assert val["chance_recall_below_target"] <= 0.05
    assert val["person_recall_lower_95"] <= val["person_recall"]
    assert val["target_met"] == (g.lower_bound(val["persons"] - val["persons_missed"],
                                               val["persons"]) >= 0.95)
    interval = point["temperature_interval"]
    assert interval["low"] <= point["temperature"] <= interval["high"]
    assert interval["low"] == pytest.approx(2.0, rel=0.2) and interval["seed"] == 3
    again = calibrate.operating_point(logits * 2.0, targets, ["animal", "object", "person"],
                                      0.95, "probability", 0.05, seed=3)
    assert again["temperature_interval"] == interval  # seeded: the same numbers every run


def test_the_temperature_warns_at_its_bounds_and_without_val_errors():
    logits, targets = sampled(300, seed=4)
    assert cal.temperature_warnings(1.3, logits, targets) == []
    for t in (cal.T_MIN, cal.T_MIN * 1.09, cal.T_MAX * 0.95):
        (line,) = cal.temperature_warnings(t, logits, targets)
        assert "within 10 % of its search range's end" in line
    perfect = logits.argmax(axis=1)
    lines = cal.temperature_warnings(cal.fit_temperature(logits, perfect), logits, perfect)
    assert any("no error on the 300 val crops" in line for line in lines)
    assert all("\n" not in line for line in lines)


def test_brier_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # truth [1, 0, 0]: 0.3² + 0.2² + 0.1² = 0.14; truth [0, 1, 0]: 0.1² + 0.9² + 0.8² = 1.46
    assert cal.brier(probs, np.array([0, 1])) == pytest.approx((0.14 + 1.46) / 2)
    assert cal.brier(np.eye(3), np.arange(3)) == 0 and cal.brier(np.eye(3)[[1]], [0]) == 2


class FakeModel:
    def to(self, *args, **kwargs):
        return self


def test_calibrate_reads_the_calibration_split_when_it_has_a_share(tmp_path, monkeypatch,
                                                                    capsys):
    logits, targets = sampled(120, seed=5)
    read = []

    def fake_logits(model, meta, folder, *args):
        read.append(folder)
        return SimpleNamespace(paths=[f"{folder}/x/{i}.jpg" for i in range(120)]), logits, targets

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "model").mkdir(parents=True)
    (tmp_path / "data" / "model" / "best.pt").write_bytes(b"weights")
    monkeypatch.setattr(calibrate, "load_checkpoint",
                        lambda path: (FakeModel(), ModelMeta(
                            "resnet18", ["animal", "object", "person"], 64, [0.5] * 3, [0.25] * 3)))
    monkeypatch.setattr(calibrate, "labelled_logits", fake_logits)
    for share, folder in [(0, calibrate.VAL_SPLIT), (0.1, calibrate.CALIBRATION_SPLIT)]:
        paramfile.write(tmp_path, {"split": {"calibration": share},
                                   "calibrate": {"device": "cpu"}})
        calibrate.main()
        point = json.loads((tmp_path / OPERATING_POINT).read_text())
        assert read[-1] == folder and point["fitted_on"] == str(folder)
        err = capsys.readouterr().err
        assert f"warning: {folder} holds" in err and "probability needs 299" in err
        caveat = "warning: val picked the training epoch and then fitted this threshold"
        assert (caveat in err) == (share == 0)


def test_the_model_card_states_what_the_point_gives_and_what_test_shows():
    from stages.common.alarm.statement import ASSUMPTION, point_facts, tested_facts
    from stages.export import alarm_section

    point = {"threshold": 0.62566, "threshold_log_odds": cal.log_odds(0.62566),
             "target_recall": 0.99, "guarantee": "probability", "delta": 0.05,
             "fitted_on": "data/split/val",
             "val": {"persons": 29, "person_pictures": 18, "persons_needed": 299,
                     "resolved": False, "expected_recall": 0.9474,
                     "chance_recall_below_target": 0.8346}}
    test = {"persons": 58, "persons_missed": 0, "non_persons": 137, "false_alarms": 1,
            "person_recall": 1.0, "person_precision": 0.9831, "false_alarms_per_1000": 7.3,
            "person_pictures": 39, "person_pictures_missed": 0, "non_person_pictures": 80,
            "false_alarm_pictures": 1}
    op = {**point_facts(OperatingPoint(temperature=1.2, **point)), **tested_facts(test, 0.99)}
    calibration = {"temperature": 1.2, "ece_before": 0.1, "ece_after": 0.05}
    card = " ".join(alarm_section({"operating_point": op, "calibration": calibration}).split())
    assert ">= **0.6256** (rounded down: copied into `--person-threshold`, it raises the alarm " \
           "for every picture this point does)" in card
    assert "holds 29 persons in 18 pictures, but calibrate.guarantee probability needs 299 " \
           "pictures with persons" in card
    assert "(expected recall 0.9474), and the chance that their recall falls below 0.99 is " \
           "0.8346." in card
    assert "Caveat: val picked the training epoch" in card and ASSUMPTION in card
    assert "58 of 58 test persons (in 39 pictures) raised the alarm, and 1 of 137 animals and " \
           "objects did" in card
    assert "The target of 0.99 is not shown: 39 test pictures with persons can show at most " \
           "0.926" in card
    assert "misses 2 or more about 26 % of the time" in card
    for wrong in ("with probability at least", "of 100 people", "not met", "stricter", "0.6257"):
        assert wrong not in card
    resolved = {**point, "fitted_on": "data/split/calibration",
                "val": {**point["val"], "persons": 1500, "person_pictures": 900, "resolved": True,
                        "expected_recall": 0.9953, "chance_recall_below_target": 0.0468}}
    caught = {**test, "persons": 1000, "persons_missed": 2, "person_recall": 0.998,
              "person_pictures": 700, "person_pictures_missed": 1}
    card = " ".join(alarm_section({"operating_point": {**point_facts(
                                       OperatingPoint(temperature=1.2, **resolved)),
                                                       **tested_facts(caught, 0.99)},
                                   "calibration": calibration}).split())
    assert "Resolved: data/split/calibration holds 1,500 persons in 900 pictures" in card
    assert "is 0.0468 (calibrate.delta 0.05)" in card and "Caveat" not in card
    assert "The target of 0.99 is met with 95 % confidence." in card
    bad = {**op, "test_person_recall_lower_95": 5}
    with pytest.raises(StageError, match="operating point cannot be stated .test_person_recall_"
                                         "lower_95 5 is not a finite number from 0 to 1"):
        alarm_section({"operating_point": bad, "calibration": calibration})


def test_the_model_cards_split_table_holds_the_calibration_split():
    from stages.common.config import params as P
    from stages.export import model_card

    cfg = P.parse(paramfile.params({"split": {"calibration": 0.1}}))
    crops = {part: {"animal": n, "object": n, "person": n, "total": 3 * n}
             for part, n in (("train", 60), ("val", 10), ("calibration", 11), ("test", 20))}
    scores = {"accuracy": 0.9, "macro_f1": 0.9, "person_recall": 1.0, "test_crops": 60,
              "per_class": {}}
    speed = {"batch1_ms_per_image": 1.0, "batch1_ms_q1": 1.0, "batch1_ms_q3": 1.0,
             "batch1_runs": 3, "batch_images_per_s": 100.0, "batch_size": 4}
    meta = ModelMeta("resnet18", ["animal", "object", "person"], 64, [0.5] * 3, [0.25] * 3)
    card = model_card(cfg, meta, scores, {"crops": crops}, {},
                      {"parity": {"max_abs_logit_diff": 0.0, "test_crops": 60}},
                      {"threads": 2, "pytorch_eager": speed, "onnxruntime": speed})
    table = card.split("| split |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    assert [row.split(" | ")[0] for row in table] == ["| train", "| val", "| calibration",
                                                      "| test"]
    assert "| calibration | 11 | 11 | 11 | 33 |" in card


# ----- persons come in pictures: correlated crops ----------------------------------------------
# Each simulated picture holds 1 to 5 persons; a person's score is a picture effect plus its own
# noise, N(0, 1) in all, with a correlation of RHO between two persons of one picture.

RHO = 0.6
MOST = 5  # persons in a picture: 1 ... MOST, equally likely
PICTURE_DRAWS = 4000


def correlated_pictures(rng: np.random.Generator, draws: int, pictures: int):
    """(scores, present): draws x pictures x MOST person scores, and which of them exist."""
    sizes = rng.integers(1, MOST + 1, size=(draws, pictures))
    scores = (math.sqrt(RHO) * rng.normal(size=(draws, pictures, 1))
              + math.sqrt(1 - RHO) * rng.normal(size=(draws, pictures, MOST)))
    return scores, np.arange(MOST) < sizes[..., None]


def picture_miss(threshold) -> np.ndarray:
    """The chance a new picture has at least one person below ``threshold`` (its lowest is),
    exactly: Gauss-Hermite over the picture effect, then the mean over picture sizes."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(80)
    caught = norm.sf((np.asarray(threshold)[..., None] - math.sqrt(RHO) * nodes)
                     / math.sqrt(1 - RHO))
    return 1 - np.mean([(caught ** c) @ (weights / weights.sum())
                        for c in range(1, MOST + 1)], axis=0)


def test_the_rule_by_picture_keeps_its_promise_when_crops_of_a_picture_are_correlated():
    pictures, target, delta = 100, 0.95, 0.05
    rng = np.random.default_rng([pictures, 24])
    scores, present = correlated_pictures(rng, PICTURE_DRAWS, pictures)
    tolerance = Z * math.sqrt(delta * (1 - delta) / PICTURE_DRAWS)
    # the rule on each picture's lowest person score, over the pictures
    lowest = np.where(present, scores, np.inf).min(axis=2)
    k = g.order_from_top("probability", pictures, target, delta)
    threshold = -np.sort(-lowest, axis=1)[:, k - 1]
    assert (picture_miss(threshold) > 1 - target).mean() <= delta + tolerance
    # so a new person's recall (scores are N(0, 1) whatever the picture) too
    assert (norm.cdf(threshold) > 1 - target).mean() <= delta + tolerance
    # the check can fail: the same rule over the crops as if independent misses far more often
    crops = -np.sort(-np.where(present, scores, -np.inf).reshape(PICTURE_DRAWS, -1), axis=1)
    persons = present.sum(axis=(1, 2))
    order = {n: g.order_from_top("probability", int(n), target, delta)
             for n in np.unique(persons)}
    per_crop = crops[np.arange(PICTURE_DRAWS), [order[n] - 1 for n in persons]]
    assert (norm.cdf(per_crop) > 1 - target).mean() > delta + tolerance


def test_the_shipped_threshold_by_picture_keeps_the_promise_on_correlated_pictures():
    pictures, target, delta, draws = 80, 0.95, 0.05, 1000
    rng = np.random.default_rng([pictures, 25])
    scores, present = correlated_pictures(rng, draws, pictures)
    picture_of = np.broadcast_to(np.arange(pictures)[:, None], present.shape[1:])
    thresholds = []
    for d in range(draws):
        # the persons, and as many non-persons from N(-2, 1), in pictures of their own
        persons = scores[d][present[d]]
        others = rng.normal(-2, 1, size=len(persons))
        ids = np.concatenate([picture_of[present[d]], pictures + np.arange(len(others))])
        is_person = np.arange(len(ids)) < len(persons)
        thresholds.append(cal.person_threshold(np.concatenate([persons, others]), is_person,
                                               target, "probability", delta, ids))
    tolerance = Z * math.sqrt(delta * (1 - delta) / draws)
    assert (picture_miss(np.array(thresholds)) > 1 - target).mean() <= delta + tolerance


def test_bounds_by_picture_cover_where_bounds_by_crop_do_not():
    pictures, draws = 40, 2000
    rng = np.random.default_rng([pictures, 26])
    scores, present = correlated_pictures(rng, draws, pictures)
    threshold = norm.ppf(0.1)  # a new person is caught with probability 0.9
    missed = (scores < threshold) & present
    persons, caught = present.sum(axis=(1, 2)), (present & ~missed).sum(axis=(1, 2))
    pictures_missed = missed.any(axis=2).sum(axis=1)
    # the bound by picture, from alarm_bounds: one per count of pictures missed
    by_picture = {x: g.alarm_bounds({"persons": 0, "persons_missed": 0, "non_persons": 0,
                                     "false_alarms": 0, "person_pictures": pictures,
                                     "person_pictures_missed": int(x),
                                     "non_person_pictures": 0, "false_alarm_pictures": 0}
                                    )["person_recall_lower_95"]
                  for x in np.unique(pictures_missed)}
    # by crop, as alarm_bounds counted before (the Clopper-Pearson bound, here vectorised)
    by_crop = beta.ppf(0.05, caught, persons - caught + 1)
    covered = {"crop": by_crop <= 0.9,
               # by picture it bounds the chance a new picture has every person caught
               "picture": np.array([by_picture[x] for x in pictures_missed])
               <= 1 - picture_miss(threshold)}
    tolerance = Z * math.sqrt(0.05 * 0.95 / draws)
    assert np.mean(covered["picture"]) >= 0.95 - tolerance
    assert np.mean(covered["crop"]) < 0.95 - tolerance  # the check can fail: crops are too sure
