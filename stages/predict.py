"""Classify pictures: `python -m stages.predict PATH... [--model M] [--format F] [--top-k K]`.

Not a DVC stage: the operator's command. PATH is a picture or a folder, walked recursively and
sorted, links followed (each real folder once, under its own name when it has one, so loops and
links fanning out cost one walk per folder). In a folder a file is a picture when its name has a
picture suffix (``PICTURE_SUFFIXES``: .jpg .jpeg .jpe .jfif .png ... .sr) or its first bytes
are a picture format's signature (``picture_format``), whatever its name; every other file, and
each link to a folder already walked, is named on stderr (``note: ...``), so no picture is passed
over in silence. A link to nothing, or a file or folder that cannot be read, gets its own
``error:``; a folder on a pseudo-filesystem (/proc, /sys, /dev) is not walked, a device or FIFO
is "not a regular file", and an empty PATH is refused. Each picture is prepared as training
crops are (aspect kept, padded with the corner colour), centred, so the answer never changes
between runs. The model is a train-stage
checkpoint (PyTorch) or an exported ``.onnx`` file (ONNX Runtime, fp32 or int8) or ``.xml``
OpenVINO IR (stages.common.model.formats); each carries its own arch,
class names, image size and normalisation, and a digest of its weights that is checked before it
answers anything. No network is touched. ``--device auto|cpu|cuda|mps`` (default auto: CUDA when
there is one) is where a checkpoint runs, batched; an ONNX file runs on the CPU. torch is
imported for a checkpoint only: with an ONNX file this command runs where no PyTorch is
installed (requirements-edge.txt, docs/using-the-model.md).

Probabilities are calibrated (calibrate's temperature) and each picture gets ``alarm``: its person
probability is at or above the operating point's threshold (``--person-threshold X`` overrides it
for one run). A checkpoint's operating point is ``operating_point.json`` beside it, else
data/calibration/operating_point.json, used only when fitted for that very checkpoint; an ONNX
file carries its own. With none, stderr says so (with ``--person-threshold`` too): probabilities
are uncalibrated, and the alarm, "person is the top label" without X, is not the operating
point's. ``--require-point`` refuses to answer without a valid point instead (exit code 2), for
unattended use where nobody reads stderr. A point fitted with camera modes (calibrate.modes) holds
one threshold per mode: ``--mode NAME`` answers with that mode's, ``--mode auto`` with the mode
fitted under the infrared condition for a grey picture (serving.predictor.is_grey: a near-IR
camera's) and the mode fitted on clean crops for a colour one; JSON then names the mode in its
header and in every answer.

Answers are written as each batch is classified (``--format json`` opens the document first and
closes it last), so a failure later in the run loses nothing already answered. A file that
cannot be used (missing, empty, not a picture, more pixels than ``--max-image-pixels``, cut off,
or anything its decode raises) gets its own ``error: ...`` and the rest go on.

File names are written so that no two files share one and none fakes a row: in every format a
byte that is not UTF-8 is ``\\xNN`` and a backslash ``\\\\``; the table and the CSV also escape
control and other non-printable characters (``\\n``, ``\\x1b``); the CSV quotes every field
holding a comma or a quote, and puts one ``'`` before a name or error that begins with
``= + - @`` or ``'``, so a spreadsheet shows it and never runs it (drop that ``'`` to get the
name); JSON writes the name without it.

Exit code:
  0  every input was classified;
  1  some inputs failed (each has its ``error:``; the count is on stderr);
  2  nothing more could be answered: an unusable model (missing, damaged, not ours, NaN or
     infinite logits), option or output (stdout closed or full); one line on stderr;
  3  an internal error (an exception nothing above explains: a bug, not the inputs); one line
     on stderr, the answers already given kept.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import math
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, TextIO

# OpenMP's idle threads (PyTorch's, with --threads above 1) otherwise spin after each pass and
# fight whatever else runs on the cores: on a 2-core box decoding video, resnet18 at 64 px took
# 250-2,300 ms a picture instead of 11-20 ms (BENCHMARKS.md section 11). Read once, when torch
# loads OpenMP; only when predict is the program, and an OMP_WAIT_POLICY already set wins.
RUNTIME_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
if __name__ == "__main__":
    for _name, _value in RUNTIME_ENV.items():
        os.environ.setdefault(_name, _value)

from stages.common.alarm.calibration import log_odds, person_log_odds  # noqa: E402
from stages.common.alarm.point import ModeThreshold, OperatingPoint  # noqa: E402
from stages.common.config.archs import MAX_BATCH, MAX_IMAGE_PIXELS  # noqa: E402
from stages.common.config.labels import ALARM_LABEL, AUTO_MODE  # noqa: E402
from stages.common.config.paths import CHECKPOINT, OPERATING_POINT  # noqa: E402
from stages.common.infra.errors import (DISK_FULL, ArgumentParser, ParamError,  # noqa: E402
                                        StageError, main_guard)
from stages.common.infra.progress import is_terminal, tracked  # noqa: E402
from stages.common.pictures.decode import DEFAULT_MAX_IMAGE_PIXELS, PICTURE_SUFFIXES  # noqa: E402
from stages.common.serving.classifiers import (DEFAULT_THREADS, EXPORTED,  # noqa: E402
                                              load_classifier)
from stages.common.serving.predictor import (Prediction, Skipped, expand,  # noqa: E402
                                              predict_paths, printable, shown, workers)

DEFAULT_MODEL = CHECKPOINT
MAX_THREADS = 1024  # a typo (--threads 10000) stops here, not in the runtime's thread pool
INTERNAL_ERROR = 3  # not 1, which says that some inputs failed and the rest were answered
EXIT_HELP = ("Exit code: 0 every input classified; 1 some failed (each its own error: line); 2 an "
             "unusable model, option or output (one line); 3 an internal error (one line).")


PATHS_HELP = ("picture files or folders. A folder is walked recursively, links followed (each "
              "folder once, so loops end); in it a file is a picture when its name ends in "
              + " ".join(PICTURE_SUFFIXES) + " or its first bytes are those of a JPEG, PNG, "
              "BMP, WebP, TIFF, GIF, JPEG 2000, Sun raster or AVIF file (a HEIF .heic file is "
              "found too, and named with its own error: nothing here decodes HEIF); other files "
              "and links to a folder already walked are named on stderr (note: ...), never "
              "answered in silence; a folder of /proc, /sys or /dev is not walked")
NAMES_HELP = ("File names: a byte that is not UTF-8 is written \\xNN and a backslash \\\\ in "
              "every format; the table and the CSV also escape control characters (\\n, "
              "\\x1b); the CSV quotes fields holding a comma or quote and puts one ' before a "
              "name or error that begins with = + - @ or ' (a spreadsheet shows it, never runs "
              "it); JSON writes the name without it.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m stages.predict", description=__doc__.split("\n")[0],
                            epilog=f"{EXIT_HELP} {NAMES_HELP}")
    parser.add_argument("paths", nargs="+", metavar="PATH", help=PATHS_HELP)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help=f"checkpoint (.pt), exported .onnx or OpenVINO .xml file "
                             f"(default {DEFAULT_MODEL})")
    parser.add_argument("--format", choices=["table", "json", "csv"], default="table",
                        help="table: aligned columns for people (default); csv: one row per "
                             "picture with every class's probability; json: one document, a "
                             "header (model, classes, operating point) and one record a picture")
    parser.add_argument("--top-k", type=int, default=None,
                        help="classes listed per picture, best first, in the table's last "
                             "column and JSON's top_k (default all); the CSV always holds every "
                             "class")
    parser.add_argument("--batch-size", type=int, default=32,
                        help=f"pictures per forward pass (1 to {MAX_BATCH})")
    parser.add_argument("--max-image-pixels", type=int, default=DEFAULT_MAX_IMAGE_PIXELS,
                        help="pictures above this many pixels are refused from their header, "
                             f"not decoded (default {DEFAULT_MAX_IMAGE_PIXELS:,}, as "
                             "crops.max_image_pixels)")
    parser.add_argument("--person-threshold", type=float, default=None, metavar="X",
                        help="raise the alarm when the person probability is >= X (0 to 1), "
                             "instead of the model's operating point")
    parser.add_argument("--mode", default=None, metavar="MODE",
                        help="answer with the threshold of the operating point's camera mode "
                             "MODE (calibrate.modes, e.g. infrared), or auto: a grey picture "
                             "(its channels equal within a tolerance, a near-infrared "
                             "camera's) takes the mode fitted under the infrared condition, a "
                             "colour one the mode fitted on clean crops; JSON names the mode "
                             "of each answer (default: the point's own threshold)")
    parser.add_argument("--require-point", action="store_true",
                        help="refuse (one line, exit code 2) to answer when the model has no "
                             "valid operating point, instead of warning and answering with "
                             "uncalibrated probabilities: for unattended use, where a stderr "
                             "warning goes unread")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, metavar="N",
                        help="CPU threads the model runs on, ONNX Runtime's or PyTorch's "
                             "(default: for an ONNX model, a run per CPU at once, each on one "
                             "thread; otherwise the runtime's own, one per physical core; idle "
                             "threads sleep instead of spinning, so video decoding on the same "
                             "cores slows neither down much: BENCHMARKS.md sections 11-12); give "
                             "fewer to leave cores to other work")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="where a .pt checkpoint runs (auto: cuda, then mps, then cpu, "
                             "whichever there is); an exported .onnx or .xml model runs on the CPU")
    return parser.parse_args(argv)


# What a spreadsheet runs as a formula (OWASP, CSV injection), and the quote that shields it.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(text: str) -> str:
    """``text`` for a CSV cell that a spreadsheet shows and never runs: one ``'`` before a text
    that begins like a formula, or with ``'`` itself (so dropping one leading ``'`` gives every
    name back)."""
    return "'" + text if text.startswith(FORMULA_STARTS + ("'",)) else text


def ranked(pred: Prediction, classes: list[str], k: int) -> list[tuple[str, float]]:
    order = sorted(range(len(classes)), key=lambda i: (-pred.probs[i], i))
    return [(classes[i], float(pred.probs[i])) for i in order[:k]]


GREY_CONDITION = "infrared"  # the condition whose crops are grey (stages.common.pictures.corrupt)


@dataclass(frozen=True)
class ModeChoice:
    """``--mode``: the camera mode that answers a colour picture and the one that answers a grey
    one (the same mode when it is named)."""
    asked: str
    colour: ModeThreshold
    grey: ModeThreshold

    def of(self, pred: Prediction) -> ModeThreshold:
        return self.grey if pred.grey else self.colour


def mode_choice(args: argparse.Namespace, point: OperatingPoint | None) -> ModeChoice | None:
    """The modes ``--mode`` asks for, checked against the point's (one line, exit 2, before
    any picture is answered); None without ``--mode``."""
    if args.mode is None:
        return None
    if point is None:
        raise StageError(f"--mode {args.mode}: {args.model} has no operating point, so no "
                         "camera modes; give it one fitted with calibrate.modes, or leave "
                         "--mode out")
    if args.mode != AUTO_MODE:
        mode = point.mode(args.mode)
        return ModeChoice(args.mode, mode, mode)
    clean = [m for m in point.modes if not m.conditions]
    grey = [m for m in point.modes if GREY_CONDITION in m.conditions]
    if len(clean) != 1 or len(grey) != 1:
        held = ", ".join(f"{m.name} ({' + '.join(m.conditions) or 'clean'})"
                         for m in point.modes) or "no camera modes (calibrate.modes is empty)"
        raise StageError(f"--mode auto needs exactly one camera mode fitted on clean crops and "
                         f"one fitted under the {GREY_CONDITION} condition, and "
                         f"{point.source} holds {held}; name a mode (--mode NAME), or set "
                         "calibrate.modes, e.g. [{name: day}, {name: infrared, conditions: "
                         "[infrared]}], and run `dvc repro calibrate`")
    return ModeChoice(AUTO_MODE, clean[0], grey[0])


def _shown_log_odds(value: float | None) -> float | None:
    # Near 1 the probability prints as 1: the log-odds says which threshold answered. 0 and 1
    # have none that JSON can hold (-inf, inf: always, never); the probability says it.
    return value if value is not None and math.isfinite(value) else None


class Alarm:
    """When a picture raises the alarm: its calibrated person probability >= the threshold,
    compared as log-odds from the logits (stages.common.alarm.calibration: no rounding to 1.0); with
    no threshold, person as the top label; with ``--mode``, the threshold of the picture's
    camera mode (:class:`ModeChoice`)."""

    def __init__(self, classes: list[str], threshold: tuple[float, float] | None,
                 source: str | None, point: OperatingPoint | None,
                 choice: ModeChoice | None = None):
        """``threshold``: (probability, log-odds), the log-odds being the one compared."""
        self.person = classes.index(ALARM_LABEL) if ALARM_LABEL in classes else None
        self.temperature = point.temperature if point else 1.0
        self.choice = choice
        shown, self.log_odds = threshold or (None, None)
        self.header = {"threshold": shown, "threshold_log_odds": _shown_log_odds(self.log_odds),
                       "source": source, "temperature": self.temperature}
        if choice:
            self.header["mode"] = choice.asked
            self.header["modes"] = {m.name: {"threshold": m.threshold, "threshold_log_odds":
                                             _shown_log_odds(m.threshold_log_odds)}
                                    for m in (choice.colour, choice.grey)}

    def mode(self, pred: Prediction) -> str | None:
        """The camera mode whose threshold answers ``pred`` (None without ``--mode``)."""
        return self.choice.of(pred).name if self.choice and not pred.error else None

    def __call__(self, pred: Prediction) -> bool | None:
        if pred.error or self.person is None:
            return None
        log_odds = self.choice.of(pred).threshold_log_odds if self.choice else self.log_odds
        if log_odds is None:
            return int(pred.probs.argmax()) == self.person
        score = person_log_odds(pred.logits[None], self.temperature, self.person)[0]
        return bool(score >= log_odds)


def as_record(pred: Prediction, classes: list[str], k: int, alarm: Alarm) -> dict:
    if pred.error:
        return {"path": shown(pred.path), "error": pred.error}
    top = ranked(pred, classes, k)
    record = {"path": shown(pred.path), "label": top[0][0], "probability": round(top[0][1], 6),
              "alarm": alarm(pred),
              "probabilities": {c: round(float(p), 6) for c, p in zip(classes, pred.probs)},
              "top_k": [{"label": c, "probability": round(p, 6)} for c, p in top]}
    if alarm.choice:
        record["mode"] = alarm.mode(pred)
    return record


def yes_no(value: bool | None) -> str:
    return "" if value is None else "yes" if value else "no"


class TableWriter:
    """Aligned columns; the width comes from every input's name, known before any answer."""

    def __init__(self, out: TextIO, classes: list[str], k: int, paths: list[Path], alarm: Alarm):
        self.out, self.classes, self.k, self.alarm = out, classes, k, alarm
        self.width = max([len("file")] + [len(printable(str(p))) for p in paths])

    def begin(self, model: Path, arch: str) -> None:
        self.out.write(f"{'file':<{self.width}}  {'label':<8} {'prob':>6}  alarm  top-{self.k}\n")

    def write(self, p: Prediction) -> None:
        name = printable(str(p.path))
        if p.error:
            self.out.write(f"{name:<{self.width}}  error: {printable(p.error)}\n")
            return
        top = ranked(p, self.classes, self.k)
        listing = ", ".join(f"{c} {v:.4f}" for c, v in top)
        self.out.write(f"{name:<{self.width}}  {top[0][0]:<8} {top[0][1]:6.4f}  "
                       f"{yes_no(self.alarm(p)):<5}  {listing}\n")

    def end(self) -> None:
        pass


