"""The table that picks a model: every arch x format timed side by side on this machine.

    python -m benchmarks.model_table                  # default archs and formats, crops.size
    python -m benchmarks.model_table --archs resnet18 --formats pytorch onnx --threads 1 2

Formats: PyTorch eager (the checkpoint) and every export format of
stages.common.model.formats (fp32 ONNX, ONNX int8, OpenVINO fp16 and int8), each built by
export's own builder; the quantized ones calibrate on the calibration split (val without one,
never test) when its crops have the table's size, else on random crops.

One row per arch x format x thread count, each measured in a child process of its own, which
loads the model file the way predict does (stages.common.serving.classifiers.load_classifier,
with predict's ``--threads``) and reports:
  * ms/image at batch 1 and images/s at batch ``--batch`` (medians, stages.common.inference.speed,
    as evaluate and export time), on the quiet machine and with every core (or
    ``--load-cores``) kept busy decoding video (benchmarks/load.py), in three alternating rounds
    (the decoders paused between them): an edge box decodes its cameras on the cores the
    classifier runs on;
  * peak memory: the child's peak resident set (VmHWM), the runtime, its model and the
    timing batches; it includes the Python interpreter and whatever the loading path imports
    (torch, while classifiers.py imports it);
  * the model's size on disk (every file of it: an OpenVINO IR's .xml, .bin and sidecar);
  * the person-recall lower bound (one-sided 95 % Clopper-Pearson over test pictures, as
    evaluate states it) at calibrate's operating point, computed through that very file on the
    test split, for the arch of the trained checkpoint (``--checkpoint``, with its operating
    point and test split). Speed does not depend on the weights, so the other archs run at
    random initialisation and their recall column says ``not trained``.

Writes the table as Markdown and JSON (``--out``: benchmarks/model_table.{md,json}); the export
stage copies the shipped model's row (its arch, ``onnx``, its crop size) from the JSON into
metrics/export.json and the model card, and `python -m stages.report` plots recall lower bound
against ms/image from it. The figures are this machine's, at the time of the run: on a shared
machine rerun and compare ratios within one run, never across runs.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from stages.common.config.paths import (CALIBRATION_SPLIT, CHECKPOINT, MODEL_TABLE,
                                        OPERATING_POINT, SPLIT_MANIFEST, TEST_SPLIT, VAL_SPLIT)
from stages.common.infra.errors import ArgumentParser, ParamError, StageError, main_guard
from stages.common.config.archs import ARCH_NAMES

ROOT = Path(__file__).resolve().parents[1]
OPSET = 18  # params.yaml's export.opset
DEFAULT_ARCHS = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large",
                 "efficientnet_b0", "regnet_y_400mf", "convnext_tiny")
RUNS = 20  # timed batch-1 passes (batch N: a fifth, at least 3), each within BUDGET_S
BUDGET_S = 1.5  # seconds of timed passes per figure: a loaded PyTorch pass can take 0.5 s
ROUNDS = 3  # quiet and loaded alternate this many times within a row
NOT_TRAINED = "not trained"


@dataclass(frozen=True)
class Format:
    """One way of shipping a model: ``build(model, meta, checkpoint, folder) -> file``, the
    runtime that answers with that file (predict's, chosen by the file's suffix)."""
    runtime: str
    build: Callable


def _pytorch(model, meta, checkpoint: Path, folder: Path) -> Path:
    return checkpoint  # the train stage's checkpoint is the file predict loads


def _onnx_fp32(model, meta, checkpoint: Path, folder: Path) -> Path:
    from stages.common.config.formats import FORMATS as EXPORTED, ONNX_FP32
    from stages.common.model.onnx import export

    path = folder / EXPORTED[ONNX_FP32].file
    if not path.is_file():  # the other formats convert from it: once per arch
        export(model, meta, path, OPSET)  # the export stage's exporter, without a point
    return path


def calibration_batches(meta, checkpoint: Path) -> list:
    """What a quantized format calibrates on: the crops of the calibration split (val without
    one; never test), normalised for ``meta``, when they are of its size; else 16 random
    normal crops (an untrained arch's speed does not depend on them)."""
    import torch

    from stages.common.inference.batches import normalise
    from stages.common.inference.logits import checked_crops

    folder = CALIBRATION_SPLIT if CALIBRATION_SPLIT.is_dir() else VAL_SPLIT
    try:
        crops = checked_crops(folder, meta, checkpoint, torch.device("cpu"))
        return [normalise(crops.pixels, meta.mean, meta.std).contiguous().numpy()]
    except StageError:
        size = meta.image_size
        return [np.random.default_rng(0).standard_normal((16, 3, size, size), dtype=np.float32)]


def _converted(name: str) -> Callable:
    """The builder of export format ``name``: export's own (stages.common.model.formats.build),
    from the fp32 ONNX file."""
    def build(model, meta, checkpoint: Path, folder: Path) -> Path:
        from stages.common.model import formats

        source = _onnx_fp32(model, meta, checkpoint, folder)
        out = folder / formats.FORMATS[name].file
        formats.build(name, source, out, calibration_batches(meta, checkpoint)
                      if formats.FORMATS[name].calibrated else ())
        return out
    return build


def _formats() -> dict[str, Format]:
    """PyTorch eager, then every export format (stages.common.model.formats.FORMATS: a format
    added there is a column here)."""
    from stages.common.config.formats import FORMATS as EXPORTED, ONNX_FP32

    runtimes = {"onnxruntime": "ONNX Runtime", "openvino": "OpenVINO"}
    return {"pytorch": Format("PyTorch eager", _pytorch),
            **{name: Format(runtimes.get(f.runtime, f.runtime),
                            _onnx_fp32 if name == ONNX_FP32 else _converted(name))
               for name, f in EXPORTED.items()}}


FORMATS = _formats()


def machine() -> dict:
    """What the figures were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch

    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


# ------------------------------------------------------------------------- one row, in a child

def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MiB: Linux's VmHWM, the peak of this
    program's own memory. Not ``ru_maxrss``: Linux carries that across exec, so a child
    started by a parent of 1.4 GB reported 1.4 GB whatever it loaded."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def test_recall(classifier, point: dict, test_split: Path, manifest: Path) -> dict:
    """The alarm at ``point`` on the test split, answered by ``classifier`` (the file timed):
    evaluate's figures (stages.common.alarm.labelled.alarm_under, counted over pictures)."""
    import torch

    from stages.common.alarm.calibration import crop_pictures
    from stages.common.alarm.labelled import alarm_under
    from stages.common.alarm.point import OperatingPoint
    from stages.common.inference.logits import checked_crops

    point = OperatingPoint.parse(point)  # the sealed content, checked again in this process
    crops = checked_crops(test_split, classifier.meta, classifier.path, torch.device("cpu"))
    logits = np.concatenate([classifier.classify(crops.pixels[i:i + 64])
                             for i in range(0, len(crops), 64)])
    pictures, _ = crop_pictures(crops.paths, manifest)
    figures = alarm_under(logits, crops.targets.numpy(), classifier.meta.classes, point,
                          pictures)
    return {key: figures[key] for key in ("person_recall", "person_recall_lower_95",
                                          "persons", "persons_missed", "person_pictures",
                                          "person_pictures_missed", "false_alarms_per_1000")}


def measure_row(spec: dict) -> dict:
    """The figures of one row (the child's work): ``spec`` from :func:`row_spec`."""
    from benchmarks.load import Load
    from stages.common.inference.speed import figures_of, timed_seconds
    from stages.common.serving.classifiers import load_classifier

    classifier = load_classifier(Path(spec["file"]), threads=spec["threads"])
    size, n = spec["size"], spec["batch"]
    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, size, size), dtype=np.float32)
    batch = rng.standard_normal((n, 3, size, size), dtype=np.float32)
    phases = ["quiet"] + (["loaded"] if spec["load_cores"] else [])
    times: dict[str, tuple[list, list]] = {phase: ([], []) for phase in phases}
    # Quiet and loaded in turn, ROUNDS times: what else the machine runs drifts over a minute,
    # and alternating lets both columns see the same drift (their ratio is what to read).
    budget = spec["budget_s"] / ROUNDS
    load = Load(spec["load_cores"]).start() if spec["load_cores"] else None
    try:
        for _ in range(ROUNDS):
            for phase in phases:
                if load is not None and phase == "loaded":
                    load.resume()
                elif load is not None:
                    load.pause()
                ones, batches = times[phase]
                ones += timed_seconds(lambda: classifier.logits(one), spec["runs"],
                                      budget_s=budget)
                batches += timed_seconds(lambda: classifier.logits(batch),
                                         max(3, spec["runs"] // 5), budget_s=budget)
        frames = load.frames_per_s() if load is not None else None
    finally:
        if load is not None:
            load.stop()
    timed = {phase: figures_of(*times[phase], n) for phase in phases}
    if frames is not None:
        timed["loaded"]["load_frames_per_s"] = frames
    row = {**timed, "peak_rss_mb": peak_rss_mb()}  # before the test split is decoded
    if spec.get("point"):
        row["recall"] = test_recall(classifier, spec["point"], Path(spec["test_split"]),
                                    Path(spec["manifest"]))
    return row


def run_child(spec: dict) -> dict:
    """:func:`measure_row` in a fresh process: its own peak memory, no thread pool left over
    from another row; in predict's environment (its RUNTIME_ENV, unless already set here:
    ``OMP_WAIT_POLICY=ACTIVE python -m benchmarks.model_table`` times PyTorch spinning)."""
    from stages.predict import RUNTIME_ENV

    proc = subprocess.run([sys.executable, "-m", "benchmarks.model_table", "--row",
                           json.dumps(spec)], capture_output=True, text=True, cwd=ROOT,
                          env={**RUNTIME_ENV, **os.environ})
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise StageError(f"the row {spec['arch']} {spec['format']} "
                         f"{threads_text(spec['threads'])} threads "
                         f"failed ({last})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the table

def trained(checkpoint: Path | None):
    """(model, meta, operating point) of the trained checkpoint, or None where there is none
    (or its operating point is missing or not fitted for it: then no recall is stated)."""
    if checkpoint is None or not checkpoint.is_file():
        return None
    from stages.common.alarm.point import operating_point_for
    from stages.common.model.build import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    try:
        point = operating_point_for(checkpoint, OPERATING_POINT)
    except StageError as exc:
        print(f"note: {exc}; the table states no recall", file=sys.stderr)
        return None
    if not TEST_SPLIT.is_dir():
        print(f"note: {TEST_SPLIT} not found; the table states no recall", file=sys.stderr)
        return None
    return model, meta, point


def artifact_mb(name: str, file: Path) -> float:
    """The size of every file of the artifact (an OpenVINO IR: .xml, .bin and sidecar)."""
    from stages.common.config.formats import FORMATS as EXPORTED

    files = EXPORTED[name].paths(file) if name in EXPORTED else [file]
    return round(sum(f.stat().st_size for f in files) / 2 ** 20, 1)


def build_rows(args, folder: Path) -> list[dict]:
    from benchmarks.bench_inference import checkpoint as untrained_checkpoint

    have = trained(args.checkpoint)
    rows = []
    for arch in args.archs:
        use_trained = (have is not None and have[1].arch == arch
                       and have[1].image_size == args.size)
        where = folder / arch
        where.mkdir()
        if use_trained:
            model, meta, point = have
            checkpoint = where / "best.pt"
            shutil.copyfile(args.checkpoint, checkpoint)
        else:
            model, meta = untrained_checkpoint(arch, args.size, where)
            checkpoint, point = where / "best.pt", None
        params_m = round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
        for name in args.formats:
            print(f"{arch} {name}: building", file=sys.stderr, flush=True)
            file = FORMATS[name].build(model, meta, checkpoint, where)
            for threads in args.threads:
                spec = {"arch": arch, "format": name, "file": str(file), "threads": threads,
                        "size": args.size, "batch": args.batch, "runs": args.runs,
                        "budget_s": args.budget_s, "load_cores": args.load_cores,
                        "point": dict(point.content) if point else None, "test_split": str(TEST_SPLIT.resolve()),
                        "manifest": str(SPLIT_MANIFEST.resolve())}
                print(f"{arch} {name} {threads_text(threads)} threads: timing",
                      file=sys.stderr, flush=True)
                figures = run_child(spec)
                rows.append({"arch": arch, "format": name, "runtime": FORMATS[name].runtime,
                             "threads": threads, "size": args.size, "params_m": params_m,
                             "file_mb": artifact_mb(name, file),
                             "trained": point is not None,
                             "point_sha256": point.point_sha256 if point else None,
                             **figures})
    return rows


def threads_text(threads: int | None) -> str:
    return "default" if threads is None else str(threads)


def _ms(row: dict, when: str) -> str:
    return f"{row[when]['batch1_ms_per_image']:.2f}" if when in row else "-"


def _rate(row: dict, when: str) -> str:
    return f"{row[when]['batch_images_per_s']:.0f}" if when in row else "-"


def recall_text(row: dict) -> str:
    recall = row.get("recall")
    if not recall:
        return NOT_TRAINED
    caught = recall["person_pictures"] - recall["person_pictures_missed"]
    return f"{recall['person_recall_lower_95']} ({caught}/{recall['person_pictures']} pictures)"


def markdown(table: dict) -> str:
    m, rows = table["machine"], table["rows"]
    n = rows[0]["quiet"]["batch_size"] if rows else "N"
    head = (f"{rows[0]['size'] if rows else '?'} px, fp32 unless the format says otherwise; "
            f"{m['cpu']}, {m['cores']} cores; torch {m['torch']}, onnxruntime "
            f"{m['onnxruntime']}; {m['date']}. Loaded: {table['load_cores']} cores decoding "
            "720p JPEG frames (benchmarks/load.py). Recall: person-recall 95 % lower bound on "
            "test at the operating point, through that file.\n\n")
    lines = ["| arch | format | threads | file MB | peak RSS MB | batch 1 ms/image quiet | "
             "loaded | loaded / quiet | batch " + str(n) + " images/s quiet | loaded | "
             "recall lower bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        slower = (f"{r['loaded']['batch1_ms_per_image'] / r['quiet']['batch1_ms_per_image']:.1f}x"
                  if "loaded" in r else "-")
        lines.append(f"| {r['arch']} | {r['format']} | {threads_text(r['threads'])} | "
                     f"{r['file_mb']} | "
                     f"{r['peak_rss_mb']:.0f} | {_ms(r, 'quiet')} | {_ms(r, 'loaded')} | "
                     f"{slower} | {_rate(r, 'quiet')} | {_rate(r, 'loaded')} | "
                     f"{recall_text(r)} |")
    return head + "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None):
    ap = ArgumentParser(prog="python -m benchmarks.model_table",
                        description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=list(DEFAULT_ARCHS), metavar="ARCH",
                    help=f"default: {' '.join(DEFAULT_ARCHS)}")
    ap.add_argument("--formats", nargs="+", default=list(FORMATS), metavar="FORMAT",
                    help=f"of {', '.join(FORMATS)} (default all)")
    ap.add_argument("--threads", nargs="+", type=int, default=None, metavar="N",
                    help="CPU threads of the runtime, as predict's --threads (default: "
                         "predict's default, the runtime's own: one per physical core)")
    ap.add_argument("--size", type=int, default=None,
                    help="crop side in pixels (default: params.yaml's crops.size)")
    ap.add_argument("--batch", type=int, default=32, help="the batch of images/s (default 32)")
    ap.add_argument("--runs", type=int, default=RUNS, help=f"timed batch-1 passes ({RUNS})")
    ap.add_argument("--budget-s", type=float, default=BUDGET_S,
                    help=f"at most this many seconds of timed passes per figure ({BUDGET_S})")
    ap.add_argument("--load-cores", type=int, default=os.cpu_count() or 1,
                    help="cores kept busy for the loaded columns (default every core; 0: none)")
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT,
                    help=f"the trained checkpoint whose arch gets a recall (default "
                         f"{CHECKPOINT}, with {OPERATING_POINT} and {TEST_SPLIT})")
    ap.add_argument("--out", type=Path, default=MODEL_TABLE,
                    help=f"the JSON to write; the Markdown goes beside it (default {MODEL_TABLE})")
    args = ap.parse_args(argv)
    unknown = [a for a in args.archs if a not in ARCH_NAMES]
    if unknown:
        raise ParamError(f"--archs {' '.join(unknown)}: not an arch of the family table; "
                         f"expected some of {', '.join(ARCH_NAMES)}")
    unknown = [f for f in args.formats if f not in FORMATS]
    if unknown:
        raise ParamError(f"--formats {' '.join(unknown)}: unknown; expected some of "
                         f"{', '.join(FORMATS)}")
    if args.threads is None:
        from stages.common.serving.classifiers import DEFAULT_THREADS

        args.threads = [DEFAULT_THREADS]
    if args.size is None:
        from stages.common.config import params

        args.size = params.load().crops.size
    if (any(t is not None and t < 1 for t in args.threads) or args.size < 1 or args.batch < 1
            or args.runs < 1 or args.load_cores < 0 or args.budget_s <= 0):
        raise ParamError("--threads, --size, --batch and --runs must be >= 1, --load-cores >= 0 "
                         "and --budget-s > 0")
    return args


@main_guard
def main(argv: list[str] | None = None) -> None:
    if argv and argv[0] == "--row":  # the child: before any option check or import of torch
        print(json.dumps(measure_row(json.loads(argv[1]))))
        return
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="model-table-") as tmp:
        rows = build_rows(args, Path(tmp))
    from stages.predict import RUNTIME_ENV

    table = {"machine": machine(), "load_cores": args.load_cores,
             "environment": {**RUNTIME_ENV, **{k: os.environ[k] for k in RUNTIME_ENV
                                               if k in os.environ}},
             "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(table)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
