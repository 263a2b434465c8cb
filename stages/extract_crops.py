"""Stage extract_crops: cut every wanted object out of data/raw/ into a labelled, square crop.

    python -m stages.extract_crops

Reads   data/raw/ (Open Images layout, see stages.common.openimages)
Writes  data/crops/<label>/<ImageID>_<k>.jpg   k = the box's index among the image's wanted boxes
        data/crops/manifest.csv                one row per crop, sorted by image_id, box_index
        metrics/crops.json                     what was seen, kept, and skipped for which reason
Params  seed, data.labels, crops.*

The report's data_fix.py, made deterministic: boxes of wanted classes in downloaded images,
sorted by ImageID; each image read once; each box cut, checked for size, scaled with its aspect
kept, padded with its corner colour and placed at a random spot (geometry in
stages.common.crops). Beyond the report, a box is skipped when it is a group of objects or a
depiction (when the params say so), or when a larger box of the same label in the same image
already covers it (one person boxed as both Person and Man must not become two crops).

Every box goes through the filters in this order, and is counted under the first reason that
stops it: invalid_box, group_of, depiction, duplicate, unreadable_image, too_small.
"""
from __future__ import annotations

import multiprocessing
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from stages.common import crops, openimages
from stages.common import params as P
from stages.common.atomic import atomic_dir, write_json
from stages.common.params import StageError

RAW = Path("data/raw")
OUT = Path("data/crops")
METRICS = Path("metrics/crops.json")
MANIFEST = "manifest.csv"
JPEG_QUALITY = 95

SKIP_REASONS = ["invalid_box", "group_of", "depiction", "duplicate", "unreadable_image",
                "too_small"]
BOX_COLUMNS = ["XMin", "XMax", "YMin", "YMax"]
ORIENTATION_TAG = 0x0112


@dataclass(frozen=True)
class Settings:
    seed: int
    labels: dict[str, list[str]]
    size: int
    min_box_px: int
    skip_group_of: bool
    skip_depiction: bool
    dedup_iou: float
    reduced_decode: bool
    workers: int


def read_settings(params: dict) -> Settings:
    labels = openimages.read_label_map(params)
    return Settings(
        seed=P.number(params, "seed", lo=0, integer=True),
        labels=labels,
        size=P.number(params, "crops.size", lo=8, integer=True),
        min_box_px=P.number(params, "crops.min_box_px", lo=1, integer=True),
        skip_group_of=P.flag(params, "crops.skip_group_of"),
        skip_depiction=P.flag(params, "crops.skip_depiction"),
        dedup_iou=P.number(params, "crops.dedup_iou", lo=0, hi=1, lo_open=True),
        reduced_decode=P.flag(params, "crops.reduced_decode"),
        workers=P.number(params, "crops.workers", lo=1, integer=True),
    )


# ---------------------------------------------------------------------------------------------
# Planning: which boxes to cut, decided from the CSVs alone (cheap, single process).

def load_boxes(raw: Path, settings: Settings, on_disk: dict[str, Path]) -> tuple[pd.DataFrame, int]:
    """Wanted-class boxes of images on disk, in canonical order, with label and box_index.

    Returns the frame and the number of wanted boxes whose image was not downloaded.
    Canonical order: ImageID, then the box coordinates, then class; it does not depend on the row
    order of detections.csv. box_index is the box's position within its image in that order, and
    names the crop file and seeds its placement.
    """
    classes = openimages.read_classes(raw / openimages.CLASSES)
    mid_label, mid_name = {}, {}
    for label, names in settings.labels.items():
        for mid, name in openimages.mids_for_names(classes, names, f"data.labels.{label}").items():
            mid_label[mid], mid_name[mid] = label, name
    frame = openimages.read_detections(raw / openimages.DETECTIONS, set(mid_label))
    present = frame["ImageID"].isin(on_disk.keys())
    missing = int((~present).sum())
    frame = frame[present].copy()
    frame["label"] = frame["LabelName"].map(mid_label)
    frame["class_name"] = frame["LabelName"].map(mid_name)
    frame = frame.sort_values(["ImageID", *BOX_COLUMNS, "LabelName"], kind="mergesort",
                              ignore_index=True)
    frame["box_index"] = frame.groupby("ImageID", sort=False).cumcount()
    return frame, missing