class CsvWriter:
    """One row per picture. Names and errors are :func:`csv_cell` s of :func:`printable` text:
    control characters escaped as in the table, so a name can neither split a row for a reader
    that breaks lines at CR nor drive a terminal the CSV is shown on (ESC [2K erased the row
    before it)."""

    def __init__(self, out: TextIO, classes: list[str], k: int, paths: list[Path], alarm: Alarm):
        self.out, self.classes, self.alarm = out, classes, alarm

    def row(self, fields: list[str]) -> None:
        line = io.StringIO()
        # "\r\n" as the terminator makes the csv module quote every field that holds a CR or
        # an LF (with "\n" it left a lone CR bare, and readers split the row there); the row
        # itself still ends in "\n".
        csv.writer(line, lineterminator="\r\n").writerow(fields)
        self.out.write(line.getvalue()[:-2] + "\n")

    def begin(self, model: Path, arch: str) -> None:
        self.row(["path", "label", "probability", "alarm", *self.classes, "error"])

    def write(self, p: Prediction) -> None:
        name = csv_cell(printable(str(p.path)))
        if p.error:
            self.row([name, "", "", "", *[""] * len(self.classes), csv_cell(printable(p.error))])
        else:
            best = int(p.probs.argmax())
            self.row([name, self.classes[best], f"{p.probs[best]:.6f}", yes_no(self.alarm(p)),
                      *[f"{v:.6f}" for v in p.probs], ""])

    def end(self) -> None:
        pass


