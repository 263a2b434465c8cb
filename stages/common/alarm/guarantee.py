"""What the person alarm's threshold guarantees on new pictures, and with what confidence.

Pure numpy / scipy, no torch: the rules work on val person scores (any scores where higher means
"more person"; calibrate uses the person log-odds). Every rule puts the threshold on an order
statistic of the val person scores: the k-th highest (k = 1 is the highest). A picture raises the
alarm at score >= threshold, so a threshold on the k-th highest catches at least those k val
persons. Write n for the val persons, r = n + 1 - k for the same score counted from the lowest,
and a = 1 - target for the miss rate the operator accepts. (The rules run on one score per val
picture that holds persons, its lowest person score, and n counts those pictures: see "Persons
come in pictures" below; with one person per picture, as written here.)

The fact every rule rests on: if the person scores of val and of a new person are independent
draws of one continuous distribution F, the miss rate of the threshold S_(r) (the r-th lowest
val person score), F(S_(r)), is the r-th lowest of n uniform draws, so it is Beta(r, n + 1 - r).
Hence

  * its mean is r / (n + 1): the expected recall on new persons is k / (n + 1);
  * F(S_(r)) > a exactly when fewer than r of the n uniforms fall at or below a, so
    P(miss rate > a) = P(Binomial(n, a) <= r - 1) = binom.cdf(r - 1, n, a).

With ties (a discrete F), the miss rate P(S < t) is at most that of the continuous case, so
both statements stay true as bounds. A threshold placed lower than S_(r) (calibrate puts it
halfway to the next non-person below) catches at least as many persons: again only safer.

The rules (``calibrate.guarantee``):

``none``
    Reach the target on val itself: k = ceil(target * n), the highest threshold with val
    recall >= target (by picture: at least that share of val's pictures with persons have
    every person caught). No statement about new pictures: its expected recall k / (n + 1) can fall
    below the target (n = 25, target 0.9: 23 / 26 = 0.885). Resolved from 1 / (1 - target) val
    persons (with fewer, one miss already breaks the target).

``average`` (split-conformal, class-conditional)
    k = ceil((n + 1) * target): the expected recall on new persons k / (n + 1) is >= target,
    averaged over the val sets one could have drawn. Unresolvable while k > n, i.e. below
    n = target / (1 - target) persons (99 for 0.99). Any single val set may still land below.

``probability`` (Neyman-Pearson umbrella order statistic; Tong, Feng & Li 2018,
"Neyman-Pearson classification algorithms and NP receiver operating characteristics",
Science Advances 4(2), Proposition 1, with the roles of the classes swapped: their type I
error is our miss rate, their class-0 scores our person scores negated)
    The largest r (the highest threshold, so the fewest false alarms, since false alarms can
    only fall as the threshold rises) with P(miss rate > a) = binom.cdf(r - 1, n, a) <= delta:
    with probability at least 1 - delta over the draw of val, the recall on new persons is
    >= target. The probability grows with r, so the largest admissible r is found by a scan.
    The smallest r = 1 (the lowest val person) has P = (1 - a)^n = target^n, so the rule is
    unresolvable while target^n > delta: n >= log(delta) / log(target) persons are needed
    (299 for target 0.99, delta 0.05; 59 for 0.95).

Where a rule is unresolvable, every val person must raise the alarm (k = n), and the point
says ``resolved: false``.

Persons come in pictures. The crops of one source picture share its light, camera and scene, so
their scores are correlated, and the n person crops are not n independent draws: with a
picture-level correlation of 0.6 the ``probability`` rule, run on crops, misses its target in
0.07 to 0.095 of draws at delta 0.05 (tests/test_guarantee.py simulates 1 to 5 persons a
picture). What is independent is the pictures (split.py keeps each whole in one split). So every
rule runs on one score per val picture that holds persons: the **lowest** person score in it
(calibration.picture_minima), and n above is the number of such pictures (``persons_needed``
counts pictures with persons). Why that is valid: with pictures i.i.d., the pictures' minima are
i.i.d. draws of one distribution G, and everything above holds for G: with probability at least
1 - delta, a new picture has **every** person in it raise the alarm with probability >= target
(the alarm catches all its persons exactly when it catches the lowest). That is at least the
recall of a person picked in a new picture in any way (a person is missed only where the
picture's lowest is), so it is the promise for a new person, and it holds whatever the
correlation inside a picture. It is conservative (pictures with several persons make G lower
than a single person's score) but needs no randomness, so the same val set gives the same
threshold; drawing one person per picture at random would be exact for "a random person of a new
picture" (the subsampling method of Dunn, Wasserman & Ramdas 2022, "Distribution-free prediction
sets for two-layer hierarchical models") but would make the threshold depend on the draw.
Counted over all persons rather than pictures (a crowded picture weighing more), the promise
still holds when a person's chance of being missed does not grow with the number of persons in
the picture. A crop whose picture is not known counts as its own picture (taken as independent).
With one person per picture all this is the rule above exactly.

Clopper-Pearson bounds: exact one-sided binomial bounds (scipy.stats.beta quantiles) over
pictures, for the same reason: of the n pictures with persons, x have every person caught (a
lower bound of the chance a new picture has all its persons caught, so of a new person's
recall); of the n pictures with non-persons, x have at least one false alarm (an upper bound of
the chance a new picture raises any, so of the false-alarm rate of a non-person in it). Why not
the alternatives: a design-effect correction needs the within-picture correlation, estimated
from the same few dozen pictures, and a cluster bootstrap collapses to [1, 1] when every person
is caught; counting pictures is exact with no estimate, at the price of treating a picture with
one miss like a picture with all missed. With one crop per picture these are the per-crop
bounds. At the stated confidence the true rate is >= the lower bound, <= the upper bound.
"""
from __future__ import annotations

