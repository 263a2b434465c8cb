"""predict on many photos: today's command against the edge runtime, side by side in one run.

    python -m benchmarks.bench_edge --edge-python /tmp/edge-venv/bin/python [--pictures 1440]

Runs, alternated ``--repeats`` times (medians reported, each run listed):

- ``today``: predict as it was before the edge runtime (``--baseline-ref``, default the commit
  before it: every ONNX answer after torch's imports, decode, preparation and ONNX Runtime one
  after another on one thread), extracted with ``git archive``, in this (the full) install;
- ``full``: this tree's predict in the full install (torch installed, not imported);
- ``edge``: this tree's predict in ``--edge-python``, a virtual environment of
  requirements-edge.txt alone (docs/using-the-model.md), fp32 and int8.

Each run is the whole command (``--format csv``, stdout read to the end): wall time, peak
memory (ru_maxrss of the process), the time to the JSON/CSV header (the model loaded and
verified: answering starts) and to the first answer. Start-up alone: the same on one picture,
and ``python -X importtime`` of that run (imports summed over the top-level ones).

The pictures are data/raw's JPEGs (real photos of the bundled sample, 320 px) scaled by
``--scale`` (default 2: 640 px, the size of a COCO photo) and re-encoded (quality 90), copied
to ``--pictures`` files. The fp32 model is ``--model`` (default data/export/model.onnx); the
int8 one is built from it as export builds ``model.int8.onnx`` (stages.common.model.formats:
ONNX Runtime's static quantization, QDQ, per-channel int8 weights, uint8 activations), on
``--calibration`` val crops, with the fp32 file's operating point.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# predict before the edge runtime: the last commit of main without it
BASELINE_REF = "dd3c4e7"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def make_pictures(out: Path, count: int, scale: float) -> list[Path]:
    sources = sorted((ROOT / "data/raw/data").glob("*.jpg"))
    if not sources:
        raise SystemExit("error: data/raw/data holds no JPEG; run `dvc repro download` (or "
                         "dvc checkout) first")
    out.mkdir(parents=True)
    encoded = []
    for path in sources:
        image = cv2.imread(str(path))
        if scale != 1:
            image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_CUBIC)
        encoded.append(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    files = []
    for i in range(count):
        files.append(out / f"{i:05d}.jpg")
        files[-1].write_bytes(encoded[i % len(encoded)])
    return files


def int8_model(fp32: Path, out: Path, calibration: int) -> None:
    """export's int8 artifact of ``fp32`` (stages.common.model.formats), calibrated on the
    first ``calibration`` val crops, with the fp32 file's operating point bound to it."""
    from stages.common.alarm.calibration import embedded
    from stages.common.model.formats import build
    from stages.common.model.onnx import POINT_KEY, verified_bytes
    from stages.common.serving.classifiers import OnnxClassifier, normalise_array
    from stages.common.serving.predictor import expand, prepared

    meta = OnnxClassifier(fp32).meta
    paths = [p for p, e in expand([ROOT / "data/split/val"]) if e is None][:calibration]
    pixels = np.stack([prepared(p, meta, 10**8) for p in paths])
    point = json.loads(verified_bytes(fp32)[1][POINT_KEY])
    build("onnx_int8", fp32, out, [normalise_array(pixels, meta.mean, meta.std)],
          point_for=lambda graph: embedded(point, graph))


def timed(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd``: wall seconds, seconds to the header line and to the first answer, peak RSS
    (MiB), CPU seconds (user + sys), exit code and the lines it wrote."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PROGRESS_EVERY_S"] = "1e9"
    with tempfile.TemporaryFile() as errors, \
            tempfile.NamedTemporaryFile("r") as peak:  # a file: -X importtime fills a pipe
        # GNU time measures the peak: this process's own rusage of a child it spawned counts
        # this (large) process's memory too, which exec inherits as the child's high-water mark
        cmd = ["/usr/bin/time", "-f", "%M", "-o", peak.name, *cmd]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=errors)
        header = first = None
        lines = []
        for line in proc.stdout:
            now = time.perf_counter() - start
            if header is None:
                header = now
            elif first is None:
                first = now
            lines.append(line)
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read()
        rss_kib = int(peak.read().split()[-1])
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return {"wall": wall, "header": header, "first": first, "rss_mib": rss_kib / 1024,
            "cpu": usage.ru_utime + usage.ru_stime,
            "code": proc.returncode, "lines": lines, "stderr": err.decode(errors="replace")}


