"""What the person alarm's operating point gives, in an operator's words and numbers: the one
statement calibrate prints, evaluate prints and records in metrics/eval.json, the model card and
the report show (README and docs/stages.md explain it).

Two steps, so every reader says the same from the same figures:
  * :func:`point_facts` and :func:`tested_facts`: the flat figures (what eval.json's
    ``operating_point`` holds): from the point, the expected recall on new persons, the chance it
    falls below the target, the pictures with persons the rule needs and how many persons (in
    how many pictures) the calibration split had; from a labelled set (test), the counts, the
    one-sided 95 % Clopper-Pearson bounds (over pictures, as stages.common.alarm.guarantee
    counts them) and the verdict ``met`` / ``not shown`` (too few pictures, or bounds on both
    sides of the target) / ``not met`` (the upper bound is below it);
  * :func:`statement`: those figures, range-checked first (:func:`problem`: a bound of 5, a
    ``target_met`` its bound contradicts), as sentences. A figure a reader lacks (an older
    eval.json) leaves its sentence out; a figure out of range is refused in one line.

Numbers are never rounded towards a better promise: a lower bound rounds down, an upper bound
and a chance of failure up, and a threshold down (:func:`threshold_text`), so copied into
``--person-threshold`` it catches every person the point catches. Counts are stated as counts
(58 of 58 test persons), never as "of 100".
"""
from __future__ import annotations

import math
from decimal import ROUND_FLOOR, Decimal
from typing import TYPE_CHECKING

from stages.common.alarm import guarantee

if TYPE_CHECKING:  # the record is built where a point is read: stages.common.alarm.point
    from stages.common.alarm.point import OperatingPoint

VERDICTS = ("met", "not shown", "not met")
UNRESOLVED = "Unresolved: "  # how the statement of a point with too few persons begins
VAL_SPLIT_NAME = "val"  # the last part of calibrate's fitted_on when split.calibration is 0
BATCH = 100  # the batch of new persons the long-run sentence speaks of
# A printed probability threshold is at most this far below the alarm's log-odds: copied back,
# it can only catch more (a score that close to the threshold is a coin toss anyway).
LOG_ODDS_SLACK = 1e-3


class InconsistentFigures(ValueError):
    """Figures that cannot be put into words: out of range, or contradicting one another."""


# ----- numbers as they are printed ---------------------------------------------------------------

def _floor(value: float, digits: int) -> Decimal:
    return Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_FLOOR)


def _log_odds(probability: float) -> float:
    if probability <= 0:
        return -math.inf
    if probability >= 1:
        return math.inf
    return math.log(probability) - math.log1p(-probability)


def threshold_digits(threshold: float, threshold_log_odds: float | None = None) -> str:
    """The probability threshold as a decimal a person can copy into ``--person-threshold``:
    rounded DOWN, with the fewest digits (at least 4 decimals) whose log-odds lie within
    LOG_ODDS_SLACK below the alarm's, so the copied alarm raises for every picture the point's
    does. ``threshold_log_odds``: the alarm itself (default: that of ``threshold``)."""
    alarm = _log_odds(threshold) if threshold_log_odds is None else threshold_log_odds
    closest = (threshold, math.nextafter(threshold, 0.0))  # no decimal gets nearer than these
    for digits in range(4, 60):
        # the nearest decimal when its float is no stricter (0.1234 is a hair below 0.1234 as
        # a float, so its floor would print 0.1233), else the one below
        shown = round(Decimal(threshold), digits)
        if _log_odds(float(shown)) > alarm:
            shown = _floor(threshold, digits)
        if _log_odds(float(shown)) > alarm:  # the float of the decimal rounds up past the alarm
            shown -= Decimal(1).scaleb(-digits)
        if alarm - _log_odds(float(shown)) <= LOG_ODDS_SLACK or float(shown) in closest:
            break
    return format(shown.normalize(), "f")


def threshold_text(threshold: float, threshold_log_odds: float | None = None) -> str:
    """A threshold as people read and copy it (:func:`threshold_digits`); from 0.999 on, the
    alarm's log-odds too (a probability that close to 1 hides how strict it is)."""
    shown = threshold_digits(threshold, threshold_log_odds)
    if threshold < 0.999:
        return shown
    alarm = _log_odds(threshold) if threshold_log_odds is None else threshold_log_odds
    return f"{shown} (log-odds {alarm:.2f})"


