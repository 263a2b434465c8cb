"""The person alarm's operating point as one typed record (:class:`OperatingPoint`), and the one
place its file (data/calibration/operating_point.json, or the copy inside an ONNX file) is
sealed, read and checked. calibrate writes it; evaluate, conditions, export, predict and review
read it only through :func:`read_operating_point`, :func:`operating_point_for`, :func:`beside`
or :meth:`OperatingPoint.parse`, and use its attributes, never the file's keys.

Sealed as best.pt and model.onnx are: ``point_sha256`` is the SHA-256 of every other key as
canonical JSON (sorted keys, no spaces), so damage and careless edits (a flipped digit in the
log-odds, a temperature typed in) are refused in one line instead of moving the alarm in
silence, and model_sha256 (and, for the copy inside an ONNX file, GRAPH_KEY) refuses a point
mixed up with another model. It is a checksum, not a signature: anyone who edits the point and
re-seals it with seal() is believed; against a forger, protect the files themselves. One writer
function (seal) for the file and for the copy inside an ONNX file; one check (point_problem)
for every reader. Whatever keys a point holds, the seal covers them all.

Camera modes (Mondrian, or group-conditional, calibration: Vovk 2012; calibrate.modes): a point
may hold ``modes``, one threshold per camera mode (day, infrared...), each fitted on the
calibration crops as that mode sees them and with its own guarantee figures
(:class:`ModeThreshold`); the top-level threshold stays the one fitted on the clean crops, what
predict uses unless told a mode. Numpy at most here: predict reads points without torch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from stages.common.alarm.calibration import T_MAX, T_MIN, probability
from stages.common.config.labels import ALARM_LABEL, AUTO_MODE, MODE_NAME
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError
from stages.common.infra.jsonfile import JsonProblem, read_json

FORMAT = 1
SEAL_KEY = "point_sha256"
GRAPH_KEY = "onnx_graph_sha256"  # the embedded copy's model: stages.common.model.onnx
MODES_KEY = "modes"
RECALIBRATE = "run `dvc repro calibrate` again"
# Keys that name other files: kept out of the copy inside a model file.
FILE_KEYS = ("model", "model_sha256", "source", SEAL_KEY)


def point_digest(point: Mapping) -> str:
    """SHA-256 of ``point`` without its seal, as sorted compact JSON: the recipe of the
    checkpoint's metadata digest with no tensors (stages.common.model.checkpoint.weights_digest
    (meta, {}), tests/test_point.py holds them equal), written out here so that reading a point
    never imports torch."""
    content = {k: v for k, v in point.items() if k != SEAL_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def seal(point: dict) -> dict:
    """``point`` with its ``point_sha256`` (replacing any): what every writer writes."""
    content = {k: v for k, v in point.items() if k != SEAL_KEY}
    return {**content, SEAL_KEY: point_digest(content)}


# ----- the checks ------------------------------------------------------------------------------

def number_in(value, low: float, high: float) -> bool:
    """``value`` is a finite int or float (not a bool) from ``low`` to ``high``."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and low <= value <= high)


def _seal_problem(point: dict) -> str | None:
    stored = point.get(SEAL_KEY)
    if not isinstance(stored, str):
        return (f"{SEAL_KEY} {stored!r} is not a digest (the point was not sealed by calibrate), "
                "so its content cannot be trusted")
    try:
        digest = point_digest(point)
    except (TypeError, ValueError):  # content that is not plain JSON data
        digest = None
    if digest != stored:
        return f"its content does not match its {SEAL_KEY}"
    return None


def _threshold_problem(point: dict, where: str = "") -> str | None:
    """``threshold_log_odds`` is the alarm; ``threshold`` only shows it, so the two must agree
    (to float rounding: 1e-14 relative, far below any digit a person reads). ``where``: the
    mode's prefix in the line (``modes.infrared.``)."""
    if not number_in(point.get("threshold_log_odds"), -math.inf, math.inf):
        return (f"{where}threshold_log_odds {point.get('threshold_log_odds')!r} is not a finite "
                "number")
    if not number_in(point.get("threshold"), 0.0, 1.0):
        return f"{where}threshold {point.get('threshold')!r} is not a number from 0 to 1"
    derived = probability(point["threshold_log_odds"])
    if not math.isclose(point["threshold"], derived, rel_tol=1e-14, abs_tol=0.0):
        return (f"{where}threshold {point['threshold']!r} is not the probability of "
                f"{where}threshold_log_odds {point['threshold_log_odds']!r} ({derived!r})")
    return None


