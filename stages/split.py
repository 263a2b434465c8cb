"""Stage split: train / val / test by source image, stratified by label.

    python -m stages.split

Reads   data/crops/manifest.csv and the crops it lists
Writes  data/split/{train,val,test}/<label>/<crop>.jpg   (torchvision ImageFolder layout, copies;
                                                         calibration/ too if split.calibration > 0)
        data/split/manifest.csv                          crop, split, label, image_id, source
        metrics/split.json                               crops per split and label, images per split
Params  seed, split.test, split.val, split.calibration (fractions of ALL crops: 0.2 / 0.1 / 0.1
        -> train / val / calibration / test 60 / 10 / 10 / 20; the calibration share comes out
        of train)

Why by image: crops of one picture share lighting, background and often the same object boxed
twice; if they straddle train and test, the test score measures memory, not generalisation.
An image's crops can carry different labels, so whole images are assigned, and the fractions per
label are met as closely as whole images allow, by a seeded greedy apportionment:

  1. order the images: a seeded shuffle of the sorted ImageIDs, then (stable) by crop count,
     most crops first, so the hard-to-place multi-crop images go while every split still needs
     a lot and the single-crop images at the end fine-tune the totals;
  2. each split's target per label is fraction x label total, and its need starts there; each
     image goes to the split whose *relative* need (need / target), summed over the image's
     crops, is largest; the need then drops by the image's crops.

Relative need, not absolute: measured in crops, train (70 %) would take every big image until
its need fell to test's, and the test set would be all single-object pictures. In fractions of
their own targets the splits take turns, so crowded and simple scenes spread in proportion, and
a rare label weighs as much as a common one. For single-label images this is a highest-averages
apportionment per label: every split ends within about one image's crops of its target.
(sklearn's StratifiedGroupKFold only offers 1/k fractions and balances folds, not exact targets.)

Test is drawn first from all images, then val from the rest, then the calibration split (when
split.calibration > 0) from what is left: changing split.val or split.calibration never moves a
crop into or out of the test set, so evaluations stay comparable (and the calibration share
never moves val).
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.config import params
from stages.common.config.paths import CROPS, SPLIT_DIR, SPLIT_METRICS
from stages.common.infra.atomic import atomic_dir, clean_dead_leftovers, write_json
from stages.common.infra.errors import StageError, main_guard

MANIFEST = "manifest.csv"
SPLITS = ["train", "val", "test"]


def read_manifest(crops_dir: Path) -> pd.DataFrame:
    path = crops_dir / MANIFEST
    if not path.is_file():
        raise StageError(f"{path}: crop manifest not found; run the extract_crops stage first")
    frame = pd.read_csv(path, usecols=lambda c: c in {"crop", "label", "image_id"},
                        dtype=str, keep_default_na=False)
    missing = {"crop", "label", "image_id"} - set(frame.columns)
    if missing:
        raise StageError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    if frame.empty:
        raise StageError(f"{path}: lists no crops; nothing to split")
    absent = [c for c in frame["crop"] if not (crops_dir / c).is_file()]
    if absent:
        raise StageError(f"{crops_dir / absent[0]}: listed in {path} but missing "
                         f"({len(absent)} missing in all); rerun extract_crops")
    return frame.sort_values("crop", kind="mergesort", ignore_index=True)


def image_label_counts(frame: pd.DataFrame) -> pd.DataFrame:
    """Crops per (image, label): rows = ImageIDs sorted, columns = labels sorted."""
    counts = pd.crosstab(frame["image_id"], frame["label"])
    return counts.sort_index().reindex(sorted(counts.columns), axis=1)


def apportion(counts: pd.DataFrame, fractions: list[float], rng: np.random.Generator) -> np.ndarray:
    """Index into ``fractions`` for every row of ``counts`` (images x labels), greedily.

    See the module docstring. Ties (equal needs) go to the earlier part in ``fractions``.
    """
    c = counts.to_numpy(dtype=np.float64)
    target = np.outer(fractions, c.sum(axis=0))  # parts x labels
    need = target.copy()
    inv_target = 1.0 / np.maximum(target, 1e-9)
    order = rng.permutation(len(c))
    order = order[np.argsort(-c[order].sum(axis=1), kind="stable")]
    part = np.empty(len(c), dtype=np.int64)
    for i in order:
        row = c[i]
        choice = int(np.argmax((need * inv_target) @ row))
        part[i] = choice
        need[choice] -= row
    return part


def assign_splits(counts: pd.DataFrame, seed: int, test: float, val: float,
                  calibration: float = 0.0) -> pd.Series:
    """Split name per ImageID: test out of all images first, then val out of the rest, then
    (``calibration`` > 0) the calibration split out of what is left; each share is of ALL
    crops, each carve-out has its own random stream, so a later one never moves an earlier."""
    split = pd.Series("train", index=counts.index, dtype=object)
    rest, left = counts, 1.0
    for k, (name, share) in enumerate([("test", test), ("val", val),
                                       ("calibration", calibration)]):
        if share <= 0:
            continue
        taken = apportion(rest, [1.0 - share / left, share / left],
                          np.random.default_rng([seed, k])) == 1
        split[rest.index[taken]] = name
        rest, left = rest[~taken], left - share
    return split


def check_splits(frame: pd.DataFrame, splits: list[str]) -> None:
    labels = sorted(frame["label"].unique())
    for name in splits:
        part = frame[frame["split"] == name]
        if part.empty:
            raise StageError(f"split {name!r} is empty ({len(frame)} crops in all); "
                             "more data or a larger fraction for it in params.yaml split.*")
        for label in labels:
            if not (part["label"] == label).any():
                total = int((frame["label"] == label).sum())
                raise StageError(f"split {name!r} has no {label!r} crops ({total} in all); "
                                 "more data for that label or other split.* fractions")


def summarise(frame: pd.DataFrame, splits: list[str]) -> dict:
    labels = sorted(frame["label"].unique())
    totals = frame["label"].value_counts()
    crops, fraction, images = {}, {}, {}
    for name in splits:
        part = frame[frame["split"] == name]
        per_label = part["label"].value_counts()
        crops[name] = {lab: int(per_label.get(lab, 0)) for lab in labels}
        crops[name]["total"] = len(part)
        fraction[name] = {lab: round(per_label.get(lab, 0) / totals[lab], 4) for lab in labels}
        images[name] = int(part["image_id"].nunique())
    return {"crops": crops, "fraction": fraction, "images": images, "crops_total": len(frame)}


def copy_crops(frame: pd.DataFrame, crops_dir: Path, out: Path) -> None:
    for dest in sorted({str(Path(p).parent) for p in frame["crop"]}):
        (out / dest).mkdir(parents=True)
    for src, dest in zip(frame["source"], frame["crop"]):
        # copyfile: contents only, no timestamps or permissions to make reruns differ.
        shutil.copyfile(crops_dir / src, out / dest)


@main_guard
def main() -> None:
    clean_dead_leftovers()
    cfg = params.load()
    splits = SPLITS + (["calibration"] if cfg.split.calibration > 0 else [])
    frame = read_manifest(CROPS)
    split_of = assign_splits(image_label_counts(frame), cfg.seed, cfg.split.test, cfg.split.val,
                             cfg.split.calibration)
    frame = frame.rename(columns={"crop": "source"})
    frame["split"] = frame["image_id"].map(split_of)
    frame["crop"] = [f"{s}/{lab}/{Path(src).name}" for s, lab, src in
                     zip(frame["split"], frame["label"], frame["source"])]
    if frame["crop"].duplicated().any():
        dup = frame.loc[frame["crop"].duplicated(), "crop"].iloc[0]
        raise StageError(f"{CROPS / MANIFEST}: two crops would both become {dup}")
    check_splits(frame, splits)
    frame = frame[["crop", "split", "label", "image_id", "source"]].sort_values(
        "crop", kind="mergesort")
    with atomic_dir(SPLIT_DIR) as tmp:
        copy_crops(frame, CROPS, tmp)
        frame.to_csv(tmp / MANIFEST, index=False, lineterminator="\n")
    metrics = summarise(frame, splits)
    write_json(SPLIT_METRICS, metrics)
    print("split: " + ", ".join(f"{s} {metrics['crops'][s]['total']} crops / "
                                f"{metrics['images'][s]} images" for s in splits)
          + f" -> {SPLIT_DIR}", file=sys.stderr)


if __name__ == "__main__":
    main()
