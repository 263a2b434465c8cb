"""Is the default recipe good for every architecture, on every machine? A table over seeds,
thread counts and archs.

    python -m benchmarks.bench_recipe                       # 3 seeds x 2 thread counts x 3 archs
    python -m benchmarks.bench_recipe --seeds 42 --archs resnet50 --threads 2 -S train.lr=0.002

For each seed, a copy of the project under ``--work`` (default a temporary folder) runs the data
stages once (download, extract_crops, split: the sample, its crops and its split all follow
``seed``); then, for each thread count and arch, train and evaluate run as the stages do
(``python -m stages.<name>``, ``OMP_NUM_THREADS`` set: another thread count sums floats in
another order, as another CPU does). Prints one row per run and, per arch, the worst test
accuracy and person recall against the floors the project promises (``--min-accuracy``,
``--min-person-recall``); exits 1 when a run falls below a floor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tests.paramfile import merge
from tests.tiny_project import copy_project

DATA_STAGES = ["download", "extract_crops", "split"]
TRAIN_OUTPUTS = ["data/model", "data/train_resume", "plots/train", "plots/eval"]


def parse_override(text: str) -> dict:
    """``train.lr=0.002`` -> {"train": {"lr": 0.002}} (the value read as YAML, as dvc exp -S)."""
    key, _, value = text.partition("=")
    if not key or not _:
        raise SystemExit(f"-S {text!r}: expected key=value")
    out: dict = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = yaml.safe_load(value)
    return out


def run_stage(workdir: Path, stage: str, threads: int | None = None) -> float:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=workdir, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{stage} failed in {workdir}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started


def set_params(workdir: Path, over: dict) -> None:
    path = workdir / "params.yaml"
    values = merge(yaml.safe_load(path.read_text()), over)
    path.write_text(yaml.safe_dump(values, sort_keys=False))


def one_run(workdir: Path, arch: str, threads: int, overrides: dict) -> dict:
    for rel in TRAIN_OUTPUTS:
        shutil.rmtree(workdir / rel, ignore_errors=True)
    set_params(workdir, merge({"model": {"arch": arch}}, overrides))
    seconds = run_stage(workdir, "train", threads)
    run_stage(workdir, "evaluate", threads)
    ev = json.loads((workdir / "metrics/eval.json").read_text())
    tr = json.loads((workdir / "metrics/train.json").read_text())
    return {"accuracy": ev["accuracy"], "person_recall": ev["person_recall"],
            "macro_f1": ev["macro_f1"], "best_epoch": tr["best_epoch"],
            "epochs_run": tr["epochs_run"], "train_s": round(seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("-S", dest="overrides", action="append", default=[],
                        help="a params.yaml override, key=value (repeatable)")
    parser.add_argument("--min-accuracy", type=float, default=0.90)
    parser.add_argument("--min-person-recall", type=float, default=0.95)
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the project copies (default: a temporary one)")
    args = parser.parse_args(argv)
    overrides: dict = {}
    for text in args.overrides:
        merge(overrides, parse_override(text))

    work = args.work or Path(tempfile.mkdtemp(prefix="bench-recipe-"))
    rows = []
    print(f"{'seed':>5} {'threads':>7} {'arch':<9} {'accuracy':>8} {'person_recall':>13} "
          f"{'macro_f1':>8} {'best/run':>8} {'train_s':>7}", flush=True)
    try:
        for seed in args.seeds:
            workdir = copy_project(work / f"seed-{seed}", merge({"seed": seed}, overrides))
            for stage in DATA_STAGES:
                run_stage(workdir, stage)
            for threads in args.threads:
                for arch in args.archs:
                    r = {"seed": seed, "threads": threads, "arch": arch,
                         **one_run(workdir, arch, threads, overrides)}
                    rows.append(r)
                    print(f"{seed:>5} {threads:>7} {arch:<9} {r['accuracy']:>8.4f} "
                          f"{r['person_recall']:>13.4f} {r['macro_f1']:>8.4f} "
                          f"{r['best_epoch']:>3}/{r['epochs_run']:<4} {r['train_s']:>7}",
                          flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    failed = False
    print(f"\nper arch over {len(args.seeds)} seeds x {len(args.threads)} thread counts "
          f"(floors: accuracy {args.min_accuracy}, person recall {args.min_person_recall})")
    for arch in args.archs:
        mine = [r for r in rows if r["arch"] == arch]
        acc = [r["accuracy"] for r in mine]
        rec = [r["person_recall"] for r in mine]
        ok = min(acc) >= args.min_accuracy and min(rec) >= args.min_person_recall
        failed |= not ok
        print(f"  {arch:<9} accuracy {min(acc):.4f}-{max(acc):.4f} (mean {sum(acc) / len(acc):.4f})"
              f"  person recall {min(rec):.4f}-{max(rec):.4f}  {'ok' if ok else 'BELOW FLOOR'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
