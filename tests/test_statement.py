"""The alarm's statement (stages.common.alarm.statement) on constructed points and test
figures: resolved and unresolved points, the test verdicts met / not shown / not met, thresholds
that copy back into an alarm never stricter, and figures out of range or contradicting refused."""
import math

import pytest
from scipy.stats import binom

from stages.common.alarm import calibration as cal, guarantee as g, statement as s
from stages.common.alarm.point import OperatingPoint


def point(**val) -> dict:
    """A point as calibrate writes it: the bundled sample's (29 persons in 18 pictures,
    unresolved)."""
    return {"threshold": cal.probability(0.5), "threshold_log_odds": 0.5, "target_recall": 0.99,
            "guarantee": "probability", "delta": 0.05, "fitted_on": "data/split/calibration",
            "val": {"persons": 29, "person_pictures": 18, "persons_needed": 299,
                    "resolved": False,
                    "expected_recall": 0.9667, "chance_recall_below_target": 0.7472, **val}}


def figures(persons: int, missed: int, non_persons: int = 98, false_alarms: int = 0,
            pictures: int | None = None) -> dict:
    """alarm_figures on test; ``pictures``: the pictures with persons, none with a miss (None:
    figures without picture counts, as an older eval.json)."""
    out = {"persons": persons, "persons_missed": missed, "non_persons": non_persons,
           "false_alarms": false_alarms,
           "person_recall": round((persons - missed) / persons, 4) if persons else None,
           "person_precision": 1.0, "false_alarms_per_1000":
               round(1000 * false_alarms / non_persons, 2)}
    if pictures is not None:
        out.update(person_pictures=pictures, person_pictures_missed=0, non_person_pictures=60,
                   false_alarm_pictures=0)
    return out


def facts(p: dict, test: dict | None = None) -> dict:
    out = s.point_facts(OperatingPoint(temperature=1.0, **p))
    return {**out, **s.tested_facts(test, p["target_recall"])} if test else out


def test_an_unresolved_point_says_what_it_gives_and_never_that_it_is_stricter():
    said = " ".join(s.statement(facts(point())))
    assert said.startswith("Unresolved: data/split/calibration holds 29 persons in 18 pictures, "
                           "but calibrate.guarantee probability needs 299 pictures with persons "
                           "for a recall target of 0.99, so every one of them raises the alarm, "
                           "and that does not give the target.")
    assert ("New persons are caught 96.6 % of the time on average (expected recall 0.9667), "
            "and the chance that their recall falls below 0.99 is 0.7472.") in said
    assert "stricter" not in said and "calibrate.delta" not in said  # no promise it did not keep
    assert "Caveat" not in said  # fitted on a calibration split of its own


def test_a_resolved_point_states_its_chance_against_delta():
    said = s.statement(facts(point(persons=1500, person_pictures=900, resolved=True,
                                   expected_recall=0.99534, chance_recall_below_target=0.0468)))
    assert said[0] == ("Resolved: data/split/calibration holds 1,500 persons in 900 pictures; "
                       "calibrate.guarantee probability needs 299 pictures with persons for a "
                       "recall target of 0.99.")
    assert said[1] == ("New persons are caught 99.5 % of the time on average (expected recall "
                       "0.9953), and the chance that their recall falls below 0.99 is 0.0468 "
                       "(calibrate.delta 0.05).")


def test_a_tiny_delta_is_never_printed_as_probability_1():
    said = " ".join(s.statement(facts({**point(persons=400, person_pictures=400,
                                               persons_needed=161, resolved=True,
                                                 expected_recall=0.998,
                                                 chance_recall_below_target=1e-7),
                                       "delta": 1e-7})))
    assert "is 0.0001 (calibrate.delta 1e-07)" in said  # the chance rounds up, never to 0
    assert "at least 1 " not in said and "probability 1" not in said


def test_the_caveat_is_stated_whenever_val_fitted_the_point():
    for p in (point(), point(persons=1500, person_pictures=900, resolved=True,
                             chance_recall_below_target=0.04)):
        on_val = facts({**p, "fitted_on": "data/split/val"})
        said = s.statement(on_val)
        assert any(line.startswith("Caveat: val picked the training epoch and then fitted") and
                   "higher than stated" in line for line in said)


def test_58_of_58_test_persons_is_not_shown_not_not_met_and_stated_as_counts():
    f = facts(point(), figures(58, 0, pictures=39))
    assert (f["target_verdict"], f["target_met"], f["test_pictures_to_show"]) == (
        "not shown", False, 299)
    said = " ".join(s.statement(f))
    assert "On test, 58 of 58 test persons (in 39 pictures) raised the alarm, and 0 of 98 " \
           "animals and objects did." in said
    assert "With 95 % confidence (counted over pictures) the recall on new persons is at " \
           f"least {math.floor(0.05 ** (1 / 39) * 1e4) / 1e4:g}" in said
    assert ("The target of 0.99 is not shown: 39 test pictures with persons can show at most "
            "0.926 with 95 % confidence; showing 0.99 needs 299 pictures with persons, none "
            "missed.") in said
    assert "not met" not in said and "of 100 people" not in said
    older = " ".join(s.statement(facts(point(), figures(58, 0))))  # no picture counts
    assert ("The target of 0.99 is not shown: 58 test persons can show at most 0.9496 with 95 % "
            "confidence; showing 0.99 needs 299, none missed.") in older


def test_persons_to_show_is_the_fewest_whose_bound_reaches_the_target():
    for target in (0.9, 0.95, 0.99, 0.999):
        n = s.persons_to_show(target)
        assert g.lower_bound(n, n) >= target > g.lower_bound(n - 1, n - 1)
    assert s.persons_to_show(0.99) == 299 and s.persons_to_show(1.0) is None