def import_seconds(stderr: str) -> tuple[float, int]:
    """(seconds, modules) of a ``-X importtime`` log: top-level imports' cumulative times."""
    total, count = 0, 0
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            count += 1
            if len(m[3]) == 1:
                total += int(m[2])
    return total / 1e6, count


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--edge-python", type=Path, required=True,
                        help="python of a venv holding requirements-edge.txt only")
    parser.add_argument("--model", type=Path, default=ROOT / "data/export/model.onnx")
    parser.add_argument("--pictures", type=int, default=1440)
    parser.add_argument("--scale", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--skip-int8", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="bench-edge-"))
    try:
        baseline = work / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.baseline_ref,
                                  "stages"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        pictures = make_pictures(work / "pictures", args.pictures, args.scale)
        fp32 = args.model.resolve()
        models = {"fp32": fp32}
        print(f"CPU: {cpu_name()}, {os.cpu_count()} CPUs; load average "
              f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
        print(f"{len(pictures)} pictures (data/raw x {args.scale:g}, JPEG q90, "
              f"{sum(p.stat().st_size for p in pictures) / len(pictures) / 1e3:.0f} kB each), "
              f"model {fp32} ({fp32.stat().st_size / 2**20:.1f} MiB)")
        if not args.skip_int8:
            models["int8"] = work / "model.int8.onnx"
            int8_model(fp32, models["int8"], args.calibration)
            print(f"int8 model: stages.common.model.formats.build('onnx_int8'), "
                  f"{models['int8'].stat().st_size / 2**20:.1f} MiB")

        predict = ["-m", "stages.predict", str(work / "pictures"), "--format", "csv"]
        runs = {"today fp32": ([sys.executable, *predict, "--model", str(fp32)], baseline),
                "full fp32": ([sys.executable, *predict, "--model", str(fp32)], ROOT)}
        for name, model in models.items():
            runs[f"edge {name}"] = ([str(args.edge_python), *predict, "--model", str(model)],
                                    ROOT)
        results: dict[str, list[dict]] = {name: [] for name in runs}
        answers = {}
        for _ in range(args.repeats):
            for name, (cmd, cwd) in runs.items():
                r = timed(cmd, cwd)
                if r["code"] != 0:
                    raise SystemExit(f"{name} failed ({r['code']}): {r['stderr'][-2000:]}")
                answers.setdefault(name, r["lines"])
                results[name].append(r)
        same = answers["today fp32"] == answers["full fp32"] == answers["edge fp32"]
        print(f"answers of today, full and edge (fp32) identical: {same}")
        if "edge int8" in answers:
            a, b = ([line.split(b",")[1] for line in answers[k][1:]]
                    for k in ("edge fp32", "edge int8"))
            agree = sum(x == y for x, y in zip(a, b)) / len(a)
            print(f"int8 top label agrees with fp32 on {agree:.1%} of the pictures")

        base = statistics.median(r["wall"] for r in results["today fp32"])
        base_cpu = statistics.median(r["cpu"] for r in results["today fp32"])
        print(f"\n{'run':11s} {'wall s (median; each)':34s} {'vs today':>8s} {'CPU s':>6s} "
              f"{'vs today':>8s} {'header s':>8s} {'1st answer s':>12s} {'peak MiB':>8s}")
        for name, rs in results.items():
            wall = statistics.median(r["wall"] for r in rs)
            cpu = statistics.median(r["cpu"] for r in rs)
            each = " / ".join(f"{r['wall']:.2f}" for r in rs)
            print(f"{name:11s} {wall:6.2f} ({each}){'':{max(0, 26 - len(each))}s} "
                  f"{base / wall:7.2f}x {cpu:6.2f} {base_cpu / cpu:7.2f}x "
                  f"{statistics.median(r['header'] for r in rs):8.2f} "
                  f"{statistics.median(r['first'] for r in rs):12.2f} "
                  f"{max(r['rss_mib'] for r in rs):8.0f}")

        tenth = work / "tenth"
        tenth.mkdir()
        for path in pictures[:len(pictures) // 10]:
            os.link(path, tenth / path.name)
        print("\npeak memory against the number of files (MiB, one run each):")
        for name in results:
            cmd, cwd = runs[name]
            small = timed([cmd[0], *predict[:2], str(tenth), *cmd[4:]], cwd)
            print(f"{name:11s} {len(pictures) // 10:5d} files {small['rss_mib']:6.0f}   "
                  f"{len(pictures):5d} files {max(r['rss_mib'] for r in results[name]):6.0f}")

        one = str(pictures[0])
        print(f"\nstart-up on one picture ({args.repeats} alternated runs, medians): "
              "-X importtime's imports, time to the header (model verified and loaded: "
              "answering starts) and to the answer")
        starts = {"today fp32": runs["today fp32"], "full fp32": runs["full fp32"],
                  "edge fp32": runs["edge fp32"]}
        figures: dict[str, list] = {name: [] for name in starts}
        for _ in range(args.repeats):
            for name, (cmd, cwd) in starts.items():
                tail = ["-m", "stages.predict", one, "--format", "csv", "--model", str(fp32)]
                imports = import_seconds(timed([cmd[0], "-X", "importtime", *tail],
                                               cwd)["stderr"])
                r = timed([cmd[0], *tail], cwd)
                figures[name].append((*imports, r["header"], r["first"], r["cpu"]))
        for name, fs in figures.items():
            imp, mods, head, first, cpu = (statistics.median(f[i] for f in fs) for i in range(5))
            print(f"{name:11s} imports {imp:5.2f} s ({mods:.0f} modules), header "
                  f"{head:5.2f} s, answer {first:5.2f} s; CPU of the whole run {cpu:5.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
