"""Calibrated scores and the person alarm: shared by calibrate (fits), evaluate (scores on test),
export (embeds in the ONNX file) and predict (answers).

Temperature scaling (Guo et al., 2017): one scalar T > 0 divides every logit before the softmax.
It keeps each picture's ranking of the classes (argmax, accuracy unchanged) and makes the top
probability mean what it says. T is fitted on the val split by minimising the negative
log-likelihood, a bounded 1-D search over log T in float64, so the same logits give the same T on
any machine.

The operating point: the person probability (after T) at or above which a picture raises the
alarm, chosen on val by the rule of stages.common.alarm.guarantee (how, and what each rule
promises: docs/stages.md, "The person alarm's operating point"). Persons come in pictures: the
crops of one source picture share its light and camera, so the rules, the bounds and the
bootstrap all count pictures, never crops as if independent (:func:`crop_pictures` reads which
picture each crop came from; guarantee.py says why each is valid). The comparison is made on the
person log-odds, log(p / (1 - p)) = z_person / T - logsumexp(z_others / T), computed from the
logits: a probability rounds to exactly 1.0 in float64 once the gap passes ~37 (a small T gets
there fast), and thresholds on such ties would lose all resolution. ``threshold_log_odds`` is
the alarm; ``threshold`` is its probability, for people to read, and a reader refuses a point
where the two disagree.

The operating point file (data/calibration/operating_point.json), its seal and the typed
record every reader gets from it are stages.common.alarm.point's.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from stages.common.alarm import guarantee
from stages.common.infra.errors import StageError

ECE_BINS = 15
# Search range for T: far outside anything a trained classifier needs (1-5 typically), so a
# fitted T at either end means the logits carry no usable information.
T_MIN, T_MAX = 0.05, 20.0
BOOTSTRAP_DRAWS = 200  # resamples for T's interval; how steady: temperature_interval


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` in float64."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def person_log_odds(logits: np.ndarray, temperature: float, person: int) -> np.ndarray:
    """log(p / (1 - p)) of the calibrated person probability p, without ever forming p."""
    z = np.asarray(logits, np.float64) / float(temperature)
    others = np.delete(z, person, axis=1)
    top = others.max(axis=1)
    return z[:, person] - (top + np.log(np.exp(others - top[:, None]).sum(axis=1)))


def log_odds(probability: float) -> float:
    """The log-odds of a probability threshold: 0 -> -inf (always), 1 -> +inf (never)."""
    with np.errstate(divide="ignore"):
        return float(np.log(probability) - np.log1p(-probability))


def probability(log_odds_value: float) -> float:
    """The logistic function: scipy.special.expit's formula and floats (tested), without
    scipy, which predict on the edge (requirements-edge.txt) has not."""
    try:
        e = math.exp(-float(log_odds_value))
    except OverflowError:  # below about -709: expit's 1 / (1 + inf)
        return 0.0
    return 1.0 / (1.0 + e)


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(z)), targets]))


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The T in [T_MIN, T_MAX] that minimises the NLL on (``logits``, ``targets``)."""
    from scipy.optimize import minimize_scalar  # here: scipy's start-up cost (see above)

    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets, np.int64)
    if len(logits) == 0:
        raise StageError("no val crops to fit the temperature on; check split.val in params.yaml")
    result = minimize_scalar(lambda log_t: nll(logits, targets, math.exp(log_t)),
                             bounds=(math.log(T_MIN), math.log(T_MAX)), method="bounded",
                             options={"xatol": 1e-6})
    return float(math.exp(result.x))