def _down(value: float, digits: int = 4) -> str:
    return f"{math.floor(value * 10 ** digits + guarantee.EPS) / 10 ** digits:g}"


def _up(value: float, digits: int = 4) -> str:
    return f"{math.ceil(value * 10 ** digits - guarantee.EPS) / 10 ** digits:g}"


def _percent(value: float) -> str:
    """A share as a percentage with one decimal, rounded down (it is a promise)."""
    return f"{math.floor(value * 1000 + guarantee.EPS) / 10:g} %"


# ----- the figures -------------------------------------------------------------------------------

def persons_to_show(target: float, confidence: float = guarantee.CONFIDENCE) -> int | None:
    """The fewest trials, none failed (pictures with persons, none with a person missed: the
    bounds count pictures), whose one-sided Clopper-Pearson lower bound reaches ``target`` (299
    for 0.99); None for a target of 1, which no sample shows."""
    if target >= 1:
        return None
    n = max(1, math.ceil(math.log(1 - confidence) / math.log(target)) - 2)
    while guarantee.lower_bound(n, n, confidence) < target:
        n += 1
    return n


def point_facts(point: OperatingPoint) -> dict:
    """The point's part of the statement: its rule and threshold, where it was fitted, and what
    it gives new persons (calibrate's ``val`` figures, whichever split it was fitted on)."""
    val = point.val
    facts = {"threshold": point.threshold, "threshold_log_odds": point.threshold_log_odds,
             "target_recall": point.target_recall}
    facts.update({key: value for key, value in (("guarantee", point.guarantee),
                                                ("delta", point.delta),
                                                ("fitted_on", point.fitted_on))
                  if value is not None})
    for key, name in (("resolved", "resolved"), ("persons", "calibration_persons"),
                      ("person_pictures", "calibration_person_pictures"),
                      ("persons_needed", "persons_needed"),
                      ("expected_recall", "expected_recall"),
                      ("chance_recall_below_target", "chance_recall_below_target")):
        if key in val:
            facts[name] = val[key]
    return facts


def tested_facts(figures: dict, target: float) -> dict:
    """A labelled set's part (stages.common.alarm.calibration.alarm_figures on test): counts of
    crops and of source pictures, one-sided 95 % bounds (over pictures, as
    guarantee.alarm_bounds counts them; figures without picture counts make every crop its own
    picture) and the verdict: ``met`` when the lower bound of recall reaches ``target``, ``not
    met`` when the upper bound lies below it, ``not shown`` otherwise."""
    pictures = figures.get("person_pictures", figures["persons"])
    pictures_missed = figures.get("person_pictures_missed", figures["persons_missed"])
    bounds = guarantee.alarm_bounds(figures, target)
    upper = guarantee.upper_bound(pictures - pictures_missed, pictures)
    upper = None if upper is None else math.ceil(upper * 1e4 - guarantee.EPS) / 1e4
    if bounds["target_met"]:
        verdict = "met"
    elif upper is not None and upper < target:
        verdict = "not met"
    else:
        verdict = "not shown"
    by_picture = {f"test_{key}": figures[key] for key in (
        "person_pictures", "person_pictures_missed", "non_person_pictures",
        "false_alarm_pictures") if key in figures}
    return {"test_persons": figures["persons"], "test_non_persons": figures["non_persons"],
            "test_persons_missed": figures["persons_missed"],
            "test_false_alarms": figures["false_alarms"], **by_picture,
            "test_person_recall": figures["person_recall"],
            "test_person_precision": figures["person_precision"],
            "false_alarms_per_1000": figures["false_alarms_per_1000"],
            "test_person_recall_lower_95": bounds["person_recall_lower_95"],
            "test_person_recall_upper_95": upper,
            "false_alarms_per_1000_upper_95": bounds["false_alarms_per_1000_upper_95"],
            "target_met": bounds["target_met"], "target_verdict": verdict,
            "test_pictures_to_show": persons_to_show(target)}


# ----- range checks ------------------------------------------------------------------------------

def _number(value, low: float, high: float) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10 ** 12


