"""The person alarm on one labelled set at a sealed operating point, in the figures evaluate
states for test (stages.common.alarm.statement.tested_facts, one place): shared by the
conditions stage (the test split clean and under each camera condition) and accept (a site's own
labelled crops), so both give the same figures, bounds and verdict.
"""
from __future__ import annotations

import numpy as np

from stages.common.alarm.calibration import alarm_figures, person_log_odds
from stages.common.alarm.statement import tested_facts
from stages.common.config.labels import ALARM_LABEL


def alarm_under(logits: np.ndarray, targets: np.ndarray, classes: list[str], point: dict,
                pictures=None) -> dict:
    """Accuracy and the alarm at ``point`` on one labelled set, as evaluate states it on test
    (stages.common.alarm.statement.tested_facts, one place): person recall with its one-sided
    95 % Clopper-Pearson bounds, false alarms per 1,000 with the upper bound (over ``pictures``,
    each crop's source picture; None: every crop its own), ``target_met`` (the lower bound
    reaches the point's target) and the verdict met / not shown / not met."""
    targets = np.asarray(targets)
    person = classes.index(ALARM_LABEL)
    alarm = alarm_figures(person_log_odds(logits, point["temperature"], person),
                          targets == person, point["threshold_log_odds"], pictures)
    facts = tested_facts(alarm, point["target_recall"])
    accuracy = float((np.asarray(logits).argmax(1) == targets).mean())
    return {"accuracy": round(accuracy, 4), "error": round(1 - accuracy, 4),
            "person_recall": facts["test_person_recall"],
            "person_recall_lower_95": facts["test_person_recall_lower_95"],
            "person_recall_upper_95": facts["test_person_recall_upper_95"],
            "false_alarms_per_1000": facts["false_alarms_per_1000"],
            "false_alarms_per_1000_upper_95": facts["false_alarms_per_1000_upper_95"],
            "target_met": facts["target_met"], "target_verdict": facts["target_verdict"],
            "pictures_to_show": facts["test_pictures_to_show"],
            "persons": alarm["persons"], "persons_missed": alarm["persons_missed"],
            "non_persons": alarm["non_persons"], "false_alarms": alarm["false_alarms"],
            "person_pictures": alarm["person_pictures"],
            "person_pictures_missed": alarm["person_pictures_missed"]}


def raised(logits: np.ndarray, classes: list[str], point: dict) -> np.ndarray:
    """Which crops raise the alarm at ``point``: their calibrated person log-odds reach the
    threshold, the comparison alarm_figures makes, so the crops named as missed are exactly
    those :func:`alarm_under` counts."""
    scores = person_log_odds(logits, point["temperature"], classes.index(ALARM_LABEL))
    return np.asarray(scores) >= point["threshold_log_odds"]