class JsonWriter:
    """One JSON document, written as it grows: the header, then one record a line, then ``]}``."""

    def __init__(self, out: TextIO, classes: list[str], k: int, paths: list[Path], alarm: Alarm):
        self.out, self.classes, self.k, self.alarm = out, classes, k, alarm
        self.first = True

    def begin(self, model: Path, arch: str) -> None:
        head = json.dumps({"model": shown(model), "arch": arch, "classes": self.classes,
                           "operating_point": self.alarm.header})
        self.out.write(head[:-1] + ', "predictions": [')

    def write(self, p: Prediction) -> None:
        record = as_record(p, self.classes, self.k, self.alarm)
        self.out.write(("\n" if self.first else ",\n") + json.dumps(record))
        self.first = False

    def end(self) -> None:
        self.out.write("\n]}\n")


WRITERS = {"table": TableWriter, "csv": CsvWriter, "json": JsonWriter}


@contextlib.contextmanager
def output_errors() -> Iterator[None]:
    """A stdout that cannot be written (a full device, a closed pipe) is one line, exit code 2."""
    try:
        yield
    except OSError as exc:
        # What is still buffered would fail again at exit, as a second message: drop it.
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if exc.errno in DISK_FULL:
            exc.filename = "stdout"
            raise  # main_guard's one line: free space
        raise StageError(f"cannot write the answers to stdout ({exc.strerror or exc}); "
                         "check where stdout goes, or redirect it to a file") from None