SHARES = ("threshold", "expected_recall", "chance_recall_below_target", "test_person_recall",
          "test_person_precision", "test_person_recall_lower_95", "test_person_recall_upper_95")
RATES = ("false_alarms_per_1000", "false_alarms_per_1000_upper_95")
COUNTS = ("calibration_persons", "calibration_person_pictures", "test_persons",
          "test_non_persons", "test_persons_missed", "test_false_alarms", "test_person_pictures",
          "test_person_pictures_missed", "test_non_person_pictures", "test_false_alarm_pictures")


def problem(facts: dict) -> str | None:
    """Why ``facts`` cannot be stated (one line), or None. A key it lacks is no problem (an
    older eval.json); one out of range, of the wrong type or contradicting another is."""
    def bad(key: str, why: str) -> str:
        return f"{key} {facts[key]!r} {why}"

    for key in SHARES:  # None: a share of nothing (no persons on test, say); not a threshold
        if key in facts and (facts[key] is not None or key == "threshold") \
                and not _number(facts[key], 0.0, 1.0):
            return bad(key, "is not a finite number from 0 to 1")
    for key in RATES:
        if key in facts and facts[key] is not None and not _number(facts[key], 0.0, 1000.0):
            return bad(key, "is not a finite number from 0 to 1,000")
    for key in COUNTS:
        if key in facts and not _count(facts[key]):
            return bad(key, "is not a count")
    if "threshold_log_odds" in facts and not _number(facts["threshold_log_odds"], -1e6, 1e6):
        return bad("threshold_log_odds", "is not a finite number")
    if "target_recall" in facts and (not _number(facts["target_recall"], 0.0, 1.0)
                                     or facts["target_recall"] == 0):
        return bad("target_recall", "is not a number in (0, 1]")
    if "delta" in facts and facts["delta"] is not None and not (
            _number(facts["delta"], 0, 0.5) and facts["delta"] > 0):
        return bad("delta", "is not a number in (0, 0.5]")
    if "guarantee" in facts and facts["guarantee"] not in guarantee.RULES:
        return bad("guarantee", f"is not one of {', '.join(guarantee.RULES)}")
    for key in ("resolved", "target_met"):
        if key in facts and facts[key] is not None and not isinstance(facts[key], bool):
            return bad(key, "is not true or false")
    needed = facts.get("persons_needed")
    if needed is not None and not (_count(needed) and needed >= 1):
        return bad("persons_needed", "is not a count of at least 1")
    if "target_verdict" in facts and facts["target_verdict"] not in VERDICTS:
        return bad("target_verdict", f"is not one of {', '.join(VERDICTS)}")
    return _contradiction(facts)


def _contradiction(facts: dict) -> str | None:
    """Figures that are each in range but cannot all be true."""
    f = facts
    held = "calibration_person_pictures" if "calibration_person_pictures" in f \
        else "calibration_persons"  # an older point counted persons
    if all(isinstance(f.get(k), int) for k in (held, "persons_needed")) \
            and isinstance(f.get("resolved"), bool) \
            and f["resolved"] != (f[held] >= f["persons_needed"]):
        return (f"resolved {f['resolved']} contradicts {held} {f[held]} against "
                f"{f['persons_needed']} needed")
    for part, whole in (("test_persons_missed", "test_persons"),
                        ("test_person_pictures_missed", "test_person_pictures"),
                        ("test_person_pictures", "test_persons"),
                        ("test_false_alarm_pictures", "test_non_person_pictures"),
                        ("calibration_person_pictures", "calibration_persons")):
        if _count(f.get(part)) and _count(f.get(whole)) and f[part] > f[whole]:
            return f"{part} {f[part]} exceeds {whole} {f[whole]}"
    lower, upper = f.get("test_person_recall_lower_95"), f.get("test_person_recall_upper_95")
    # the bounds bracket the share they are computed from: pictures with every person caught
    # (an older eval.json: persons caught)
    trials, failed, seen = ("test_person_pictures", "test_person_pictures_missed",
                            "pictures with every person caught") \
        if "test_person_pictures" in f else ("test_persons", "test_persons_missed",
                                             "test recall")
    if _count(f.get(trials)) and _count(f.get(failed)) and f[trials]:
        share = (f[trials] - f[failed]) / f[trials]
        if _number(lower, 0, 1) and lower > share:
            return f"test_person_recall_lower_95 {lower!r} exceeds the {seen}, {share:.4g}"
        if _number(upper, 0, 1) and upper < share:
            return f"test_person_recall_upper_95 {upper!r} is below the {seen}, {share:.4g}"
    target = f.get("target_recall")
    if isinstance(f.get("target_met"), bool) and _number(lower, 0, 1) and _number(target, 0, 1) \
            and f["target_met"] != (lower >= target):
        return (f"target_met {f['target_met']} contradicts its lower bound {lower!r} against "
                f"the target {target!r}")
    verdict = f.get("target_verdict")
    if verdict is not None and isinstance(f.get("target_met"), bool) \
            and (verdict == "met") != f["target_met"]:
        return f"target_verdict {verdict!r} contradicts target_met {f['target_met']}"
    if verdict == "not met" and _number(upper, 0, 1) and _number(target, 0, 1) and upper >= target:
        return f"target_verdict 'not met' contradicts its upper bound {upper!r} >= {target!r}"
    return None