def _words(value) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _modes_problem(modes) -> str | None:
    """Each camera mode: a distinct name, its conditions and severities, a threshold whose
    log-odds and probability agree, and its figures."""
    if not isinstance(modes, list) or not modes:
        return f"{MODES_KEY} {modes!r} is not a non-empty list of camera modes"
    names = set()
    for mode in modes:
        if not isinstance(mode, dict):
            return f"{MODES_KEY} holds {mode!r}, not a camera mode (a JSON object)"
        name = mode.get("name")
        if not (isinstance(name, str) and MODE_NAME.fullmatch(name)) or name == AUTO_MODE \
                or name in names:
            return f"{MODES_KEY} holds the name {name!r}: not a distinct mode name"
        names.add(name)
        where = f"{MODES_KEY}.{name}."
        if not _words(mode.get("conditions")):
            return f"{where}conditions {mode.get('conditions')!r} is not a list of conditions"
        severities = mode.get("severities")
        if not (isinstance(severities, list) and all(
                type(s) is int and 1 <= s <= 5 for s in severities)):
            return f"{where}severities {severities!r} is not a list of severities 1-5"
        problem = _threshold_problem(mode, where)
        if problem:
            return problem
        if not isinstance(mode.get("val"), dict):
            return f"{where}val {mode.get('val')!r} is not the mode's figures (a JSON object)"
    return None


def point_problem(point, embedded: bool = False, graph_sha256: str | None = None) -> str | None:
    """What makes ``point`` unusable, or None: its seal first, then every key a reader uses.
    ``embedded``: inside a model file (ONNX metadata), so it names no other file's digest;
    ``graph_sha256``: that file's graph and weights, which the copy must name."""
    if not isinstance(point, dict):
        return "not a JSON object"
    problem = _seal_problem(point)
    if problem:
        return problem
    if point.get("format") != FORMAT:
        return f"format {point.get('format')!r}, expected {FORMAT}"
    if point.get("label") != ALARM_LABEL:
        return f"label {point.get('label')!r}, expected {ALARM_LABEL!r}"
    if not number_in(point.get("temperature"), T_MIN, T_MAX):
        return f"temperature {point.get('temperature')!r} is not a number from {T_MIN} to {T_MAX}"
    problem = _threshold_problem(point)
    if problem:
        return problem
    target = point.get("target_recall")
    if not number_in(target, 0.0, 1.0) or target == 0:
        return f"target_recall {target!r} is not a number in (0, 1]"
    if not isinstance(point.get("val"), dict):
        return f"val {point.get('val')!r} is not the val figures (a JSON object)"
    for key in ("guarantee", "fitted_on"):
        if point.get(key) is not None and not isinstance(point[key], str):
            return f"{key} {point[key]!r} is not a text"
    if point.get("delta") is not None and not number_in(point["delta"], 0.0, 1.0):
        return f"delta {point['delta']!r} is not a number from 0 to 1"
    if MODES_KEY in point:
        problem = _modes_problem(point[MODES_KEY])
        if problem:
            return problem
    if graph_sha256 is not None and point.get(GRAPH_KEY) != graph_sha256:
        return (f"{GRAPH_KEY} {str(point.get(GRAPH_KEY))[:12]!r} is not this model's "
                f"({graph_sha256[:12]}): the point was embedded in another model")
    if not embedded and not (isinstance(point.get("model_sha256"), str)
                             and len(point["model_sha256"]) == 64):
        return f"model_sha256 {point.get('model_sha256')!r} is not a SHA-256"
    return None


# ----- the record ------------------------------------------------------------------------------

class UnusablePoint(ValueError):
    """A point that :func:`point_problem` refuses; its text is that one line."""


@dataclass(frozen=True)
class ModeThreshold:
    """One camera mode's own threshold: fitted on the calibration crops under ``conditions``
    (each at every severity of ``severities``; none: the clean crops), with its own figures
    (``val``: the same keys as the point's, persons needed and ``resolved`` included)."""
    name: str
    conditions: tuple[str, ...]
    severities: tuple[int, ...]
    threshold: float
    threshold_log_odds: float
    val: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, mode: dict) -> "ModeThreshold":
        return cls(mode["name"], tuple(mode["conditions"]), tuple(mode["severities"]),
                   mode["threshold"], mode["threshold_log_odds"], mode["val"])


