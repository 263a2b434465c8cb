"""The train stage end to end, this code against another revision's, on the same crops.

    python -m benchmarks.bench_train_stage --baseline c4da4ee --size 64 --crops 900 --epochs 3
    python -m benchmarks.bench_train_stage --baseline c4da4ee --size 224 --crops 300 --epochs 2 \\
        --trainable layer4 fc                                   # the report's recipe on the CPU

Writes a train and a val split of generated JPEG crops (photo-like, as extract_crops writes
them), checks out ``--baseline`` beside this tree (``git worktree``, removed afterwards), and
runs ``python -m stages.train`` of each tree on that split with the same params.yaml,
alternating, ``--runs`` times each. Prints each run's ``train_images_per_s``
(metrics/speed/train.json, metrics/train.json in a tree before that file: every crop of every
epoch over the stage's whole training time, validation included) and the medians' ratio. Both
trees must accept the same params.yaml (the keys of this one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.bench_train import write_crops
from tests.paramfile import merge

ROOT = Path(__file__).resolve().parents[1]


def run_stage(tree: Path, work: Path, threads: int | None) -> float:
    for out in ("data/model", "data/train_resume", "plots", "metrics"):
        shutil.rmtree(work / out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "DVC_NO_ANALYTICS": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=work, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"train of {tree} failed:\n{proc.stderr[-3000:]}")
    # metrics/speed/train.json since the timings left the scores; a baseline from before that
    # writes it into metrics/train.json (metrics/ is removed before each run: never a stale one)
    timings = work / "metrics/speed/train.json"
    return json.loads((timings if timings.is_file() else work / "metrics/train.json")
                      .read_text())["train_images_per_s"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--crops", type=int, default=900, help="train crops (val: a fifth)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="train.num_workers")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--trainable", nargs="+", default=["all"])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS (default: all)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-train-stage-") as tmp:
        tmp = Path(tmp)
        base = tmp / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.baseline],
                       cwd=ROOT, check=True)
        try:
            work = tmp / "work"
            write_crops(work / "data/split/train", args.crops, args.size)
            write_crops(work / "data/split/val", max(3, args.crops // 5), args.size)
            params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), {
                "model": {"arch": args.arch, "weights": "none",
                          "trainable": "all" if args.trainable == ["all"] else args.trainable},
                "train": {"epochs": args.epochs, "batch_size": args.batch, "patience": 100,
                          "num_workers": args.workers, "device": "cpu", "nproc": 1}})
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            rates: dict[str, list[float]] = {"baseline": [], "this": []}
            for _ in range(args.runs):  # alternate, so drift in the machine hits both alike
                rates["baseline"].append(run_stage(base, work, args.threads))
                rates["this"].append(run_stage(ROOT, work, args.threads))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT,
                           check=False)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"train stage, {args.arch}, {args.size} px, {args.crops} crops x {args.epochs} epochs, "
          f"batch {args.batch}, trainable {args.trainable}, {args.workers} workers, "
          f"threads {args.threads or 'all'}")
    for name, label in (("baseline", args.baseline), ("this", "this tree")):
        print(f"  {label:<12} {med[name]:7.1f} images/s  (runs: "
              f"{', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"  this / baseline: {med['this'] / med['baseline']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