def threshold_for(args: argparse.Namespace, classifier, choice: ModeChoice | None = None
                  ) -> tuple[tuple[float, float] | None, str | None]:
    """((probability, log-odds), where it comes from): --person-threshold X (its own log-odds,
    whatever the point holds), else the model's operating point (whose log-odds is the alarm and
    was checked against its probability). Without a point, --require-point stops here (one
    line, exit 2); else stderr says, with or without X, that the probabilities are uncalibrated
    and the alarm is not the operating point's."""
    point = classifier.operating_point
    where = None
    if point is None:
        where = ("exported without one: export it again with `dvc repro export`"
                 if args.model.suffix.lower() in EXPORTED else
                 f"no {OPERATING_POINT.name} fitted for it beside it or at {OPERATING_POINT}: "
                 "run `dvc repro calibrate`")
        if args.require_point:
            raise StageError(f"{args.model} has no operating point ({where}); --require-point "
                             "answers only with one")
    if args.person_threshold is not None:
        x = args.person_threshold
        if where:
            # The same X on the same picture gave "no" here and "yes" where the point was
            # found: without the point's temperature, X meets other probabilities.
            print(f"warning: {args.model} has no operating point ({where}); probabilities are "
                  f"uncalibrated (temperature 1), so --person-threshold {x} is compared with "
                  "other probabilities than where the point is found; --require-point refuses "
                  "to answer without it", file=sys.stderr)
        return (x, log_odds(x)), "--person-threshold"
    if choice is not None:  # a colour picture's mode (with a named mode, every picture's)
        return (choice.colour.threshold, choice.colour.threshold_log_odds), point.source
    if point is not None:
        return (point.threshold, point.threshold_log_odds), point.source
    print(f"warning: {args.model} has no operating point ({where}); the alarm is NOT the "
          "operating point's: probabilities are uncalibrated and the alarm is raised when "
          "person is the top label; --person-threshold X sets one, --require-point refuses to "
          "answer without a point", file=sys.stderr)
    return None, None