def temperature_interval(logits: np.ndarray, targets: np.ndarray, seed: int,
                         draws: int = BOOTSTRAP_DRAWS, confidence: float = 0.95,
                         pictures=None) -> dict:
    """A percentile bootstrap interval for T: T refitted on ``draws`` resamples (seeded, so the
    same val set gives the same interval) of the val **pictures** with replacement, each drawn
    picture bringing all its crops (a cluster bootstrap: crops of one picture are not
    independent, and resampling them one by one narrows the interval). ``pictures``: the
    picture of each crop (:func:`crop_pictures`); None makes every crop its own picture.

    How steady the ends are: at 200 draws a 2.5 % end rests on about 5 refits, so it moves
    with the seed. Measured on simulated val sets of the bundled sample's size (78 crops in 34
    pictures of 1 to 3 crops, logits drawn as tests/test_calibration.py's ``sampled`` does)
    over 100 seeds: with 9 to 11 errors the lower end varies by 5 to 7 % (standard deviation
    over mean), the upper by 2 % (1,000 draws, 30 seeds: 2 % and 0.8 %); with 3 errors the
    lower end is a resample without an error, anywhere from T_MIN up (:func:`interval_warnings`
    says so). Read the interval as T's rough uncertainty, not to the last digit."""
    logits = np.asarray(logits, np.float64)
    targets = np.asarray(targets, np.int64)
    codes = picture_codes(pictures, len(targets))
    order = np.argsort(codes, kind="stable")  # crops picture by picture
    sizes = np.bincount(codes)
    starts = np.cumsum(sizes) - sizes
    rng = np.random.default_rng(seed)
    fitted, flawless = [], 0
    for _ in range(draws):
        drawn = rng.integers(0, len(sizes), len(sizes))
        # the drawn pictures' crops, one after another: each run of positions starts at its
        # picture's first crop
        lens = sizes[drawn]
        rows = order[np.repeat(starts[drawn] - (np.cumsum(lens) - lens), lens)
                     + np.arange(lens.sum())]
        fitted.append(fit_temperature(logits[rows], targets[rows]))
        flawless += bool((logits[rows].argmax(axis=1) == targets[rows]).all())
    low, high = np.quantile(fitted, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"low": round(float(low), 4), "high": round(float(high), 4),
            "confidence": confidence, "draws": draws, "seed": seed,
            "resampled": "pictures", "pictures": len(sizes),
            # resamples without an error: there T runs to wherever the flat NLL stops it
            "draws_without_error": flawless}


def interval_warnings(interval: dict) -> list[str]:
    """One line when T's bootstrap interval reaches an end of T's search range: an end within
    10 % of it, or so many resamples without a single error (where the NLL only falls as T
    shrinks, so the refit stops wherever the flat NLL lets it, near T_MIN) that the lower
    percentile is one of them. That end is the search's, not the data's."""
    draws, flawless = interval.get("draws", 1), interval.get("draws_without_error", 0)
    # np.quantile's lower end lies at this position among the sorted refits
    lowest = (draws - 1) * (1 - interval.get("confidence", 0.95)) / 2
    if interval["low"] > T_MIN * 1.1 and interval["high"] < T_MAX * 0.9 and flawless <= lowest:
        return []
    return [f"warning: the temperature's 95 % bootstrap interval {interval['low']} to "
            f"{interval['high']} reaches an end of its search range ({T_MIN} to {T_MAX}): on "
            f"{flawless / max(draws, 1):.0%} of the resampled sets the model makes no "
            "error and T is not pinned down, so T is less certain than the interval reads; a "
            "larger val (split.val) or calibration split (split.calibration) narrows it"]


def temperature_warnings(temperature: float, logits: np.ndarray, targets: np.ndarray
                         ) -> list[str]:
    """Why a fitted T may not mean what it says, one line each: at (within 10 % of) an end of
    its search range the logits did not pin it down; with no val error at all the NLL only
    falls as T shrinks, so T says nothing about how wrong the model is when it is wrong."""
    lines = []
    if temperature <= T_MIN * 1.1 or temperature >= T_MAX * 0.9:
        lines.append(f"warning: the temperature {temperature:.4g} lies within 10 % of its "
                     f"search range's end ({T_MIN} to {T_MAX}); the val logits do not pin it "
                     "down, so calibrated probabilities are unreliable; check the model and "
                     "the val split")
    if len(targets) and (np.asarray(logits).argmax(axis=1) == np.asarray(targets)).all():
        lines.append(f"warning: the model makes no error on the {len(targets)} val crops, so "
                     "the temperature only sharpens and says nothing about its mistakes; a "
                     "larger val (split.val) or calibration split (split.calibration) fixes it")
    return lines


