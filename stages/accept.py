"""A site's own labelled crops as an acceptance test of the person alarm.

``python -m stages.accept FOLDER [FOLDER ...] [--model M] [--json FILE] [--mode NAME]``: the
operator's command. Each FOLDER is a *site set*, an ImageFolder of the model's classes (``person/``,
``animal/``, ``object/``, each walked recursively as predict walks a folder). Every picture is
read, letterboxed and classified exactly as predict does (stages.common.serving), at the model's
sealed operating point: a checkpoint's (its ``operating_point.json`` beside it, else calibrate's,
used only when fitted for that very checkpoint) or the one an exported ``.onnx`` file carries;
with ``--mode NAME``, that point's camera mode NAME's threshold (calibrate.modes), as
``predict --mode NAME`` answers.
Per site set: accuracy, person recall with its one-sided 95 % Clopper-Pearson bounds, false
alarms per 1,000 with the upper bound, and the verdict met / not shown / not met, the figures
the conditions stage gives (stages.common.alarm.labelled, one place), each picture counted as
its own (nothing says which were taken together). One verdict line per site set on stdout::

    site set X: 412 persons, recall 0.9927 (>= 0.9848 with 95 % confidence): target 0.99 not
    shown; 1 person missed: X/person/cam3_0412.jpg; ...

(one line), and with ``--json FILE`` the figures, every missed person, false alarm, unreadable
picture and ignored file by name, in one JSON document.

``python -m stages.accept`` with no argument at all is the DVC stage ``accept``: the site sets of
``accept.folders`` in params.yaml, the pipeline's checkpoint and operating point, written to
metrics/accept.json (with no site set, a file saying so, and no model loaded). DVC does not
track the pictures of those folders, so after changing them: ``dvc repro -f -s accept``.

Nothing is skipped in silence. A site set that cannot be measured (not found, not a folder,
empty, a class folder missing, a folder that is no class, no person picture) gets one
``error:`` line each, all of them before any picture is classified. A file that is not a
picture by name or content, or one beside the class folders, is named on stderr (``note:``)
and in the JSON; a picture that cannot be read or decoded is counted and named in the verdict
line and left out of the figures.

Exit code:
  0  every site set measured, every picture read;
  1  every site set measured, but some pictures could not be read (each named; the figures
     count the others);
  2  nothing measured: a site set that cannot be (one line each), an unusable model or
     operating point, option or params; or, after classifying, a site set none of whose person
     pictures could be read.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stages.common.alarm.labelled import alarm_under, raised
from stages.common.alarm.point import OperatingPoint
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL, AUTO_MODE
from stages.common.config.paths import ACCEPT_METRICS, CHECKPOINT
from stages.common.config.params import MAX_BATCH
from stages.common.infra.atomic import clean_dead_leftovers, write_json
from stages.common.infra.errors import ArgumentParser, ParamError, StageError, main_guard

NAMES_SHOWN = 5  # names in a line; the JSON holds them all
UNMEASURED = 2
SOME_UNREADABLE = 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m stages.accept", description=__doc__.split("\n")[0],
                            epilog="Exit code: 0 every site set measured; 1 some pictures could "
                                   "not be read (each named); 2 a site set, the model, an option "
                                   "or params.yaml unusable (one line each). With no argument: "
                                   f"the DVC stage (accept.folders -> {ACCEPT_METRICS}).")
    parser.add_argument("folders", nargs="+", metavar="FOLDER", type=Path,
                        help="a site set: a folder holding one folder per class (person/ "
                             "animal/ object/), each walked recursively")
    parser.add_argument("--model", type=Path, default=CHECKPOINT,
                        help=f"checkpoint (.pt) or exported .onnx file (default {CHECKPOINT})")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE",
                        help="also write the figures and every named file as JSON to FILE")
    parser.add_argument("--batch-size", type=int, default=32,
                        help=f"pictures per forward pass (1 to {MAX_BATCH})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                        help="where a .pt checkpoint runs (auto: cuda, then mps, then cpu); an "
                             ".onnx model runs on the CPU")
    parser.add_argument("--mode", default=None, metavar="NAME",
                        help="measure at the threshold of the operating point's camera mode "
                             "NAME (calibrate.modes, e.g. infrared for a site set of a "
                             "near-infrared camera's night pictures), as predict --mode NAME "
                             "answers")
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= MAX_BATCH:
        raise ParamError(f"--batch-size={args.batch_size} is not allowed; expected 1 to "
                         f"{MAX_BATCH}")
    if args.json is not None and not args.json.resolve().parent.is_dir():
        raise ParamError(f"--json {args.json}: its folder does not exist; create it or give "
                         "another file")
    return args


@dataclass
class SiteSet:
    """What a site set holds, before any picture is read: each picture with its class index
    (and the error found while walking, if any), and the files that are not counted."""
    folder: Path
    items: list[tuple[Path, str | None]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)


def survey(folder: Path, classes: list[str]) -> tuple[SiteSet | None, list[str]]:
    """The site set at ``folder``, or the reasons it cannot be measured (one line each)."""
    from stages.common.serving.predictor import Skipped, expand, printable

    name = printable(str(folder))
    expected = ", ".join(f"{c}/" for c in classes)
    if not folder.exists():
        return None, [f"site set {name}: not found; give a folder holding {expected}"]
    if not folder.is_dir():
        return None, [f"site set {name}: not a folder; give a folder holding {expected}"]
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return None, [f"site set {name}: cannot list it ({exc.strerror or exc}); check its "
                      "permissions"]
    if not entries:
        return None, [f"site set {name}: empty; put each labelled picture in "
                      f"{name}/<class>/ ({', '.join(classes)})"]
    found = SiteSet(folder)
    problems = []
    for entry in entries:
        if entry.is_dir() and entry.name not in classes:
            problems.append(f"site set {name}: {printable(str(entry))} is not a class folder "
                            f"(expected {expected}); rename it to one or move it out")
        elif not entry.is_dir():
            found.ignored.append(entry)  # beside the class folders: no label
    for index, label in enumerate(classes):
        sub = folder / label
        if not sub.is_dir():
            what = ("an acceptance test needs labelled persons" if label == ALARM_LABEL else
                    f"create it, empty if the site has no {label} crops")
            problems.append(f"site set {name}: no class folder {printable(str(sub))}; {what}")
            continue
        try:
            next(sub.iterdir(), None)
        except OSError as exc:
            problems.append(f"site set {name}: cannot list {printable(str(sub))} "
                            f"({exc.strerror or exc}); check its permissions")
            continue
        skipped: list[Skipped] = []
        # the class folder itself comes back only as "holds no pictures": an empty class
        items = [(p, e) for p, e in expand([sub], skipped) if p != sub]
        found.ignored += [s.path for s in skipped]
        if label == ALARM_LABEL and not items:
            problems.append(f"site set {name}: no person picture in {printable(str(sub))}; an "
                            "acceptance test needs labelled persons")
        found.items += items
        found.labels += [index] * len(items)
    return (None if problems else found), problems


def names(paths: list[str], listed: str = "--json FILE lists all") -> str:
    """The first NAMES_SHOWN names, then a count and where every one is (``listed``)."""
    shown = ", ".join(paths[:NAMES_SHOWN])
    more = len(paths) - NAMES_SHOWN
    return shown + (f" and {more} more ({listed})" if more > 0 else "")


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def verdict_line(name: str, figures: dict, target: float, missed: list[str],
                 unreadable: list[str], listed: str) -> str:
    """The site set's verdict in one line: persons, recall and its lower bound, the target's
    verdict, the persons missed by name, the false alarms, the pictures not read."""
    line = (f"site set {name}: {plural(figures['persons'], 'person')}, recall "
            f"{figures['person_recall']} (>= {figures['person_recall_lower_95']} with 95 % "
            f"confidence): target {target} {figures['target_verdict']}; ")
    line += (f"{plural(len(missed), 'person')} missed: {names(missed, listed)}" if missed else
             "no person missed")
    if figures["non_persons"]:
        line += (f"; {figures['false_alarms']:,} of {figures['non_persons']:,} animals and "
                 f"objects raised it ({figures['false_alarms_per_1000']} per 1,000, <= "
                 f"{figures['false_alarms_per_1000_upper_95']} with 95 % confidence)")
    else:
        line += "; no animals or objects, so no false-alarm figure"
    if unreadable:
        line += (f"; {plural(len(unreadable), 'picture')} could not be read, not counted: "
                 f"{names(unreadable, listed)}")
    return line


def measure(classifier, site: SiteSet, point: OperatingPoint, batch_size: int, listed: str,
            mode: str | None = None) -> tuple[dict, str]:
    """The site set's figures (the JSON's record) and its verdict line (naming ``mode``, the
    camera mode whose threshold ``point`` holds, when there is one); a record with
    ``unmeasured`` when none of its person pictures could be read."""
    from stages.common.serving.predictor import predict_paths, printable, shown

    classes = classifier.meta.classes
    person = classes.index(ALARM_LABEL)
    read, labels, unreadable = [], [], []
    for prediction, label in zip(predict_paths(classifier, site.items, batch_size),
                                 site.labels):
        if prediction.error:
            unreadable.append((prediction.path, prediction.error))
        else:
            read.append(prediction)
            labels.append(label)
    name = printable(str(site.folder)) + (f" at camera mode {printable(mode)}" if mode else "")
    record = {"pictures": len(site.items), "pictures_read": len(read),
              "per_class": {c: labels.count(i) for i, c in enumerate(classes)},
              "unreadable": [{"path": shown(p), "error": e} for p, e in unreadable],
              "ignored": [shown(p) for p in site.ignored]}
    unread = [f"{printable(str(p))} ({printable(e)})" for p, e in unreadable]
    if person not in labels:
        record["unmeasured"] = "none of its person pictures could be read"
        return record, (f"site set {name}: none of its person pictures could be read, so no "
                        f"verdict: {names(unread, listed)}")
    logits = np.stack([p.logits for p in read])
    targets = np.array(labels)
    figures = alarm_under(logits, targets, classes, point)
    alarm = raised(logits, classes, point)
    missed = [p.path for p, a, t in zip(read, alarm, targets) if t == person and not a]
    false = [p.path for p, a, t in zip(read, alarm, targets) if t != person and a]
    record.update(figures)
    record["persons_missed_files"] = [shown(p) for p in missed]
    record["false_alarm_files"] = [shown(p) for p in false]
    line = verdict_line(name, figures, point.target_recall,
                        [printable(str(p)) for p in missed], unread, listed)
    record["verdict"] = line
    return record, line


def load(model: Path, device_name: str):
    """The classifier and its sealed operating point (predict's loader: digests and seals
    checked); refused in one line without a point."""
    import torch

    from stages.common.model.device import pick_device
    from stages.common.serving.classifiers import load_classifier

    device = pick_device(device_name)
    if model.suffix.lower() == ".onnx" and device_name == "auto":
        device = torch.device("cpu")  # ONNX Runtime's CPU build runs it
    classifier = load_classifier(model, device=device)
    if ALARM_LABEL not in classifier.meta.classes:
        raise StageError(f"{model}: its classes ({', '.join(classifier.meta.classes)}) hold no "
                         f"{ALARM_LABEL!r}, so it raises no person alarm")
    if classifier.operating_point is None:
        where = ("exported without one: export it again with `dvc repro export`"
                 if model.suffix.lower() == ".onnx" else
                 "none fitted for it beside it or from calibrate: run `dvc repro calibrate`")
        raise StageError(f"{model} has no operating point ({where}); the acceptance test "
                         "measures the alarm at the sealed operating point only")
    return classifier, classifier.operating_point


def header(model: Path, classifier, point: OperatingPoint, mode: str | None = None) -> dict:
    from stages.common.serving.predictor import shown

    return {"model": shown(model), "arch": classifier.meta.arch,
            "classes": classifier.meta.classes,
            "operating_point": {"source": shown(point.source), "threshold": point.threshold,
                                "threshold_log_odds": point.threshold_log_odds,
                                "temperature": point.temperature,
                                "target_recall": point.target_recall,
                                "point_sha256": point.point_sha256,
                                **({"mode": mode} if mode else {})},
            "counted_as": "each picture its own (one-sided 95 % Clopper-Pearson bounds)"}


def at_mode(point: OperatingPoint, mode: str | None) -> OperatingPoint:
    """The point that answers: its own, or with ``mode`` its camera mode's threshold (one line
    naming the modes there are otherwise). ``auto`` picks a threshold per picture, which a
    verdict over one set cannot state: refused in one line."""
    if mode is None:
        return point
    if mode == AUTO_MODE:
        raise StageError("--mode auto picks a threshold per picture (predict); an acceptance "
                         "test states one threshold: name the mode, e.g. --mode infrared for "
                         "a site set of a near-infrared camera's pictures, and measure each "
                         "camera's set at its own mode")
    return point.at_mode(mode)


def run(folders: list[Path], model: Path, batch_size: int, device: str,
        listed: str = "--json FILE lists all", mode: str | None = None) -> tuple[dict, int]:
    """Every site set measured: the JSON document and the exit code. Stops with one line per
    site set that cannot be measured (exit 2) before any picture is classified. ``listed``:
    where a line whose names are cut short sends the reader for all of them; ``mode``: the
    camera mode whose threshold answers (None: the point's own)."""
    seen: dict[Path, Path] = {}
    for folder in folders:
        first = seen.setdefault(folder.resolve(), folder)
        if first is not folder:
            raise ParamError(f"site set {folder} is given twice (as {first} too); give each "
                             "once")
    classifier, point = load(model, device)
    point = at_mode(point, mode)
    surveyed = [survey(folder, classifier.meta.classes) for folder in folders]
    problems = [line for _, lines in surveyed for line in lines]
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        raise SystemExit(UNMEASURED)
    from stages.common.serving.predictor import printable

    document = {**header(model, classifier, point, mode), "site_sets": {}}
    code = 0
    for site, _ in surveyed:
        if site.ignored:
            print(f"note: {plural(len(site.ignored), 'file')} in site set "
                  f"{printable(str(site.folder))} not counted (not a picture by name or "
                  f"content, or beside the class folders): "
                  f"{names([printable(str(p)) for p in site.ignored], listed)}",
                  file=sys.stderr)
        record, line = measure(classifier, site, point, batch_size, listed, mode)
        document["site_sets"][str(site.folder)] = record
        if "unmeasured" in record:
            print(f"error: {line}", file=sys.stderr)
            code = UNMEASURED
        else:
            print(line, flush=True)
            if record["unreadable"] and code == 0:
                code = SOME_UNREADABLE
    return document, code


NO_SITE_SET = ("no site set given: accept.folders in params.yaml is empty; list ImageFolder "
               "folders there, or run `python -m stages.accept FOLDER` (docs/acceptance.md)")


def stage() -> int:
    """The DVC stage: accept.folders -> metrics/accept.json."""
    clean_dead_leftovers()
    cfg = params.load().accept
    if not cfg.folders:
        write_json(ACCEPT_METRICS, {"site_sets": {}, "note": NO_SITE_SET})
        print(f"accept: {NO_SITE_SET}")
        return 0
    print("note: DVC does not track the pictures of accept.folders; after changing them, "
          "`dvc repro -f -s accept` measures them again", file=sys.stderr)
    document, code = run([Path(f) for f in cfg.folders], CHECKPOINT, cfg.batch_size,
                         cfg.device, f"{ACCEPT_METRICS} lists all")
    write_json(ACCEPT_METRICS, document)
    return code


@main_guard
def main(argv: list[str] | None = None) -> int:
    """``argv`` empty or None: the DVC stage; else the operator's command."""
    if not argv:
        return stage()
    args = parse_args(argv)
    from stages.common.serving.predictor import printable  # torch: not for the stage without sets

    document, code = run(args.folders, args.model, args.batch_size, args.device,
                         f"{printable(str(args.json))} lists all" if args.json else
                         "--json FILE lists all", args.mode)
    if args.json is not None:
        write_json(args.json, document)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