def duplicate_mask(frame: pd.DataFrame, threshold: float) -> pd.Series:
    """True for boxes that overlap a kept box of the same label in the same image (IoU >= t).

    Greedy, per (image, label): the largest box first (ties: lower box_index), each later box is
    dropped if it overlaps any box already kept. The largest box wins because the Person box of
    a body usually includes what a Man/Woman box of the same body trimmed off.
    """
    area = (frame["XMax"] - frame["XMin"]) * (frame["YMax"] - frame["YMin"])
    ordered = frame.assign(_area=area).sort_values(
        ["ImageID", "label", "_area", "box_index"], ascending=[True, True, False, True],
        kind="mergesort")
    # Plain Python over columns: a pandas groupby costs ~1 ms a group, minutes for 60k images.
    keys = list(zip(ordered["ImageID"], ordered["label"]))
    boxes = list(ordered[["XMin", "YMin", "XMax", "YMax"]].itertuples(index=False, name=None))
    dropped = []
    kept: list[tuple[float, float, float, float]] = []
    for pos, (idx, key, box) in enumerate(zip(ordered.index, keys, boxes)):
        if pos == 0 or key != keys[pos - 1]:
            kept = []
        if any(crops.iou(box, k) >= threshold for k in kept):
            dropped.append(idx)
        else:
            kept.append(box)
    return pd.Series(frame.index.isin(dropped), index=frame.index)


def pre_read_skips(frame: pd.DataFrame, settings: Settings) -> pd.Series:
    """The skip reason of every box decided before any image is read ('' = still a candidate)."""
    reason = pd.Series("", index=frame.index, dtype=object)
    coords = frame[BOX_COLUMNS]
    invalid = (coords.isna().any(axis=1) | (frame["XMax"] <= frame["XMin"])
               | (frame["YMax"] <= frame["YMin"]))
    reason[invalid] = "invalid_box"
    if settings.skip_group_of:
        reason[(reason == "") & (frame["IsGroupOf"] == 1)] = "group_of"
    if settings.skip_depiction:
        reason[(reason == "") & (frame["IsDepiction"] == 1)] = "depiction"
    candidates = reason == ""
    dup = duplicate_mask(frame[candidates], settings.dedup_iou)
    reason[dup[dup].index] = "duplicate"
    return reason


# ---------------------------------------------------------------------------------------------
# Cutting: one task per image, run in worker processes. A task carries everything it needs, so
# the result depends on the task alone, never on the worker or the order.

@dataclass(frozen=True)
class ImageTask:
    image_id: str
    path: str
    out_dir: str
    seed: int
    size: int
    min_box_px: int
    reduced_decode: bool
    boxes: tuple[tuple[int, str, float, float, float, float], ...]  # box_index, label, XMin..YMax


@dataclass(frozen=True)
class ImageResult:
    image_id: str
    readable: bool
    width: int
    height: int
    boxes: tuple[tuple[int, str, crops.PixelBox], ...]  # box_index, "kept" | "too_small", box


def crop_name(image_id: str, box_index: int) -> str:
    return f"{image_id}_{box_index}.jpg"


READ_FLAGS = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
              8: cv2.IMREAD_REDUCED_COLOR_8}
# EXIF orientations that turn the picture a quarter turn; OpenCV applies them when decoding.
QUARTER_TURNS = {5, 6, 7, 8}


def decode(path: str, factor: int = 1) -> np.ndarray | None:
    """The picture at 1/factor of its size, None when OpenCV cannot read it."""
    try:
        image = cv2.imread(path, READ_FLAGS[factor])
    except cv2.error:  # some malformed files raise instead of returning None
        return None
    return None if image is None or image.size == 0 else image


def header_size(path: str) -> tuple[int, int] | None:
    """(width, height) as cv2.imread would decode it, from the file's header alone."""
    try:
        with Image.open(path) as im:
            width, height = im.size
            turned = im.getexif().get(ORIENTATION_TAG) in QUARTER_TURNS
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # not a picture PIL knows: the decode decides whether it is unreadable
    return (height, width) if turned else (width, height)