NAMES_SHOWN = 5  # skipped files named on stderr; the rest are counted


def say_skipped(skipped: list[Skipped]) -> None:
    """What a folder held that gets no answer, on stderr: nothing is passed over in silence."""
    others = [s.path for s in skipped if s.walked_as is None and not s.pseudo]
    if others:
        names = ", ".join(printable(str(p)) for p in others[:NAMES_SHOWN])
        more = f" and {len(others) - NAMES_SHOWN} more" if len(others) > NAMES_SHOWN else ""
        print(f"note: {len(others)} file{'s are' if len(others) > 1 else ' is'} not a picture "
              f"by name or content, not classified: {names}{more}", file=sys.stderr)
    for s in skipped:
        if s.pseudo:
            print(f"note: {printable(str(s.path))} leads to a pseudo-filesystem (/proc, /sys, "
                  "/dev): the machine's state, not pictures; not walked", file=sys.stderr)
        if s.walked_as is not None:
            print(f"note: {printable(str(s.path))} leads to the folder "
                  f"{printable(str(s.walked_as))}, already walked; its pictures are answered "
                  "once, under that name", file=sys.stderr)


def internal_errors(fn):
    """An exception main_guard does not turn into its one line is a bug of ours, not a bad input:
    one line and INTERNAL_ERROR, never Python's traceback and its exit code 1."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # main_guard has already handled every expected one
            what = " ".join(str(exc).split())
            print(f"error: internal error ({type(exc).__name__}{': ' if what else ''}{what}); "
                  "not caused by the inputs: please report it with the command that was run",
                  file=sys.stderr)
            raise SystemExit(INTERNAL_ERROR) from None
    return wrapper


@internal_errors
@main_guard
def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise StageError("stdout is closed, so no answer could be written; run with stdout "
                         "open or redirected to a file")
    args = parse_args(argv)
    if any(not path for path in args.paths):
        raise ParamError("PATH '' is empty (it would walk the current folder); give a picture "
                         "or a folder, . for the current one")
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ParamError(f"--batch-size={args.batch_size} is not allowed; expected 1 to "
                         f"{MAX_BATCH}")
    if args.mode is not None and args.person_threshold is not None:
        raise ParamError(f"--mode {args.mode} and --person-threshold both choose the threshold; "
                         "give one of them")
    if args.person_threshold is not None and not 0 <= args.person_threshold <= 1:
        raise ParamError(f"--person-threshold={args.person_threshold} is not allowed; expected "
                         "a number from 0 to 1")
    if args.threads is not None and not 1 <= args.threads <= MAX_THREADS:
        raise ParamError(f"--threads={args.threads} is not allowed; expected 1 to {MAX_THREADS}")
    if not 1 <= args.max_image_pixels <= MAX_IMAGE_PIXELS:
        raise ParamError(f"--max-image-pixels={args.max_image_pixels} is not allowed; expected "
                         f"1 to {MAX_IMAGE_PIXELS:,}")
    onnx = args.model.suffix.lower() == ".onnx"
    if args.model.suffix.lower() in EXPORTED:  # ONNX Runtime's or OpenVINO's CPU build; no torch
        device = "cpu" if args.device == "auto" else args.device
    else:
        try:
            from stages.common.model.device import pick_device
        except ImportError as exc:  # the edge runtime (requirements-edge.txt): no torch
            raise StageError(f"{args.model}: a PyTorch checkpoint, and {exc.name or 'torch'} is "
                             "not installed here (the edge runtime answers from an exported "
                             ".onnx file); give --model model.onnx, or install "
                             "requirements.txt") from None
        device = pick_device(args.device)
    # An ONNX model unless --threads says otherwise: one thread a run, a run per CPU at once
    # (predict_paths' runs); --threads N: one run on N threads
    runs = workers() if onnx and args.threads is None else 1
    threads = 1 if runs > 1 else args.threads
    classifier = load_classifier(args.model, threads=threads, device=device)
    classes = classifier.meta.classes
    if args.top_k is not None and args.top_k < 1:
        raise ParamError(f"--top-k={args.top_k} is not allowed; expected 1 to {len(classes)}")
    k = min(args.top_k or len(classes), len(classes))
    choice = mode_choice(args, classifier.operating_point)
    alarm = Alarm(classes, *threshold_for(args, classifier, choice), classifier.operating_point,
                  choice)

    skipped: list[Skipped] = []
    items = expand(args.paths, skipped)
    say_skipped(skipped)
    out = WRITERS[args.format](sys.stdout, classes, k, [path for path, _ in items], alarm)
    answered = failed = 0
    with output_errors():
        out.begin(args.model, classifier.meta.arch)
        try:
            answers = predict_paths(classifier, items, args.batch_size, args.max_image_pixels,
                                    runs=runs)
            # On a terminal the answers themselves show progress; redirected, stderr does.
            for pred in tracked(answers, "predict", len(items), unit="pictures",
                                enabled=not is_terminal(sys.stdout)):
                out.write(pred)
                sys.stdout.flush()  # an answer is out as soon as it exists
                answered += 1
                failed += pred.error is not None
        finally:
            # Also after the model failed mid-run: what was answered stays a whole document.
            out.end()
            sys.stdout.flush()
    if failed:
        print(f"{failed} of {answered} inputs failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    # `predict ... | head` closes the pipe early: end quietly, as Unix tools do.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
