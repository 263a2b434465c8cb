"""The export formats side by side: ms per image at batch 1 on 1 and 2 threads, for the fp32 ONNX
file and every format built from it (stages.common.model.formats: ONNX int8, OpenVINO IR fp16 and
int8), and each one's file size.

    python -m benchmarks.bench_formats                      # the pipeline's data/export/model.onnx
    python -m benchmarks.bench_formats --model M.onnx --calibration DIR --rounds 5 --runs 40

The formats are built as export builds them (same builder, same calibration crops: calibrate's
split, here ``--calibration``) into a temporary folder, and loaded as predict loads them
(stages.common.serving.classifiers.load_classifier, so the digest and metadata checks run).
Every (format, threads) pair is timed in each round, in turn, ``--runs`` batch-1 passes a round
after a warm-up, so a load that comes and goes on a shared machine falls on all of them; the
figure is the median of every pass and its quartiles. Inputs: the calibration crops themselves
(speed does not depend on their values). Agreement with the fp32 file (top-1 on those crops)
is printed as a check that each runs the same model; export's re-certification on test is what
decides whether a format ships.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from stages.common.inference.batches import normalise
from stages.common.inference.logits import checked_crops
from stages.common.model.formats import CONVERTERS, FORMATS, ONNX_FP32, build
from stages.common.serving.classifiers import load_classifier


def calibration_crops(folder: Path, model: Path) -> np.ndarray:
    """The crops of a labelled split, normalised as the model's metadata says."""
    meta = load_classifier(model).meta
    crops = checked_crops(folder, meta, model, torch.device("cpu"))
    return normalise(crops.pixels, meta.mean, meta.std).contiguous().numpy()


def size_mb(path: Path, name: str) -> float:
    return sum(p.stat().st_size for p in FORMATS[name].paths(path)) / 2 ** 20


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, default=Path("data/export/model.onnx"))
    parser.add_argument("--calibration", type=Path, default=Path("data/split/calibration"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--runs", type=int, default=40, help="batch-1 passes per round")
    args = parser.parse_args(argv)

    crops = calibration_crops(args.calibration, args.model)
    with tempfile.TemporaryDirectory(prefix="bench-formats-") as tmp:
        paths = {ONNX_FP32: args.model}
        for name, row in FORMATS.items():
            if name not in CONVERTERS:
                continue
            paths[name] = Path(tmp) / row.file
            started = time.perf_counter()
            build(name, args.model, paths[name], [crops] if row.calibrated else ())
            print(f"built {name} in {time.perf_counter() - started:.1f} s")
        models = {(name, t): load_classifier(path, threads=t)
                  for name, path in paths.items() for t in args.threads}
        reference = models[(ONNX_FP32, args.threads[0])].logits(crops)
        agreement = {name: float((models[(name, args.threads[0])].logits(crops).argmax(1)
                                  == reference.argmax(1)).mean()) for name in paths}
        one = crops[:1]
        passes: dict = {key: [] for key in models}
        for _ in range(args.rounds):
            for key, model in models.items():
                for _ in range(3):
                    model.logits(one)  # warm-up: caches, the thread pool
                for _ in range(args.runs):
                    started = time.perf_counter()
                    model.logits(one)
                    passes[key].append((time.perf_counter() - started) * 1000)
        sizes = {name: size_mb(path, name) for name, path in paths.items()}

    base = {t: np.median(passes[(ONNX_FP32, t)]) for t in args.threads}
    print(f"\n{len(crops)} crops of {crops.shape[-1]} px from {args.calibration}; "
          f"{args.rounds} rounds x {args.runs} batch-1 passes per format and thread count")
    print(f"{'format':14s} {'MB':>6s} {'top-1 agr.':>10s}  " + "  ".join(
        f"{t} thread{'s' if t > 1 else ''}: ms/image (q1-q3), x fp32" for t in args.threads))
    for name in paths:
        cells = []
        for t in args.threads:
            q1, median, q3 = np.percentile(passes[(name, t)], [25, 50, 75])
            cells.append(f"{median:7.2f} ({q1:.2f}-{q3:.2f}), {base[t] / median:4.2f}x")
        print(f"{name:14s} {sizes[name]:6.1f} {agreement[name]:10.4f}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