def read_for_crops(task: ImageTask) -> tuple[np.ndarray | None, int, int, int]:
    """(picture, factor, full width, full height): decoded at 1/factor when every box allows it.

    The factor is chosen from the header's size and the boxes that will be cut, so it depends on
    the task alone. If the decoded size is not the header's reduced by the factor, the full-size
    decode is used instead: boxes are always placed on the true full-size geometry.
    """
    size = header_size(task.path) if task.reduced_decode else None
    if size is not None:
        cuts = [crops.box_size(crops.pixel_box(*b[2:], *size)) for b in task.boxes]
        factor = crops.reduce_factor([(cw, ch) for cw, ch in cuts
                                      if min(cw, ch) >= task.min_box_px], task.size)
        if factor > 1:
            image = decode(task.path, factor)
            if image is not None and image.shape[1::-1] == crops.reduced_shape(*size, factor):
                return image, factor, size[0], size[1]
    image = decode(task.path)
    if image is None:
        return None, 1, 0, 0
    return image, 1, image.shape[1], image.shape[0]


def process_image(task: ImageTask) -> ImageResult:
    """Read the picture once and write one JPEG per box that is big enough."""
    image, factor, width, height = read_for_crops(task)
    if image is None:
        return ImageResult(task.image_id, False, 0, 0, ())
    out = []
    for box_index, label, xmin, xmax, ymin, ymax in task.boxes:
        box = crops.pixel_box(xmin, xmax, ymin, ymax, width, height)
        cw, ch = crops.box_size(box)
        if cw < task.min_box_px or ch < task.min_box_px:
            out.append((box_index, "too_small", box))
            continue
        rng = crops.box_rng(task.seed, task.image_id, box_index)
        if factor == 1:
            canvas = crops.letterbox(crops.cut(image, box), task.size, rng)
        else:
            scaled = crops.scale_from_reduced(image, box, factor,
                                              crops.fit_size(cw, ch, task.size))
            canvas = crops.place(scaled, task.size, rng)
        ok, jpeg = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
            raise StageError(f"{task.path}: OpenCV could not encode crop {box_index} as JPEG")
        (Path(task.out_dir) / label / crop_name(task.image_id, box_index)).write_bytes(
            jpeg.tobytes())
        out.append((box_index, "kept", box))
    return ImageResult(task.image_id, True, width, height, tuple(out))


def make_tasks(frame: pd.DataFrame, on_disk: dict[str, Path], out_dir: Path,
               settings: Settings) -> list[ImageTask]:
    """One task per image, in ImageID order, its boxes in box_index order."""
    rows = frame[["ImageID", "box_index", "label", *BOX_COLUMNS]].itertuples(index=False,
                                                                              name=None)
    per_image: dict[str, list] = {}
    for image_id, box_index, label, *coords in rows:
        per_image.setdefault(image_id, []).append(
            (int(box_index), str(label), *(float(v) for v in coords)))
    return [ImageTask(str(image_id), str(on_disk[image_id]), str(out_dir), settings.seed,
                      settings.size, settings.min_box_px, settings.reduced_decode, tuple(boxes))
            for image_id, boxes in sorted(per_image.items())]


def _worker_init() -> None:
    # Parallelism comes from the processes; OpenCV's own threads would only oversubscribe cores.
    cv2.setNumThreads(1)


