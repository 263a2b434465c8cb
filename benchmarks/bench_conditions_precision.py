"""What lower-precision arithmetic would buy the conditions stage, and what it would cost its
figures: the suite's crops (clean and every condition x severity of ``conditions.measure``, made
as the stage makes them) through the sealed model on one thread, in fp32 (the stage's arithmetic)
and in bf16 (``torch.autocast``), side by side.

    python -m benchmarks.bench_conditions_precision               # the pipeline's data
    python -m benchmarks.bench_conditions_precision --rounds 3 --margins 0.1 0.25 0.5

Prints the CPU seconds of each (process time, median of ``--rounds``, alternating), how many
crops get another alarm decision or another top-1 answer in bf16 than in fp32, the largest logit
difference, and for each margin the share of crops whose bf16 answer lies that close (in raw
logit units) to the alarm's threshold or to a tie of the top two classes: the crops a bf16 pass
would have to recompute in fp32 to give the fp32 figures, and the CPU time that would then take.
BENCHMARKS.md section 8 holds a run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from stages.common.alarm.calibration import person_log_odds
from stages.common.alarm.point import operating_point_for
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL
from stages.common.config.paths import CHECKPOINT, OPERATING_POINT, TEST_SPLIT
from stages.common.inference.batches import normalise
from stages.common.inference.corrupted import corrupted_logits, crop_keys, host_pixels
from stages.common.inference.logits import checked_crops
from stages.common.model.build import load_checkpoint
from stages.conditions.measure import jobs_of


def suite_pixels(pixels: np.ndarray, keys: list[str], measure: dict[str, list[int]],
                 seed: int) -> np.ndarray:
    """The clean crops, then every crop under each (condition, severity), as the stage makes
    them (corrupted_logits with an identity classifier)."""
    corrupted = corrupted_logits(pixels, keys, jobs_of(measure), seed, lambda batch: batch,
                                 len(keys), 1)
    return np.concatenate([pixels, *corrupted])


def forward(model: torch.nn.Module, meta, pixels: np.ndarray, bf16: bool,
            batch_size: int) -> np.ndarray:
    rows = []
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(pixels), batch_size):
            batch = torch.from_numpy(pixels[start:start + batch_size]).permute(0, 3, 1, 2)
            rows.append(model(normalise(batch, meta.mean, meta.std)).float())
    return torch.cat(rows).numpy().astype(np.float64)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--margins", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5])
    args = parser.parse_args(argv)
    if args.rounds < 1 or any(m <= 0 for m in args.margins):
        parser.error("--rounds must be at least 1 and every --margins above 0")

    everything = params.load()
    cfg = everything.conditions
    model, meta = load_checkpoint(CHECKPOINT)
    model = model.eval().to(memory_format=torch.channels_last)
    point = operating_point_for(CHECKPOINT, OPERATING_POINT)
    crops = checked_crops(TEST_SPLIT, meta, CHECKPOINT, torch.device("cpu"), keep="host")
    keys = crop_keys(crops.paths)
    pixels = suite_pixels(host_pixels(crops), keys,
                          cfg.measure, everything.seed)

    torch.set_num_threads(1)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    logits: dict[bool, np.ndarray] = {}
    for _ in range(args.rounds):
        for bf16 in (False, True):
            start = time.process_time()
            logits[bf16] = forward(model, meta, pixels, bf16, cfg.batch_size)
            seconds[bf16].append(time.process_time() - start)
    fp32, bf16 = statistics.median(seconds[False]), statistics.median(seconds[True])

    person = meta.classes.index(ALARM_LABEL)
    odds = {b: person_log_odds(logits[b], point.temperature, person) for b in (False, True)}
    alarm_flips = int(((odds[False] >= point.threshold_log_odds)
                       != (odds[True] >= point.threshold_log_odds)).sum())
    top1_flips = int((logits[False].argmax(1) != logits[True].argmax(1)).sum())
    top2 = np.sort(logits[True], axis=1)[:, -2:]
    gap = top2[:, 1] - top2[:, 0]
    to_threshold = np.abs(odds[True] - point.threshold_log_odds) * point.temperature
    n = len(pixels)
    print(f"{n} crops ({len(keys)} test crops, clean and {n // len(keys) - 1} condition x "
          f"severity), batch {cfg.batch_size}, 1 thread, CPU seconds (median of "
          f"{args.rounds}): fp32 {fp32:.2f}, bf16 {bf16:.2f} ({fp32 / bf16:.2f}x)")
    print(f"bf16 against fp32: {alarm_flips} alarm decisions and {top1_flips} top-1 answers of "
          f"{n} differ; largest logit difference "
          f"{np.abs(logits[False] - logits[True]).max():.4f}")
    for margin in args.margins:
        near = (to_threshold < margin) | (gap < margin)
        print(f"margin {margin:g}: {near.mean():.1%} of crops to recompute in fp32 "
              f"(alarm {(to_threshold < margin).mean():.1%}, top-1 {(gap < margin).mean():.1%});"
              f" bf16 then fp32 for those: {bf16 + near.mean() * fp32:.2f} CPU s "
              f"({fp32 / (bf16 + near.mean() * fp32):.2f}x fp32)")


if __name__ == "__main__":
    main()
