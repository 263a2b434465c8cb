"""Near-duplicate removal on one crowded picture: the grid-indexed greedy (stages.extract_crops.dedup,
what extract_crops runs) against the pairwise loop it replaced (tests/test_dedup.py keeps it as
the reference), same boxes, same answer checked.

    python -m benchmarks.bench_dedup                  # every case, both algorithms
    python -m benchmarks.bench_dedup --cases lattice tiny --skip-old 10000
                                                      # the old loop only up to 10,000 boxes

Cases, all boxes of one label on one picture, crops.dedup_iou 0.7 unless said:
  random      n boxes of 0.2-0.8 % of the picture's side, uniformly placed (few overlap)
  lattice     n equal squares stepped by 0.18 of their side: each overlaps its neighbours by
              IoU just under 0.7, so all are kept and each meets ~100 kept boxes: the densest
              set of kept boxes an attacker can make, the grid's worst case
  tiny        n boxes 1e-200 of the picture wide (their areas underflow): they skip the grid
              and are compared, vectorised, with every kept box (quadratic, the known limit)
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from stages.extract_crops import stage as extract_crops
from tests.test_dedup import frame_of, lattice, reference_duplicate_mask


def random_boxes(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0.01, 0.99, (n, 2))
    half = rng.uniform(0.001, 0.004, (n, 2))
    return np.column_stack([centres - half, centres + half])


def tiny_boxes(n: int) -> np.ndarray:
    y0 = np.arange(n) / n
    return np.column_stack([np.zeros(n), y0, np.full(n, 1e-200), y0 + 0.5 / n])


CASES = {
    "random": lambda n: random_boxes(n),
    "lattice": lambda n: lattice(n, 0.18, 0.5 / np.sqrt(n)),
    "tiny": tiny_boxes,
}


def timed(fn, frame: pd.DataFrame) -> tuple[float, pd.Series]:
    started = time.perf_counter()
    result = fn(frame, 0.7)
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--skip-old", type=int, default=None,
                        help="run the old pairwise loop only up to this many boxes")
    args = parser.parse_args()
    print(f"{'case':<8} {'boxes':>7} {'kept':>7} {'grid greedy':>12} {'pairwise (old)':>15} "
          f"{'speed-up':>9}")
    for case in args.cases:
        make = CASES[case]
        for n in args.sizes:
            frame = frame_of(make(n))
            new_s, new = timed(extract_crops.duplicate_mask, frame)
            if args.skip_old is not None and n > args.skip_old:
                old_text, ratio = "skipped", ""
            else:
                old_s, old = timed(reference_duplicate_mask, frame)
                assert new.tolist() == old.tolist(), f"{case} {n}: the answers differ"
                old_text, ratio = f"{old_s:.2f} s", f"{old_s / new_s:.0f}x"
            print(f"{case:<8} {n:>7,} {int((~new).sum()):>7,} {new_s:>10.2f} s {old_text:>15} "
                  f"{ratio:>9}", flush=True)


if __name__ == "__main__":
    main()