def run_tasks(tasks: list[ImageTask], workers: int) -> Iterator[ImageResult]:
    """Results in task order, with a progress bar on stderr (shown on a terminal only)."""
    bar = dict(total=len(tasks), desc="extract_crops", unit="img", file=sys.stderr,
               disable=None)
    if workers == 1 or len(tasks) <= 1:
        yield from tqdm(map(process_image, tasks), **bar)
        return
    # Small chunks keep the bar moving and the load even; larger ones cut pickling overhead.
    chunksize = max(1, min(32, len(tasks) // (workers * 16)))
    # forkserver, not fork: a process forked after OpenCV ran its thread pool (any caller that
    # resized an image first, e.g. the test suite) deadlocks in cv2.setNumThreads.
    context = multiprocessing.get_context("forkserver")
    with context.Pool(workers, initializer=_worker_init) as pool:
        yield from tqdm(pool.imap(process_image, tasks, chunksize=chunksize), **bar)


# ---------------------------------------------------------------------------------------------
# Reporting.

def apply_results(frame: pd.DataFrame, reason: pd.Series,
                  results: Iterable[ImageResult]) -> tuple[pd.DataFrame, pd.Series, int, int]:
    """Fold the workers' answers into the frame: pixel boxes, image size, final skip reasons."""
    position = {key: pos for pos, key in enumerate(zip(frame["ImageID"], frame["box_index"]))}
    geometry = np.full((len(frame), 6), -1, dtype=np.int64)  # x0 y0 x1 y1 width height
    final = reason.to_numpy(copy=True)
    seen = unreadable = 0
    for res in results:
        seen += 1
        if not res.readable:
            unreadable += 1
        for box_index, status, box in res.boxes:
            pos = position[(res.image_id, box_index)]
            geometry[pos] = (*box, res.width, res.height)
            if status != "kept":
                final[pos] = status
        if not res.readable:
            rows = (frame["ImageID"] == res.image_id).to_numpy() & (final == "")
            final[rows] = "unreadable_image"
    frame = frame.assign(**{col: geometry[:, i] for i, col in enumerate(
        ["x0", "y0", "x1", "y1", "image_width", "image_height"])})
    return frame, pd.Series(final, index=frame.index, dtype=object), seen, unreadable


def manifest(frame: pd.DataFrame) -> pd.DataFrame:
    kept = frame.copy()
    kept["crop"] = [f"{lab}/{crop_name(i, k)}" for lab, i, k in
                    zip(kept["label"], kept["ImageID"], kept["box_index"])]
    renamed = kept.rename(columns={
        "ImageID": "image_id", "LabelName": "label_mid", "XMin": "xmin", "XMax": "xmax",
        "YMin": "ymin", "YMax": "ymax", "IsOccluded": "is_occluded", "IsTruncated": "is_truncated",
        "IsGroupOf": "is_group_of", "IsDepiction": "is_depiction", "IsInside": "is_inside"})
    columns = ["crop", "label", "image_id", "box_index", "class_name", "label_mid",
               "xmin", "xmax", "ymin", "ymax", "x0", "y0", "x1", "y1", "image_width",
               "image_height", "is_occluded", "is_truncated", "is_group_of", "is_depiction",
               "is_inside"]
    return renamed[columns].sort_values(["image_id", "box_index"], kind="mergesort")


def summarise(settings: Settings, frame: pd.DataFrame, reason: pd.Series, *, on_disk: int,
              missing: int, seen: int, unreadable: int) -> dict:
    kept = reason == ""
    skipped = {r: int((reason == r).sum()) for r in SKIP_REASONS}
    return {
        "images_on_disk": on_disk,
        "images_with_wanted_boxes": int(frame["ImageID"].nunique()),
        "images_seen": seen,
        "images_unreadable": unreadable,
        "boxes_image_not_on_disk": missing,
        "boxes_considered": len(frame),
        "crops_kept": int(kept.sum()),
        "considered_per_label": {lab: int((frame["label"] == lab).sum())
                                 for lab in settings.labels},
        "kept_per_label": {lab: int((kept & (frame["label"] == lab)).sum())
                           for lab in settings.labels},
        "skipped": skipped,
    }


def check_labels(metrics: dict) -> None:
    for label, n in metrics["kept_per_label"].items():
        if n == 0:
            considered = metrics["considered_per_label"][label]
            raise StageError(
                f"label {label!r}: 0 crops kept of {considered} boxes (skipped: "
                + ", ".join(f"{r} {n}" for r, n in metrics["skipped"].items() if n)
                + "); add classes to data.labels, get more images, or lower crops.min_box_px")


@P.main_guard
def main() -> None:
    settings = read_settings(P.load())
    on_disk = openimages.images_on_disk(RAW)
    frame, missing = load_boxes(RAW, settings, on_disk)
    for label in settings.labels:
        if not (frame["label"] == label).any():
            raise StageError(f"label {label!r}: no boxes of classes {settings.labels[label]} in "
                             f"the downloaded images of {RAW}; add classes or download more")
    reason = pre_read_skips(frame, settings)
    with atomic_dir(OUT) as tmp:
        for label in settings.labels:
            (tmp / label).mkdir()
        tasks = make_tasks(frame[reason == ""], on_disk, tmp, settings)
        frame, reason, seen, unreadable = apply_results(
            frame, reason, run_tasks(tasks, settings.workers))
        metrics = summarise(settings, frame, reason, on_disk=len(on_disk), missing=missing,
                            seen=seen, unreadable=unreadable)
        check_labels(metrics)
        manifest(frame[reason == ""]).to_csv(tmp / MANIFEST, index=False, lineterminator="\n")
    write_json(METRICS, metrics)
    print(f"extract_crops: {metrics['crops_kept']} crops from {seen} images "
          f"({unreadable} unreadable) -> {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
