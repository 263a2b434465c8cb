"""extract_crops against the decode floor and the report's plain loop; crops per second.

    python -m benchmarks.synth_openimages images /tmp/oi-bench --images 2000
    python -m benchmarks.bench_extract_crops /tmp/oi-bench --size 224 --workers 2

Measured side by side, in one run, on one Open Images-style folder:
  floor     every picture decoded once with cv2.imread (full size), ``--workers`` processes,
            timed inside this process; its crops/s is the stage's number of crops divided by
            this time
  floor_cmd the same decode as a whole command (``python -c``: interpreter start, ``import
            cv2``, the pool, the decode), timed like the stage, which is a whole command too
  naive     the report's method: pandas iterrows over the wanted boxes, one cv2.imread per box,
            cut, letterbox, imwrite, one process (on the first ``--naive-images`` pictures)
  stage     ``python -m stages.extract_crops`` end to end (process start, CSV, planning,
            cutting, manifest), crops.reduced_decode false, then true
Then how much the reduced-decode crops differ from the full-decode ones (mean absolute difference
per crop, in 0-255 levels; the geometry and the file list are identical).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from stages.common.pictures import crops, openimages

ROOT = Path(__file__).resolve().parents[1]


def _init() -> None:
    cv2.setNumThreads(1)  # as the stage's workers: parallelism from the processes only


def _decode(path: str) -> int:
    return cv2.imread(path, cv2.IMREAD_COLOR).shape[0]


def decode_floor(paths: list[str], workers: int) -> float:
    started = time.perf_counter()
    with multiprocessing.Pool(workers, initializer=_init) as pool:
        for _ in pool.imap_unordered(_decode, paths, chunksize=8):
            pass
    return time.perf_counter() - started


FLOOR_PROGRAM = """
import multiprocessing, os, sys
import cv2
def init():
    cv2.setNumThreads(1)
def decode(path):
    return cv2.imread(path, cv2.IMREAD_COLOR).shape[0]
if __name__ == "__main__":
    folder, workers = sys.argv[1], int(sys.argv[2])
    paths = sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".jpg"))
    with multiprocessing.Pool(workers, initializer=init) as pool:
        for _ in pool.imap_unordered(decode, paths, chunksize=8):
            pass
"""


def decode_floor_command(raw: Path, workers: int) -> float:
    """The decode floor as a program of its own, timed from outside like the stage."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", FLOOR_PROGRAM, str(raw / openimages.DATA_DIR),
                    str(workers)], check=True)
    return time.perf_counter() - started


def naive(raw: Path, out: Path, size: int, min_box_px: int, mids: dict[str, str],
          images: int) -> tuple[int, float]:
    """The report's data_fix.py loop: a row at a time, the picture read again for every box."""
    cv2.setNumThreads(1)
    started = time.perf_counter()
    frame = pd.read_csv(raw / openimages.DETECTIONS)
    frame = frame[frame["LabelName"].isin(mids)]
    keep = sorted(frame["ImageID"].unique())[:images]
    frame = frame[frame["ImageID"].isin(set(keep))]
    written = 0
    for i, row in frame.iterrows():
        image = cv2.imread(str(raw / openimages.DATA_DIR / f"{row['ImageID']}.jpg"))
        h, w = image.shape[:2]
        box = crops.pixel_box(row["XMin"], row["XMax"], row["YMin"], row["YMax"], w, h)
        cw, ch = crops.box_size(box)
        if cw < min_box_px or ch < min_box_px:
            continue
        canvas = crops.letterbox(crops.cut(image, box), size, np.random.default_rng(i))
        cv2.imwrite(str(out / f"{i}.jpg"), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
        written += 1
    return written, time.perf_counter() - started


def run_stage(raw: Path, work: Path, size: int, workers: int, reduced: bool) -> tuple[int, float]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["crops"].update(size=size, workers=workers, reduced_decode=reduced)
    (work / "data").mkdir(parents=True)
    (work / "data" / "raw").symlink_to(raw.resolve())
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "stages.extract_crops"], cwd=work, env=env, check=True,
                   stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    kept = len(pd.read_csv(work / "data" / "crops" / "manifest.csv"))
    return kept, seconds