def brier(probs: np.ndarray, targets: np.ndarray) -> float:
    """Multi-class Brier score: mean over pictures of the squared distance between the
    probabilities and the one-hot truth (0 is perfect, 2 the worst)."""
    probs = np.asarray(probs, np.float64)
    truth = np.zeros_like(probs)
    truth[np.arange(len(probs)), np.asarray(targets)] = 1.0
    return float(np.mean(((probs - truth) ** 2).sum(axis=1)))


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: over ``bins`` equal-width bins of top-class confidence, the
    gap between accuracy and mean confidence, weighted by the share of pictures in the bin."""
    return float(sum(abs(acc - conf) * n for conf, acc, n in reliability(probs, targets, bins))
                 / max(len(targets), 1))


def reliability(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
                ) -> list[tuple[float, float, int]]:
    """(mean confidence, accuracy, count) of each non-empty bin, lowest confidence first.
    Bins are (k/bins, (k+1)/bins]; a confidence of exactly 0 falls in the first."""
    probs = np.asarray(probs, np.float64)
    confidence = probs.max(axis=1)
    correct = probs.argmax(axis=1) == np.asarray(targets)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for k in range(bins):
        inside = index == k
        n = int(inside.sum())
        if n:
            rows.append((float(confidence[inside].mean()), float(correct[inside].mean()), n))
    return rows


def picture_codes(pictures, crops: int) -> np.ndarray:
    """0 ... m - 1 for the m distinct pictures in ``pictures`` (one entry per crop), numbered in
    sorted order of their ids, so the same pictures give the same codes in any crop order;
    None: every crop its own picture (0 ... crops - 1)."""
    if pictures is None:
        return np.arange(crops)
    pictures = np.asarray(pictures)
    if len(pictures) != crops:
        raise ValueError(f"{len(pictures)} picture ids for {crops} crops")
    return np.unique(pictures, return_inverse=True)[1].reshape(-1)


def picture_minima(person_scores: np.ndarray, is_person: np.ndarray, pictures=None
                   ) -> np.ndarray:
    """Each picture's lowest person score, for the pictures that hold a person (in code order).
    The alarm catches every person of a picture exactly when it catches this one, so a rule on
    these minima speaks of pictures, which are independent where their crops are not
    (stages.common.alarm.guarantee, "Persons come in pictures")."""
    scores = np.asarray(person_scores, np.float64)
    is_person = np.asarray(is_person, bool)
    codes = picture_codes(pictures, len(scores))[is_person]
    present, codes = np.unique(codes, return_inverse=True)
    lowest = np.full(len(present), np.inf)
    np.minimum.at(lowest, codes.reshape(-1), scores[is_person])
    return lowest


def threshold_order(person_scores: np.ndarray, is_person: np.ndarray, target: float,
                    rule: str = "none", delta: float = 0.05, pictures=None
                    ) -> tuple[np.ndarray, int, bool]:
    """The lowest person score of each val picture with persons, highest first, the k whose
    k-th highest the threshold sits on, and whether ``rule`` resolved ``target`` over that
    many pictures (unresolved: k is every such picture, so every val person alarms).
    ``pictures``: each crop's picture (:func:`crop_pictures`); None: every crop its own."""
    is_person = np.asarray(is_person, bool)
    if not is_person.any():
        raise StageError("val holds no person crops, so no person threshold can be chosen; "
                         "check data.labels and split.val in params.yaml")
    scores = np.sort(picture_minima(person_scores, is_person, pictures))[::-1]
    k = guarantee.order_from_top(rule, len(scores), target, delta)
    return scores, (len(scores) if k is None else k), k is not None


def highest_threshold(person_scores: np.ndarray, is_person: np.ndarray, target: float,
                      rule: str = "none", delta: float = 0.05, pictures=None) -> float:
    """The highest threshold ``rule`` allows: the k-th highest of the val pictures' lowest
    person scores; for ``none``, k = ceil(target * pictures with persons), the highest at which
    at least ``target`` of them have every person caught (with one crop per picture: val
    recall >= ``target``)."""
    scores, k, _ = threshold_order(person_scores, is_person, target, rule, delta, pictures)
    return float(scores[k - 1])


