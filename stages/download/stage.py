"""Stage ``download``: fill ``data/raw/`` in the Open Images V7 layout from one of three sources.

``data.source`` picks the source:

- ``sample``          draw a small synthetic dataset (sample_data.py); no network.
- ``open-images-v7``  FiftyOne's dataset zoo. Only this stage ever touches the network; a split
                      already complete under ``$FIFTYONE_DATASET_ZOO_DIR/open-images-v7/`` is
                      reused offline. zoo.py bounds every network wait by
                      ``data.zoo.timeout``, never takes a partly downloaded file for a whole
                      one, and makes the choice of images independent of what an interrupted
                      run left, so a rerun resumes and ends with the same ``data/raw``.
- ``mirror``          the Open Images-style folder ``data.mirror`` names (an offline copy); it
                      is a DVC dependency of this stage, so a change to its files reruns it.

The last two share one normalisation: keep the images that hold at least one box of a wanted
class, choose up to ``data.zoo.max_samples`` of them reproducibly, and copy those images with
ALL their boxes (any class: the crop stage needs them to judge overlaps) into ``data/raw/``.

Usage: ``python -m stages.download`` from the repository root.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from stages.common.config import params
from stages.common.config.params import Params, Zoo
from stages.common.config.paths import DOWNLOAD_METRICS, RAW
from stages.common.infra.atomic import atomic_dir, clean_dead_leftovers, write_json
from stages.common.infra.errors import ParamError, StageError, main_guard
from stages.common.pictures.openimages import (CLASSES, DATA_DIR, DETECTIONS, DETECTION_COLUMNS,
                                               FLAG_COLUMNS, csv_chunks, detection_columns,
                                               images_on_disk, mids_for_names, read_classes,
                                               refuse_link_out, write_classes, write_detections)
from stages.download import fiftyone_internals, sample_data, zoo

ZOO_NAME = "open-images-v7"
# Values for the optional detections.csv columns a mirror may lack (what the crop stage assumes).
COLUMN_DEFAULTS = {"Source": "", "Confidence": "1", **{c: "0" for c in FLAG_COLUMNS}}


# ---------------------------------------------------------------------------- writing the layout

def box_counts(rows: pd.DataFrame, labels: dict[str, list[str]],
               classes: dict[str, str]) -> dict[str, int]:
    """Boxes per label; boxes of classes in no label are counted under ``other``."""
    label_of_mid = {mid: label for label, names in labels.items()
                    for mid in mids_for_names(classes, names, "data.labels")}
    counts = rows["LabelName"].map(label_of_mid).fillna("other").value_counts()
    return {label: int(counts.get(label, 0)) for label in [*sorted(labels), "other"]}


# ---------------------------------------------------------------------------- source: sample

def check_sample_names(labels: dict[str, list[str]]) -> None:
    unknown = sample_data.unknown_names(labels)
    if unknown:
        raise ParamError(
            f"params.yaml: data.labels: class name(s) {', '.join(map(repr, unknown))} unknown to "
            "the sample generator, which draws these Open Images classes: "
            + ", ".join(sorted(sample_data.CATALOG)))


def write_sample(cfg: Params, out: Path) -> pd.DataFrame:
    """Draw the synthetic sample into ``out``; return its detections."""
    pictures = sorted(sample_data.generate(cfg.seed, cfg.data.labels, cfg.data.sample.images,
                                            cfg.data.sample.max_side),
                      key=lambda p: p.image_id)
    (out / DATA_DIR).mkdir(parents=True)
    records = []
    for pic in pictures:
        (out / DATA_DIR / f"{pic.image_id}.jpg").write_bytes(pic.jpeg)
        for b in pic.boxes:   # drawing order within a picture, as annotators' order in real files
            records.append([pic.image_id, "xclick", sample_data.CATALOG[b.name][0], "1",
                            f"{b.x0 / pic.width:.6f}", f"{b.x1 / pic.width:.6f}",
                            f"{b.y0 / pic.height:.6f}", f"{b.y1 / pic.height:.6f}",
                            b.occluded, 0, b.group_of, b.depiction, 0])
    rows = pd.DataFrame(records, columns=DETECTION_COLUMNS)
    write_detections(out, rows)
    write_classes(out, sample_classes())
    return rows


def sample_classes() -> dict[str, str]:
    return {mid: name for name, (mid, _) in sample_data.CATALOG.items()}


# ---------------------------------------------------------------------------- source: zoo

def network_errors() -> tuple[type[BaseException], ...]:
    """What the download raises when the network fails: requests' errors (and our short-body
    error) are OSErrors, FiftyOne's own fetches raise eta's WebSessionError, images come
    through boto3 / s3transfer."""
    import boto3.exceptions
    import botocore.exceptions
    import s3transfer.exceptions
    from eta.core.web import WebSessionError
    return (OSError, WebSessionError, botocore.exceptions.BotoCoreError,
            botocore.exceptions.ClientError, boto3.exceptions.Boto3Error,
            s3transfer.exceptions.RetriesExceededError)


def network_failure(exc: BaseException, zoo_cfg: Zoo) -> str:
    text = zoo.one_line(exc)
    if "timed out" in text.lower() or "timeout" in text.lower():
        text += f"; no answer within data.zoo.timeout ({zoo_cfg.timeout:g} s)"
    return text


def fetch_zoo(cfg: Params) -> tuple[list[Path], dict[Path, set[str]]]:
    """Download (or find complete) the wanted part of each split; return the split folders
    and, for each, the images FiftyOne chose.

    ``download_zoo_dataset`` needs no database (``load_zoo_dataset`` would also import the
    samples into MongoDB, which we do not use). FiftyOne drops unknown class names with only
    a warning, so they are checked first against the class list (12 KB), fetched into the
    first split's folder as FiftyOne would.
    """
    # Usage statistics would be a network call of their own; nothing here needs them.
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    import fiftyone as fo
    import fiftyone.zoo as foz

    zoo_dir = Path(fo.config.dataset_zoo_dir) / ZOO_NAME
    z = cfg.data.zoo
    errors = network_errors()
    with zoo.exclusive(zoo_dir), zoo.patched(zoo_dir, z.timeout) as session:
        zoo.tidy(zoo_dir, z.splits)
        classes_csv = zoo_dir / z.splits[0] / CLASSES
        try:
            session.ensure(classes_csv, fiftyone_internals.class_list_url())
        except errors as exc:
            raise StageError(f"{ZOO_NAME}: cannot get the class list ({network_failure(exc, z)}); "
                             "check the network, or use a local mirror (data.source: mirror)") from None
        mids_for_names(read_classes(classes_csv), cfg.data.class_names, "data.labels")
        # FiftyOne's max_samples is per split; normalise() then keeps max_samples in all.
        try:
            _, dataset_dir = foz.download_zoo_dataset(
                ZOO_NAME, splits=list(z.splits), label_types=["detections"],
                classes=cfg.data.class_names, max_samples=z.max_samples, seed=cfg.seed,
                shuffle=z.shuffle, num_workers=z.num_workers)
        except errors as exc:
            raise StageError(f"{ZOO_NAME}: download into {zoo_dir} failed "
                             f"({network_failure(exc, z)}); rerun to resume, or use a local mirror "
                             "(data.source: mirror)") from None
    roots = [Path(dataset_dir) / split for split in z.splits]
    chosen = {}
    for root in roots:
        ids = session.chosen.get(root.resolve())
        if ids is None:
            raise StageError(f"{root}: FiftyOne did not say which images it chose for this split")
        chosen[root] = set(ids)
    return roots, chosen


# ------------------------------------------------------------------- zoo and path: normalise

def check_root(root: Path) -> None:
    """An Open Images-style folder must have data/, labels/detections.csv, metadata/classes.csv,
    none of them reached through a symbolic link out of the folder."""
    if not root.is_dir():
        raise StageError(f"data.mirror: folder {str(root)!r} not found; give the path of an "
                         "Open Images-style folder (data/, labels/, metadata/)")
    for part, is_dir in ((Path(DATA_DIR), True), (DETECTIONS, False), (CLASSES, False)):
        path = root / part
        if not (path.is_dir() if is_dir else path.is_file()):
            raise StageError(f"{path}: not found; an Open Images-style folder has data/, "
                             f"{DETECTIONS} and {CLASSES}")
        refuse_link_out(root, part)


def rows_for_images(path: Path, image_ids: set[str]) -> pd.DataFrame:
    """The rows of ``detections.csv`` whose image is in ``image_ids``, values as written.

    Strings throughout so coordinates are copied, not reformatted; chunked, because the
    train split's file is 2 GB and only the rows of downloaded images are wanted.
    """
    usecols = detection_columns(path)
    chunks = [chunk[chunk["ImageID"].isin(image_ids)]
              for chunk in csv_chunks(path, usecols=usecols, dtype=str, keep_default_na=False)]
    rows = pd.concat(chunks, ignore_index=True) if chunks else pd.DataFrame(columns=usecols)
    for col, default in COLUMN_DEFAULTS.items():
        if col not in rows.columns:
            rows[col] = default
    return rows[DETECTION_COLUMNS]


def choose(candidates: list[str], max_samples: int, shuffle: bool, seed: int) -> list[str]:
    """Up to ``max_samples`` of the sorted ``candidates``: the first ones, or a seeded draw."""
    candidates = sorted(candidates)
    if shuffle:
        order = np.random.default_rng(seed).permutation(len(candidates))
        candidates = [candidates[i] for i in order]
    return sorted(candidates[:max_samples])


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs no space; across filesystems (or where links are refused) copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def normalise(roots: list[Path], cfg: Params, out: Path,
              only: dict[Path, set[str]] | None = None) -> tuple[pd.DataFrame, dict[str, str]]:
    """Copy the chosen images of ``roots`` with all their boxes into ``out``; see module doc.

    ``only`` (the zoo): per root, the images FiftyOne chose; others in the folder, left by
    runs with other params, are ignored, so ``data/raw`` depends on the params alone.
    """
    for root in roots:
        check_root(root)
    classes: dict[str, str] = {}
    for root in roots:
        classes.update(read_classes(root / CLASSES))
    wanted = mids_for_names(classes, cfg.data.class_names, str(roots[0] / CLASSES))
    files: dict[str, Path] = {}
    parts = []
    for root in roots:   # an ImageID in two splits: the first split listed wins
        on_disk = {i: f for i, f in images_on_disk(root).items()
                   if i not in files and (only is None or i in only[root])}
        files.update(on_disk)
        parts.append(rows_for_images(root / DETECTIONS, set(on_disk)))
    rows = pd.concat(parts, ignore_index=True)
    candidates = rows.loc[rows["LabelName"].isin(wanted), "ImageID"].unique().tolist()
    z = cfg.data.zoo
    chosen = choose(candidates, z.max_samples, z.shuffle, cfg.seed)
    if not chosen:
        raise StageError(f"{', '.join(map(str, roots))}: no downloaded image has a box of the "
                         "classes in data.labels")
    rows = rows[rows["ImageID"].isin(set(chosen))].sort_values("ImageID", kind="stable")
    (out / DATA_DIR).mkdir(parents=True)
    for image_id in chosen:
        link_or_copy(files[image_id], out / DATA_DIR / f"{image_id}.jpg")
    write_detections(out, rows)
    write_classes(out, classes)
    return rows, classes


# ---------------------------------------------------------------------------- main

def run(cfg: Params) -> dict:
    """Write ``data/raw`` for the settings; return the metrics."""
    source = cfg.data.source
    if source == "sample":
        check_sample_names(cfg.data.labels)
        with atomic_dir(RAW) as tmp:
            rows = write_sample(cfg, tmp)
            images = len(os.listdir(tmp / DATA_DIR))
        classes = sample_classes()
    else:
        if source == ZOO_NAME:
            roots, only = fetch_zoo(cfg)
        else:
            roots, only = [Path(cfg.data.mirror).expanduser()], None
        with atomic_dir(RAW) as tmp:
            rows, classes = normalise(roots, cfg, tmp, only)
            images = len(os.listdir(tmp / DATA_DIR))
    return {"source": source, "images": images,
            "boxes": int(len(rows)), "boxes_per_label": box_counts(rows, cfg.data.labels, classes)}


@main_guard
def main() -> None:
    clean_dead_leftovers()
    metrics = run(params.load())
    write_json(DOWNLOAD_METRICS, metrics)
    print(f"download: {metrics['images']} images, {metrics['boxes']} boxes "
          f"({metrics['boxes_per_label']}) from {metrics['source']} -> {RAW}")


if __name__ == "__main__":
    main()