def test_not_met_only_when_the_upper_bound_is_below_the_target():
    missed = facts(point(), figures(400, 12))  # upper bound 0.9827 < 0.99
    assert missed["target_verdict"] == "not met"
    assert "The target of 0.99 is not met: with 95 % confidence the recall is at most 0.9827." \
        in s.statement(missed)
    between = facts(point(), figures(400, 3))  # 0.9807 .. 0.9979: the sample cannot decide
    assert between["target_verdict"] == "not shown"
    assert ("not shown: 3 of 400 test persons were missed, so the lower bound 0.9807 is below "
            "it and the upper bound above it; more test persons decide.") in " ".join(
        s.statement(between))
    pictures = facts(point(), {**figures(400, 12), "person_pictures": 400,
                               "person_pictures_missed": 1, "non_person_pictures": 60,
                               "false_alarm_pictures": 0})
    assert pictures["target_verdict"] == "not shown"  # 399 of 400 pictures: 0.9884 .. 1
    assert ("not shown: 1 of 400 test pictures with persons had a person missed, so the lower "
            "bound") in " ".join(s.statement(pictures))
    met = facts(point(), figures(1000, 2))
    assert (met["target_verdict"], met["target_met"]) == ("met", True)
    assert "The target of 0.99 is met with 95 % confidence." in s.statement(met)


def test_the_long_run_sentence_comes_from_the_binomial():
    said = s.statement(facts(point()))
    expected = round(100 * binom.sf(1, 100, 0.01))
    assert expected == 26
    assert said[-1] == ("A recall of 0.99 is a long-run rate, not a count per batch: at exactly "
                        f"0.99, a batch of 100 new persons misses 2 or more about {expected} % "
                        "of the time.")
    assert sum("long-run" in line for line in said) == 1
    assert s.long_run_sentence(0.95).endswith(
        f"misses 6 or more about {round(100 * binom.sf(5, 100, 0.05))} % of the time.")
    assert s.long_run_sentence(1.0) is None


@pytest.mark.parametrize("threshold", [0.62566, 0.1234, 0.5, 0.9874058464253939, 1e-9,
                                       0.99999, cal.probability(20.0), 0.3333333333333333])
def test_a_printed_threshold_copied_back_is_never_stricter(threshold):
    alarm = cal.log_odds(threshold)
    shown = s.threshold_digits(threshold, alarm)
    copied = cal.log_odds(float(shown))  # what predict --person-threshold does with it
    assert copied <= alarm and alarm - copied <= s.LOG_ODDS_SLACK
    assert s.threshold_text(threshold, alarm).split(" ")[0] == shown


def test_the_threshold_rounds_down_not_to_the_nearest():
    assert s.threshold_text(0.62566, cal.log_odds(0.62566)) == "0.6256"  # not 0.6257
    assert s.threshold_text(0.1234) == "0.1234"  # the float of 0.1234, already the alarm
    assert s.threshold_text(0.5) == "0.5"
    near = cal.probability(20.0)
    assert s.threshold_text(near, 20.0) == "0.999999997938 (log-odds 20.00)"


@pytest.mark.parametrize("change, why", [
    ({"test_person_recall_lower_95": 5},
     "test_person_recall_lower_95 5 is not a finite number from 0 to 1"),
    ({"expected_recall": float("nan")}, "expected_recall nan is not"),
    ({"chance_recall_below_target": -0.1}, "chance_recall_below_target -0.1 is not"),
    ({"false_alarms_per_1000_upper_95": 1500.0},
     "false_alarms_per_1000_upper_95 1500.0 is not"),
    ({"delta": 0.0}, "delta 0.0 is not a number in (0, 0.5]"),
    ({"target_recall": 0}, "target_recall 0 is not a number in (0, 1]"),
    ({"test_persons": 58.5}, "test_persons 58.5 is not a count"),
    ({"test_persons_missed": 59}, "test_persons_missed 59 exceeds test_persons 58"),
    ({"target_met": True}, "target_met True contradicts its lower bound 0.9496 against the "
                           "target 0.99"),
    ({"target_met": "yes"}, "target_met 'yes' is not true or false"),
    ({"target_verdict": "not met"}, "target_verdict 'not met' contradicts its upper bound 1.0"),
    ({"resolved": True}, "resolved True contradicts calibration_person_pictures 18 against 299 "
                         "needed"),
    ({"calibration_person_pictures": 30}, "calibration_person_pictures 30 exceeds "
                                          "calibration_persons 29"),
    ({"guarantee": "always"}, "guarantee 'always' is not one of none, average, probability"),
    ({"threshold": True}, "threshold True is not"),
])
def test_figures_out_of_range_or_contradicting_are_refused_in_one_line(change, why):
    bad = {**facts(point(), figures(58, 0)), **change}
    assert why in s.problem(bad) and "\n" not in s.problem(bad)
    with pytest.raises(s.InconsistentFigures) as err:
        s.statement(bad)
    assert why in str(err.value)


def test_an_older_eval_json_states_what_it_holds():
    """Without the point's figures (an eval.json of an older revision) the test part is still
    stated; without anything to state, nothing."""
    older = {k: v for k, v in facts(point(), figures(58, 0)).items()
             if k not in ("expected_recall", "chance_recall_below_target", "target_verdict",
                          "test_person_recall_upper_95", "resolved", "persons_needed",
                          "test_person_pictures")}
    said = " ".join(s.statement(older))
    assert said.startswith("On test, 58 of 58 test persons raised the alarm")
    assert "not shown" not in said and "not met" not in said  # target_met false alone: no verdict
    assert s.statement({"threshold": 0.5}) == []
    assert math.isclose(s.point_facts(OperatingPoint(temperature=1.0, **point()))[
        "threshold_log_odds"], 0.5)