def person_threshold(person_scores: np.ndarray, is_person: np.ndarray, target: float,
                     rule: str = "none", delta: float = 0.05, pictures=None) -> float:
    """The operating point on val scores: the rule's order statistic, with the fewest false
    alarms.

    Every threshold from just above the highest non-person score below
    :func:`highest_threshold` up to it gives that: the same false alarms, at least the same
    persons caught. Val cannot tell them apart, so the middle is taken (a margin on both sides,
    as a max-margin classifier does): the highest one sits on the last person val happened to
    hold, and a slightly less certain person on another day would go unnoticed. Lower than the
    order statistic only catches more persons, so every rule's guarantee still holds."""
    scores = np.asarray(person_scores, np.float64)
    is_person = np.asarray(is_person, bool)
    top = highest_threshold(scores, is_person, target, rule, delta, pictures)
    below = scores[~is_person & (scores < top)]
    return float((top + below.max()) / 2) if len(below) else top


def alarm_figures(person_scores: np.ndarray, is_person: np.ndarray, threshold: float,
                  pictures=None) -> dict:
    """What the alarm does at ``threshold`` on a labelled set: recall, precision, false alarms;
    and by picture (``pictures``: each crop's; None: every crop its own), the pictures with
    persons and those with a person missed, the pictures with non-persons and those with a
    false alarm (guarantee.alarm_bounds bounds the rates from these)."""
    alarm = np.asarray(person_scores) >= threshold
    is_person = np.asarray(is_person, bool)
    codes = picture_codes(pictures, len(alarm))
    persons, others = int(is_person.sum()), int((~is_person).sum())
    caught = int((alarm & is_person).sum())
    false_alarms = int((alarm & ~is_person).sum())
    raised = caught + false_alarms

    def count(where: np.ndarray) -> int:
        return len(np.unique(codes[where]))

    return {"persons": persons, "non_persons": others, "persons_missed": persons - caught,
            "false_alarms": false_alarms,
            "person_recall": round(caught / persons, 4) if persons else None,
            "person_precision": round(caught / raised, 4) if raised else None,
            "false_alarms_per_1000": round(1000 * false_alarms / others, 2) if others else None,
            "person_pictures": count(is_person),
            "person_pictures_missed": count(is_person & ~alarm),
            "non_person_pictures": count(~is_person),
            "false_alarm_pictures": count(~is_person & alarm)}


def crop_pictures(paths: list[str], manifest: Path) -> tuple[list[str], int]:
    """The source picture (ImageID) of each crop at ``paths``, from the split stage's manifest
    (columns ``crop``: <split>/<label>/<file>, and ``image_id``), and how many crops it does
    not list. A crop the manifest does not list (or every crop, without a manifest: a split
    made by hand) is its own picture: nothing says which others it shares a picture with, so
    it is taken as independent, and the caller says so. A manifest that cannot be read is
    refused in one line."""
    keys = ["/".join(Path(p).parts[-3:]) for p in paths]
    if not Path(manifest).is_file():
        return [f"crop:{k}" for k in keys], len(keys)
    try:
        with open(manifest, newline="", encoding="utf-8") as f:
            rows = csv.DictReader(f)
            if not {"crop", "image_id"} <= set(rows.fieldnames or ()):
                raise ValueError("no crop and image_id columns")
            known = {row["crop"]: row["image_id"] for row in rows}
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        raise StageError(f"{manifest}: cannot read which picture each crop came from ({exc}); "
                         "run `dvc repro split` again") from None
    # "crop:" cannot begin an ImageID (stages.common.pictures.openimages.SAFE_IMAGE_ID)
    ids = [known.get(k) or f"crop:{k}" for k in keys]
    return ids, sum(k not in known or not known[k] for k in keys)


def unlisted_line(unlisted: int, crops: int, manifest: Path) -> str | None:
    """One line when some crops have no known picture; None when every one has."""
    if not unlisted:
        return None
    return (f"warning: {manifest} does not list {unlisted} of the {crops} crops, so each of "
            "those counts as a picture of its own (taken as independent of the others); "
            "rerun `dvc repro split` to have it list them")