import math

# scipy.stats is imported inside the functions that use it: a second of start-up that params.py
# and predict (which import this module through calibration) never need.

RULES = ("none", "average", "probability")
CONFIDENCE = 0.95  # the one-sided confidence of every bound shown to an operator
EPS = 1e-9  # 0.99 * 100 is 99.00000000000001 in floats; a ceiling must not turn it into 100


def lower_bound(successes: int, trials: int, confidence: float = CONFIDENCE) -> float | None:
    """One-sided Clopper-Pearson lower bound of a proportion; None without trials."""
    from scipy.stats import beta

    if trials <= 0:
        return None
    if successes <= 0:
        return 0.0
    return float(beta.ppf(1 - confidence, successes, trials - successes + 1))


def upper_bound(successes: int, trials: int, confidence: float = CONFIDENCE) -> float | None:
    """One-sided Clopper-Pearson upper bound of a proportion; None without trials."""
    from scipy.stats import beta

    if trials <= 0:
        return None
    if successes >= trials:
        return 1.0
    return float(beta.ppf(confidence, successes + 1, trials - successes))


def order_from_top(rule: str, persons: int, target: float, delta: float) -> int | None:
    """k: the threshold sits on the k-th highest of ``persons`` val scores, one per picture
    with persons (its lowest person score); None when ``rule`` cannot be resolved with that
    many (see the module docstring)."""
    from scipy.stats import binom

    n = int(persons)
    if n <= 0:
        return None
    if rule == "none":
        return max(1, math.ceil(target * n - EPS)) if n >= _none_needed(target) else None
    if rule == "average":
        k = max(1, math.ceil((n + 1) * target - EPS))
        return k if k <= n else None
    if rule == "probability":
        if target >= 1:
            return None
        a = 1.0 - target
        # binom.cdf(r - 1, n, a) rises with r; the scan stops at the first r that exceeds delta.
        r = 0
        while r < n and binom.cdf(r, n, a) <= delta:
            r += 1
        return n + 1 - r if r >= 1 else None
    raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")


def _none_needed(target: float) -> int:
    return 1 if target >= 1 else math.ceil(1 / (1 - target) - EPS)


def persons_needed(rule: str, target: float, delta: float) -> int | None:
    """The fewest val pictures with persons with which ``rule`` resolves ``target`` (with one
    person per picture, persons); None when no number does (a recall of 1 is never guaranteed
    on new persons)."""
    if rule == "none":
        return _none_needed(target)
    if target >= 1:
        return None
    if rule == "average":
        guess = math.ceil(target / (1 - target) - EPS)
    elif rule == "probability":
        guess = math.ceil(math.log(delta) / math.log(target) - EPS)
    else:
        raise ValueError(f"unknown rule {rule!r}; expected one of {', '.join(RULES)}")
    # The closed forms are exact in reals; the rule itself decides at the float boundary.
    n = max(1, guess - 2)
    while order_from_top(rule, n, target, delta) is None:
        n += 1
    return n


def assurance(persons: int, k: int, target: float) -> dict:
    """What a threshold on the k-th highest of ``persons`` val scores (one per picture with
    persons, its lowest) promises on new persons, whatever rule chose k: the expected recall and
    the chance the recall is below ``target`` (both bounds when the threshold sits lower than
    that score, and bounds again because they speak of a new picture's every person)."""
    from scipy.stats import binom

    n, r = int(persons), int(persons) + 1 - int(k)
    chance = float(binom.cdf(r - 1, n, 1.0 - target)) if target < 1 else 1.0
    return {"order_statistic": int(k), "expected_recall": round(k / (n + 1), 4),
            "chance_recall_below_target": _up(chance, 4)}


def alarm_bounds(figures: dict, target: float | None = None) -> dict:
    """One-sided 95 % Clopper-Pearson bounds of an alarm's figures
    (stages.common.alarm.calibration.alarm_figures), counted over pictures (see the module
    docstring; figures without picture counts make every crop its own picture): the lowest
    person recall and the most false alarms per 1,000 non-persons; with ``target``, whether the
    lowest recall reaches it. Rounded outwards, so a shown bound never promises more than the
    exact one."""
    persons = figures.get("person_pictures", figures["persons"])
    missed = figures.get("person_pictures_missed", figures["persons_missed"])
    others = figures.get("non_person_pictures", figures["non_persons"])
    raised = figures.get("false_alarm_pictures", figures["false_alarms"])
    recall = lower_bound(persons - missed, persons)
    false_rate = upper_bound(raised, others)
    out = {"person_recall_lower_95": None if recall is None else _down(recall, 4),
           "false_alarms_per_1000_upper_95":
               None if false_rate is None else _up(1000 * false_rate, 2)}
    if target is not None:
        out["target_met"] = recall is not None and recall >= target
    return out


def _down(value: float, digits: int) -> float:
    scale = 10 ** digits
    return math.floor(value * scale + EPS) / scale


def _up(value: float, digits: int) -> float:
    scale = 10 ** digits
    return math.ceil(value * scale - EPS) / scale