@dataclass(frozen=True)
class OperatingPoint:
    """The temperature that calibrates the probabilities, the person threshold (``threshold_
    log_odds`` is the alarm, ``threshold`` its probability for people to read), what it was
    fitted for and what it gives (``val``: the figures on the split it was fitted on), its seal,
    the camera modes' thresholds, and ``source``: where it was read from. Only :meth:`parse`
    checks; a record built directly (a test's) is taken as it is."""
    temperature: float
    threshold: float
    threshold_log_odds: float
    target_recall: float
    guarantee: str | None = None
    delta: float | None = None
    fitted_on: str | None = None
    val: Mapping[str, Any] = field(default_factory=dict)
    modes: tuple[ModeThreshold, ...] = ()
    point_sha256: str | None = None
    model_sha256: str | None = None  # None in the copy inside a model file
    graph_sha256: str | None = None  # the copy inside a model file: that file's graph
    content: Mapping[str, Any] = field(default_factory=dict, repr=False)  # every key, sealed
    source: str | None = None

    @classmethod
    def parse(cls, point, embedded: bool = False, graph_sha256: str | None = None,
              source: str | None = None) -> "OperatingPoint":
        """The record of a point as read from JSON, checked by :func:`point_problem`
        (:class:`UnusablePoint` with its one line otherwise)."""
        problem = point_problem(point, embedded, graph_sha256)
        if problem:
            raise UnusablePoint(problem)
        return cls(point["temperature"], point["threshold"], point["threshold_log_odds"],
                   point["target_recall"], point.get("guarantee"), point.get("delta"),
                   point.get("fitted_on"), point["val"],
                   tuple(ModeThreshold.from_json(m) for m in point.get(MODES_KEY, ())),
                   point[SEAL_KEY], point.get("model_sha256"), point.get(GRAPH_KEY),
                   {k: v for k, v in point.items() if k != "source"}, source)

    def from_source(self, source: str) -> "OperatingPoint":
        return dataclasses.replace(self, source=source)

    @property
    def mode_names(self) -> list[str]:
        return [m.name for m in self.modes]

    def at_mode(self, name: str) -> "OperatingPoint":
        """This point answering with its camera mode ``name``'s threshold (no modes of its
        own); a one-line StageError naming the modes there are when it has no such mode."""
        mode = self.mode(name)
        return dataclasses.replace(self, threshold=mode.threshold,
                                   threshold_log_odds=mode.threshold_log_odds, modes=())

    def mode(self, name: str) -> ModeThreshold:
        """The camera mode called ``name``; a one-line StageError naming those there are."""
        for mode in self.modes:
            if mode.name == name:
                return mode
        there = (f"it holds {', '.join(self.mode_names)}" if self.modes else
                 "it holds none (calibrate.modes is empty)")
        raise StageError(f"--mode {name!r} is not a camera mode of the operating point "
                         f"({self.source or 'in use'}): {there}; give one of them, or "
                         "configure calibrate.modes and run `dvc repro calibrate`")


# ----- reading and writing the file ------------------------------------------------------------

def read_operating_point(path: Path) -> OperatingPoint:
    """The file calibrate wrote, as its checked record; one line naming it otherwise."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        raise StageError(f"{path}: not found; run `dvc repro calibrate` first") from None
    except OSError as exc:
        raise StageError(f"{path}: cannot read it ({exc.strerror or exc}); {RECALIBRATE}") \
            from None
    except JsonProblem as exc:
        raise StageError(f"{path}: cannot read it ({exc}); {RECALIBRATE}") from None
    try:
        return OperatingPoint.parse(data, source=str(path))
    except UnusablePoint as exc:
        raise StageError(f"{path}: {exc}; the file is damaged, edited or not calibrate's; "
                         f"{RECALIBRATE}") from None


def operating_point_for(checkpoint: Path, path: Path) -> OperatingPoint:
    """The operating point fitted for ``checkpoint`` (its bytes' SHA-256 must match); one line
    naming both files otherwise."""
    point = read_operating_point(path)
    if point.model_sha256 != file_sha256(checkpoint):
        raise StageError(f"{path} was fitted for another checkpoint than {checkpoint}; "
                         f"{RECALIBRATE}")
    return point


def embedded(point: OperatingPoint, graph_sha256: str | None = None) -> dict:
    """The copy of an operating point a model file carries: every key but those naming other
    files, with ``graph_sha256`` (the SHA-256 of the model file's graph and weights,
    stages.common.model.onnx.graph_digest) under :data:`GRAPH_KEY`, under its own seal (the
    file's would name a checkpoint the model file has not)."""
    kept = {k: v for k, v in point.content.items() if k not in FILE_KEYS and k != GRAPH_KEY}
    return seal({**kept, GRAPH_KEY: graph_sha256} if graph_sha256 else kept)


def beside(checkpoint: Path, pipeline_point: Path) -> OperatingPoint | None:
    """The operating point fitted for ``checkpoint``: ``operating_point.json`` in its folder
    (how a checkpoint is handed on with its point), else calibrate's own file
    (``pipeline_point``); a file fitted for another checkpoint is passed over. None when neither
    fits; a damaged one is refused."""
    digest = None
    for path in dict.fromkeys([Path(checkpoint).parent / pipeline_point.name, pipeline_point]):
        if path.exists():  # a FIFO or a folder by that name is refused, not passed over
            point = read_operating_point(path)
            digest = digest or file_sha256(checkpoint)
            if point.model_sha256 == digest:
                return point
    return None
