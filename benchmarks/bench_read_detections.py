"""Reading a train-split-sized detections.csv: wall time and peak RSS of each reader.

    python -m benchmarks.synth_openimages csv /tmp/oi-big/labels/detections.csv   # 14.6 M rows, ~2 GB
    python -m benchmarks.bench_read_detections /tmp/oi-big/labels/detections.csv
    rm -r /tmp/oi-big

Each reader runs alone in a fresh process, so its peak RSS (getrusage ru_maxrss, which includes
the ~100 MB of Python + pandas) is its own:
  whole_file        pd.read_csv of everything, default dtypes (what a loader that keeps all boxes
                    in memory pays; FiftyOne's is OOM-killed on this file)
  read_detections   stages.common.pictures.openimages.read_detections with the wanted MIDs of
                    params.yaml (extract_crops)
  rows_for_images   stages.download.rows_for_images with 62,000 ImageIDs drawn from the file
                    (download's normalisation of a zoo download; the report's 62,000 images)
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from stages.common.pictures.openimages import CLASSES

ROOT = Path(__file__).resolve().parents[1]
READERS = ["whole_file", "read_detections", "rows_for_images"]


def wanted_mids(classes_csv: Path) -> set[str]:
    labels = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["labels"]
    names = {n for ns in labels.values() for n in ns}
    classes = pd.read_csv(classes_csv, header=None, names=["mid", "name"])
    return set(classes.loc[classes["name"].isin(names), "mid"])


def sample_image_ids(path: Path, n: int, out: Path) -> None:
    ids = pd.read_csv(path, usecols=["ImageID"], dtype=str)["ImageID"].unique()
    chosen = np.random.default_rng(0).choice(ids, size=min(n, len(ids)), replace=False)
    out.write_text("\n".join(sorted(chosen)))


def run_one(reader: str, path: Path, ids_file: Path) -> dict:
    """In this (fresh) process: run one reader, return rows, seconds and peak RSS."""
    sys.path.insert(0, str(ROOT))
    from stages.common.pictures.openimages import read_detections
    from stages.download.stage import rows_for_images

    started = time.perf_counter()
    if reader == "whole_file":
        frame = pd.read_csv(path)
    elif reader == "read_detections":
        frame = read_detections(path, wanted_mids(path.parent.parent / CLASSES))
    else:
        frame = rows_for_images(path, set(ids_file.read_text().split()))
    seconds = time.perf_counter() - started
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"reader": reader, "rows": len(frame), "seconds": round(seconds, 1),
            "peak_rss_mb": round(peak_kb / 1024), "frame_mb": round(
                frame.memory_usage(deep=True).sum() / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("csv", type=Path)
    ap.add_argument("--images", type=int, default=62_000)
    ap.add_argument("--readers", nargs="+", default=READERS, choices=READERS)
    ap.add_argument("--one", choices=READERS, help=argparse.SUPPRESS)  # the child's mode
    ap.add_argument("--ids", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.csv, args.ids)))
        return
    ids_file = args.csv.parent / "bench_image_ids.txt"
    if not ids_file.exists():
        sample_image_ids(args.csv, args.images, ids_file)
    size_gb = args.csv.stat().st_size / 1e9
    print(f"{args.csv}: {size_gb:.2f} GB")
    for reader in args.readers:
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_read_detections",
                              str(args.csv), "--one", reader, "--ids", str(ids_file)],
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"  {r['reader']:16s} {r['rows']:>10,} rows  {r['seconds']:6.1f} s  "
              f"peak RSS {r['peak_rss_mb']:>6,} MB  (frame {r['frame_mb']:,} MB)", flush=True)


if __name__ == "__main__":
    main()