# ----- the sentences -----------------------------------------------------------------------------

def _fitted_on_val(facts: dict) -> bool:
    fitted = facts.get("fitted_on")
    return isinstance(fitted, str) and fitted.replace("\\", "/").rstrip("/").split("/")[-1] \
        == VAL_SPLIT_NAME


def _persons(n: int) -> str:
    return f"{n:,} person" + ("" if n == 1 else "s")


def _pictures(n: int) -> str:
    return f"{n:,} picture" + ("" if n == 1 else "s")


def point_parts(f: dict) -> dict[str, str]:
    """What the point gives new persons, by part: ``resolution`` (how many persons the split
    held against the rule's need; "Unresolved: ..." when too few), ``gives`` (expected recall,
    chance below target) and, when val fitted it, ``caveat``. {} when the facts hold none of it."""
    if "target_recall" not in f or "expected_recall" not in f:
        return {}
    target, rule = f["target_recall"], f.get("guarantee", "?")
    where = f.get("fitted_on") or "the calibration split"
    had, needed = f.get("calibration_persons"), f.get("persons_needed")
    pictures = f.get("calibration_person_pictures")
    held = f"{where} holds {_persons(had)}" if had is not None else where
    if had is not None and pictures is not None:
        held += f" in {_pictures(pictures)}"
    counted = " pictures with persons" if pictures is not None else ""
    need = (f"calibrate.guarantee {rule} needs {needed:,}{counted}" if needed is not None
            else f"calibrate.guarantee {rule} can never resolve it")
    if f.get("resolved") is False:
        resolution = (f"{UNRESOLVED}{held}, but {need} for a recall target of {target}, so "
                      "every one of them raises the alarm, and that does not give the target.")
    else:
        resolution = f"Resolved: {held}; {need} for a recall target of {target}."
    expected, chance = f["expected_recall"], f.get("chance_recall_below_target")
    gives = (f"New persons are caught {_percent(expected)} of the time on average (expected "
             f"recall {_down(expected)})")
    if chance is not None:
        gives += f", and the chance that their recall falls below {target} is {_up(chance)}"
        if rule == "probability" and f.get("resolved") and f.get("delta") is not None:
            gives += f" (calibrate.delta {f['delta']:g})"
    parts = {"resolution": resolution, "gives": gives + "."}
    if _fitted_on_val(f):
        parts["caveat"] = ("Caveat: val picked the training epoch and then fitted this "
                           "threshold (split.calibration: 0), so the chance of falling below "
                           "the target is higher than stated.")
    return parts


def point_sentences(f: dict) -> list[str]:
    return list(point_parts(f).values())


def long_run_sentence(target: float) -> str | None:
    """Once, in operator words: a recall is a long-run rate, not a count per batch."""
    from scipy.stats import binom  # here: scipy's start-up second, for this sentence alone

    if not 0 < target < 1:
        return None
    allowed = math.floor(BATCH * (1 - target) + guarantee.EPS)
    chance = float(binom.sf(allowed, BATCH, 1 - target))
    return (f"A recall of {target} is a long-run rate, not a count per batch: at exactly "
            f"{target}, a batch of {BATCH} new persons misses {allowed + 1} or more about "
            f"{round(100 * chance):g} % of the time.")