def crop_differences(full: Path, reduced: Path) -> np.ndarray:
    """Mean |full - reduced| per crop, over the whole canvas and the 3 channels."""
    names = pd.read_csv(full / "manifest.csv")["crop"]
    assert names.equals(pd.read_csv(reduced / "manifest.csv")["crop"]), "crop lists differ"
    return np.array([np.abs(cv2.imread(str(full / n)).astype(np.int16)
                            - cv2.imread(str(reduced / n)).astype(np.int16)).mean()
                     for n in names])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", type=Path, help="an Open Images-style folder")
    ap.add_argument("--size", type=int, default=224, help="crops.size (report: 224)")
    ap.add_argument("--workers", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3, help="floor/stage runs (median)")
    ap.add_argument("--naive-images", type=int, default=400,
                    help="pictures for the naive loop (it is slow; its rate is per crop)")
    args = ap.parse_args()
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    min_box_px = params["crops"]["min_box_px"]
    classes = openimages.read_classes(args.raw / openimages.CLASSES)
    names = {n for ns in params["data"]["labels"].values() for n in ns}
    mids = {m: n for m, n in classes.items() if n in names}
    paths = sorted(str(p) for p in openimages.images_on_disk(args.raw).values())

    with tempfile.TemporaryDirectory(prefix="bench-crops-") as tmp:
        tmp = Path(tmp)
        for p in paths:  # warm the page cache so no contender pays for the disk
            Path(p).read_bytes()
        (tmp / "naive").mkdir()
        naive_n, naive_s = naive(args.raw, tmp / "naive", args.size, min_box_px, mids,
                                 args.naive_images)
        shutil.rmtree(tmp / "naive")
        runs: dict[str, list[float]] = {"floor": [], "floor_cmd": [], "full": [], "reduced": []}
        for r in range(args.repeats):  # alternated: this machine's speed drifts from run to run
            runs["floor"].append(decode_floor(paths, args.workers))
            runs["floor_cmd"].append(decode_floor_command(args.raw, args.workers))
            full_n, seconds = run_stage(args.raw, tmp / f"full{r}", args.size, args.workers,
                                        False)
            runs["full"].append(seconds)
            red_n, seconds = run_stage(args.raw, tmp / f"reduced{r}", args.size, args.workers,
                                       True)
            runs["reduced"].append(seconds)
        floor_s, cmd_s, full_s, red_s = (statistics.median(runs[k]) for k in (
            "floor", "floor_cmd", "full", "reduced"))
        diff = crop_differences(tmp / "full0" / "data" / "crops",
                                tmp / "reduced0" / "data" / "crops")

    rate = {"floor": full_n / floor_s, "naive": naive_n / naive_s,
            "full": full_n / full_s, "reduced": red_n / red_s}
    print(f"{len(paths)} pictures, {full_n} crops of {args.size} px, {args.workers} workers; "
          f"median of {args.repeats} runs: " + ", ".join(
              f"{k} {' / '.join(f'{s:.1f}' for s in v)} s" for k, v in runs.items()))
    print(f"  decode floor (cv2.imread once each) {floor_s:7.1f} s  {rate['floor']:7.1f} crops/s")
    print(f"  decode floor as a whole command     {cmd_s:7.1f} s  {full_n / cmd_s:7.1f} crops/s")
    print(f"  naive (iterrows, imread per box, 1 proc) {naive_n} crops in {naive_s:.1f} s  "
          f"{rate['naive']:7.1f} crops/s")
    print(f"  stage, reduced_decode false       {full_s:7.1f} s  {rate['full']:7.1f} crops/s")
    print(f"  stage, reduced_decode true        {red_s:7.1f} s  {rate['reduced']:7.1f} crops/s")
    print(f"ratios: full/naive {rate['full'] / rate['naive']:.2f}x, "
          f"reduced/naive {rate['reduced'] / rate['naive']:.2f}x, "
          f"floor time / full time {floor_s / full_s:.2f} (full is {full_s / floor_s:.2f}x floor),"
          f" reduced is {red_s / floor_s:.2f}x floor; against the whole-command floor: full "
          f"{full_s / cmd_s:.2f}x, reduced {red_s / cmd_s:.2f}x")
    changed = diff > 0
    print(f"reduced vs full decode: {int(changed.sum())} of {len(diff)} crops differ; "
          f"mean |diff| per crop (0-255): mean {diff.mean():.2f}, "
          f"p50 {np.median(diff):.2f}, p99 {np.percentile(diff, 99):.2f}, max {diff.max():.2f}")


if __name__ == "__main__":
    main()