def tested_sentences(f: dict) -> list[str]:
    """What the labelled set (test) showed, counts as counts; [] without its figures."""
    if "test_persons" not in f or "test_persons_missed" not in f:
        return []
    persons, missed = f["test_persons"], f["test_persons_missed"]
    out = f"On test, {persons - missed:,} of {persons:,} test persons"
    if "test_person_pictures" in f:
        out += f" (in {_pictures(f['test_person_pictures'])})"
    out += " raised the alarm"
    if "test_false_alarms" in f and "test_non_persons" in f:
        out += (f", and {f['test_false_alarms']:,} of {f['test_non_persons']:,} animals and "
                "objects did")
    said = [out + "."]
    lower, upper_rate = f.get("test_person_recall_lower_95"), f.get(
        "false_alarms_per_1000_upper_95")
    if lower is not None:
        over = " (counted over pictures)" if "test_person_pictures" in f else ""
        bound = (f"With 95 % confidence{over} the recall on new persons is at least "
                 f"{_down(lower)}")
        if upper_rate is not None:
            bound += f" and false alarms at most {_up(upper_rate, 2)} per 1,000 animals and objects"
        said.append(bound + ".")
    verdict = _verdict(f)
    if verdict:
        said.append(verdict)
    return said


def _verdict(f: dict) -> str | None:
    target, lower = f.get("target_recall"), f.get("test_person_recall_lower_95")
    verdict = f.get("target_verdict")
    if verdict is None and isinstance(f.get("target_met"), bool):
        verdict = "met" if f["target_met"] else None  # an older eval.json: no "not met" claim
    if target is None or verdict is None:
        return None
    if verdict == "met":
        return f"The target of {target} is met with 95 % confidence."
    if verdict == "not met":
        upper = f.get("test_person_recall_upper_95")
        return (f"The target of {target} is not met: with 95 % confidence the recall is at "
                f"most {_up(upper)}.")
    # the bounds count pictures with persons (an older eval.json: persons)
    by_picture = "test_person_pictures" in f
    trials = f["test_person_pictures"] if by_picture else f["test_persons"]
    failed = f["test_person_pictures_missed"] if by_picture else f["test_persons_missed"]
    unit = "test pictures with persons" if by_picture else "test persons"
    needed = f.get("test_pictures_to_show", f.get("test_persons_to_show"))
    if not trials:
        return f"The target of {target} is not shown: test holds no persons."
    if guarantee.lower_bound(trials, trials) < target:  # too few to show it, even all caught
        best = _down(guarantee.lower_bound(trials, trials))
        need = (f"showing {target} needs {needed:,}" + (" pictures with persons" if by_picture
                                                         else "") + ", none missed"
                if needed else f"no sample shows {target}")
        return (f"The target of {target} is not shown: {trials:,} {unit} can show at most "
                f"{best} with 95 % confidence; {need}.")
    missed = (f"{failed:,} of {trials:,} test pictures with persons had a person missed"
              if by_picture else f"{failed:,} of {trials:,} test persons were missed")
    more = "pictures" if by_picture else "persons"
    return (f"The target of {target} is not shown: {missed}, so the lower bound {_down(lower)} "
            f"is below it and the upper bound above it; more test {more} decide.")


def statement(facts: dict, *, long_run: bool = True) -> list[str]:
    """The alarm's statement: what the point gives new persons (and the caveat when val fitted
    it), what test showed and whether that shows the target, and once the long-run sentence.
    Raises InconsistentFigures (one line) for figures out of range or contradicting."""
    why = problem(facts)
    if why:
        raise InconsistentFigures(why)
    out = point_sentences(facts) + tested_sentences(facts)
    if long_run and out and _number(facts.get("target_recall"), 0, 1):
        line = long_run_sentence(facts["target_recall"])
        if line:
            out.append(line)
    return out


ASSUMPTION = ("The promise holds for new persons exchangeable with the calibration persons "
              "(the same cameras, the same crop rules); other cameras need their own "
              "calibration.")
