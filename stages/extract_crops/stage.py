"""Stage extract_crops: cut every wanted object out of data/raw/ into a labelled, square crop.

    python -m stages.extract_crops

Reads   data/raw/ (Open Images layout, see stages.common.pictures.openimages)
Writes  data/crops/<label>/<ImageID>_<k>.jpg   k = the box's index among the image's wanted boxes
        data/crops/manifest.csv                one row per crop, sorted by image_id, box_index
        metrics/crops.json                     what was seen, kept, and skipped for which reason
Params  seed, data.labels, crops.*

The report's data_fix.py, made deterministic: boxes of wanted classes in downloaded images,
sorted by ImageID; each image read once; each box cut, checked for size, scaled with its aspect
kept, padded with its corner colour and placed at a random spot (geometry in
stages.common.pictures.crops). Beyond the report, a box is skipped when it is a group of objects or
a depiction (when the params say so), or when a larger box of the same label in the same image
already covers it (one person boxed as both Person and Man must not become two crops).

Every box goes through the filters in this order, and is counted under the first reason that
stops it: box_not_finite, box_out_of_range, box_empty, duplicate_row, group_of, depiction,
duplicate, unreadable_image, too_small. Rows never considered are counted too: ImageIDs that are
not safe file names (never joined into a path), LabelNames absent from classes.csv, boxes whose
image is not on disk. An image that cannot be used is counted by reason (IMAGE_PROBLEMS) and its
boxes skipped; the stage goes on. docs/reliability.md lists every case and its test.

Orientation: Open Images boxes refer to the picture as stored, not as an EXIF Orientation tag
would turn it ("the degrees ... that the image and boxes should be rotated", Open Images'
rotation note, 2018-05-17), so pictures are decoded with the tag ignored.
"""
from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from stages.common.config import params
from stages.common.config.params import Params
from stages.common.config.paths import CROPS, CROPS_METRICS, RAW
from stages.common.infra.atomic import atomic_dir, clean_dead_leftovers, write_json
from stages.common.infra.errors import StageError, main_guard
from stages.common.infra.processes import die_with_parent
from stages.common.pictures import crops, decode as pictures, openimages
from stages.common.pictures.decode import IMAGE_PROBLEMS, Header
from stages.extract_crops.dedup import greedy_duplicates

MANIFEST = "manifest.csv"
JPEG_QUALITY = 95

SKIP_REASONS = ["box_not_finite", "box_out_of_range", "box_empty", "duplicate_row", "group_of",
                "depiction", "duplicate", "unreadable_image", "too_small"]
BOX_COLUMNS = openimages.BOX_COLUMNS
# Coordinates are fractions of the picture; this much rounding noise beyond [0, 1] is clipped.
RANGE_SLACK = 1e-6


# ---------------------------------------------------------------------------------------------
# Planning: which boxes to cut, decided from the CSVs alone (cheap, single process).

def load_boxes(raw: Path, cfg: Params,
               on_disk: dict[str, Path]) -> tuple[pd.DataFrame, dict[str, int]]:
    """Wanted-class boxes of images on disk, in canonical order, with label and box_index.

    Returns the frame and the counts of rows left out before any box is judged: all rows of
    detections.csv, rows whose LabelName classes.csv does not know, wanted rows whose ImageID
    is not a safe file name, wanted rows whose image is not on disk.
    Canonical order: ImageID, then the box coordinates, then class; it does not depend on the row
    order of detections.csv. box_index is the box's position within its image in that order, and
    names the crop file and seeds its placement.
    """
    classes = openimages.read_classes(raw / openimages.CLASSES)
    mid_label, mid_name = {}, {}
    for label, names in cfg.data.labels.items():
        for mid, name in openimages.mids_for_names(classes, names, f"data.labels.{label}").items():
            mid_label[mid], mid_name[mid] = label, name
    stats: dict[str, int] = {}
    frame = openimages.read_detections(raw / openimages.DETECTIONS, set(mid_label), stats,
                                       known=set(classes))
    # images_on_disk keeps safe file names only, so a present row's ID is safe: only the IDs of
    # absent rows need checking, to say why they are absent.
    present = frame["ImageID"].isin(on_disk.keys()).to_numpy(bool, na_value=False)
    absent = frame.loc[~present, "ImageID"].value_counts(dropna=False)
    unsafe = sum(n for image_id, n in absent.items()
                 if not openimages.is_safe_image_id(image_id))
    counts = {"detection_rows": stats["rows"], "rows_unknown_label": stats["rows_unknown_label"],
              "boxes_bad_image_id": int(unsafe),
              "boxes_image_not_on_disk": int(absent.sum()) - int(unsafe)}
    frame = frame[present].copy()
    frame["ImageID"] = frame["ImageID"].astype(object)
    frame["label"] = frame["LabelName"].map(mid_label)
    frame["class_name"] = frame["LabelName"].map(mid_name)
    frame = frame.sort_values(["ImageID", *BOX_COLUMNS, "LabelName"], kind="mergesort",
                              ignore_index=True)
    frame["box_index"] = frame.groupby("ImageID", sort=False).cumcount()
    return frame, counts


def duplicate_mask(frame: pd.DataFrame, threshold: float) -> pd.Series:
    """True for boxes that overlap a kept box of the same label in the same image (IoU >= t).

    Greedy, per (image, label): the largest box first (ties: lower box_index), each later box is
    dropped if it overlaps any box already kept. The largest box wins because the Person box of
    a body usually includes what a Man/Woman box of the same body trimmed off. Each box is
    compared only with the kept boxes that could reach the threshold (dedup.py), so
    10,000 boxes on one picture take about a second, not a minute.
    """
    area = (frame["XMax"] - frame["XMin"]) * (frame["YMax"] - frame["YMin"])
    ordered = frame.assign(_area=area).sort_values(
        ["ImageID", "label", "_area", "box_index"], ascending=[True, True, False, True],
        kind="mergesort")
    # Plain Python over columns: a pandas groupby costs ~1 ms a group, minutes for 60k images.
    keys = list(zip(ordered["ImageID"], ordered["label"]))
    boxes = list(ordered[["XMin", "YMin", "XMax", "YMax"]].itertuples(index=False, name=None))
    dropped = np.zeros(len(boxes), dtype=bool)
    start = 0
    for end in range(1, len(boxes) + 1):
        if end == len(boxes) or keys[end] != keys[start]:
            if end - start > 1:
                dropped[start:end] = greedy_duplicates(boxes[start:end], threshold)
            start = end
    return pd.Series(frame.index.isin(ordered.index[dropped]), index=frame.index)


def pre_read_skips(frame: pd.DataFrame, cfg: Params) -> pd.Series:
    """The skip reason of every box decided before any image is read ('' = still a candidate)."""
    reason = pd.Series("", index=frame.index, dtype=object)
    coords = frame[BOX_COLUMNS].to_numpy(dtype=float)
    finite = np.isfinite(coords).all(axis=1)
    with np.errstate(invalid="ignore"):
        outside = ((coords < -RANGE_SLACK) | (coords > 1 + RANGE_SLACK)).any(axis=1)
        empty = (coords[:, 1] <= coords[:, 0]) | (coords[:, 3] <= coords[:, 2])
    repeated = frame.duplicated(["ImageID", "LabelName", *BOX_COLUMNS]).to_numpy()
    for mask, name in [(~finite, "box_not_finite"), (outside, "box_out_of_range"),
                       (empty, "box_empty"), (repeated, "duplicate_row")]:
        reason[(reason == "") & mask] = name
    if cfg.crops.skip_group_of:
        reason[(reason == "") & (frame["IsGroupOf"] == 1)] = "group_of"
    if cfg.crops.skip_depiction:
        reason[(reason == "") & (frame["IsDepiction"] == 1)] = "depiction"
    candidates = reason == ""
    dup = duplicate_mask(frame[candidates], cfg.crops.dedup_iou)
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
    max_image_pixels: int
    boxes: tuple[tuple[int, str, float, float, float, float], ...]  # box_index, label, XMin..YMax


@dataclass(frozen=True)
class ImageResult:
    image_id: str
    problem: str  # "" when the picture was read, else one of IMAGE_PROBLEMS
    width: int
    height: int
    boxes: tuple[tuple[int, str, crops.PixelBox], ...]  # box_index, "kept" | "too_small", box
    exif_turned: bool = False  # it carries an EXIF Orientation other than 1 (ignored)

    @property
    def readable(self) -> bool:
        return not self.problem


def crop_name(image_id: str, box_index: int) -> str:
    return f"{image_id}_{box_index}.jpg"


def decode(data: bytes, factor: int = 1) -> np.ndarray | None:
    """The picture at 1/factor of its size as 8-bit BGR, the EXIF tag ignored (boxes refer to the
    stored picture, see the module's docstring); None when it does not decode."""
    try:
        return pictures.decode(data, factor, pictures.STORED, pictures.BGR, checked=True)
    except (pictures.Undecodable, cv2.error):  # some malformed files raise in OpenCV
        return None


# Bytes read before the rest of a picture file: every header the decoders read lies in them
# (a JPEG's EXIF and ICC segments before its size run to tens of kB).
HEAD_BYTES = 2**20


def read_for_crops(task: ImageTask) -> tuple[np.ndarray | None, str, Header | None, int]:
    """(picture, problem, header, factor): decoded at 1/factor when every box allows it.

    The factor is chosen from the header's size and the boxes that will be cut, so it depends on
    the task alone. If the decoded size is not the header's reduced by the factor, the full-size
    decode is used instead: boxes are always placed on the true full-size geometry.
    """
    try:
        with open(task.path, "rb") as f:
            data = f.read(HEAD_BYTES)
            if len(data) == HEAD_BYTES:  # more follows: a header that says too many pixels
                header = pictures.read_header(data)  # stops here (a 768 MB file was read whole)
                if header is not None and header.width * header.height > task.max_image_pixels:
                    return None, "too_many_pixels", header, 1
                f.seek(0)  # the whole file once: head + rest would hold it twice
                data = f.read()
    except OSError:
        return None, "decode_failed", None, 1
    header, problem = pictures.examine(data, task.max_image_pixels)
    if problem:
        return None, problem, header, 1
    size = (header.width, header.height)
    if task.reduced_decode:
        cuts = [crops.box_size(crops.pixel_box(*b[2:], *size)) for b in task.boxes]
        factor = crops.reduce_factor([(cw, ch) for cw, ch in cuts
                                      if min(cw, ch) >= task.min_box_px], task.size)
        if factor > 1:
            image = decode(data, factor)
            if image is not None and image.shape[1::-1] == crops.reduced_shape(*size, factor):
                return image, "", header, factor
    image = decode(data)
    if image is None:
        return None, "decode_failed", header, 1
    return image, "", header, 1


def process_image(task: ImageTask) -> ImageResult:
    """Read the picture once and write one JPEG per box that is big enough."""
    image, problem, header, factor = read_for_crops(task)
    turned = header.exif_turned if header is not None else False
    if image is None:
        return ImageResult(task.image_id, problem, 0, 0, (), turned)
    if factor == 1:
        height, width = image.shape[:2]
    else:
        width, height = header.width, header.height
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
    return ImageResult(task.image_id, "", width, height, tuple(out), turned)


def make_tasks(frame: pd.DataFrame, on_disk: dict[str, Path], out_dir: Path,
               cfg: Params) -> list[ImageTask]:
    """One task per image, in ImageID order, its boxes in box_index order."""
    rows = frame[["ImageID", "box_index", "label", *BOX_COLUMNS]].itertuples(index=False,
                                                                              name=None)
    per_image: dict[str, list] = {}
    for image_id, box_index, label, *coords in rows:
        per_image.setdefault(image_id, []).append(
            (int(box_index), str(label), *(float(v) for v in coords)))
    c = cfg.crops
    return [ImageTask(str(image_id), str(on_disk[image_id]), str(out_dir), cfg.seed,
                      c.size, c.min_box_px, c.reduced_decode, c.max_image_pixels, tuple(boxes))
            for image_id, boxes in sorted(per_image.items())]


def _worker_init(stage_pid: int, method: str) -> None:
    # Parallelism comes from the processes; OpenCV's own threads would only oversubscribe cores.
    cv2.setNumThreads(1)
    # Die with the stage (killed alone, e.g. by the OOM killer): a forked worker's parent is the
    # stage, a fork server's child's is the fork server, which exits with the stage.
    die_with_parent(stage_pid if method == "fork" else None)


def start_method(program: bool) -> str:
    """fork when the stage is the program, else forkserver.

    A process forked after OpenCV ran its thread pool deadlocks in cv2.setNumThreads, and any
    caller may have resized an image first (the test suite does, a notebook would): forkserver
    forks from a clean server instead. But the server imports this module again (about a
    second, paid before the first picture); as the program (`python -m stages.extract_crops`)
    the stage never runs OpenCV before its pool starts, so plain fork is safe and immediate.
    """
    return "fork" if program else "forkserver"


def run_tasks(tasks: list[ImageTask], workers: int, program: bool = False
              ) -> Iterator[ImageResult]:
    """Results in task order, with a progress bar on stderr (shown on a terminal only)."""
    bar = dict(total=len(tasks), desc="extract_crops", unit="img", file=sys.stderr,
               disable=None)
    if workers == 1 or len(tasks) <= 1:
        yield from tqdm(map(process_image, tasks), **bar)
        return
    # Small chunks keep the bar moving and the load even; larger ones cut pickling overhead.
    chunksize = max(1, min(32, len(tasks) // (workers * 16)))
    method = start_method(program)
    context = multiprocessing.get_context(method)
    # ProcessPoolExecutor, not multiprocessing.Pool: when a worker is killed (SIGKILL, the
    # out-of-memory killer), Pool never returns that worker's task and the stage hangs for good;
    # the executor raises BrokenProcessPool and the stage fails, leaving no data/crops.
    pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_worker_init,
                               initargs=(os.getpid(), method))
    try:
        yield from tqdm(pool.map(process_image, tasks, chunksize=chunksize), **bar)
    except BrokenProcessPool:
        raise StageError("a crop worker process died (killed, e.g. by the out-of-memory "
                         f"killer); nothing was written to {CROPS}; run the stage again, "
                         "with fewer crops.workers if memory is short") from None
    finally:  # on an error, drop the queued tasks and wait for the running ones only
        pool.shutdown(wait=True, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# Reporting.

@dataclass
class ImageCounts:
    seen: int = 0
    exif_turned: int = 0
    problems: dict[str, int] = field(default_factory=lambda: dict.fromkeys(IMAGE_PROBLEMS, 0))

    def add(self, res: ImageResult) -> None:
        self.seen += 1
        self.exif_turned += res.exif_turned
        if res.problem:
            self.problems[res.problem] += 1


def apply_results(frame: pd.DataFrame, reason: pd.Series, results: Iterable[ImageResult]
                  ) -> tuple[pd.DataFrame, pd.Series, ImageCounts]:
    """Fold the workers' answers into the frame: pixel boxes, image size, final skip reasons."""
    position = {key: pos for pos, key in enumerate(zip(frame["ImageID"], frame["box_index"]))}
    geometry = np.full((len(frame), 6), -1, dtype=np.int64)  # x0 y0 x1 y1 width height
    final = reason.to_numpy(copy=True)
    images = ImageCounts()
    for res in results:
        images.add(res)
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
    return frame, pd.Series(final, index=frame.index, dtype=object), images


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


def summarise(labels: dict[str, list[str]], frame: pd.DataFrame, reason: pd.Series, *, on_disk: int,
              rows: dict[str, int], images: ImageCounts) -> dict:
    kept = reason == ""
    skipped = {r: int((reason == r).sum()) for r in SKIP_REASONS}
    return {
        "images_on_disk": on_disk,
        "images_with_wanted_boxes": int(frame["ImageID"].nunique()),
        "images_seen": images.seen,
        "images_unreadable": sum(images.problems.values()),
        "images_unreadable_by_reason": images.problems,
        "images_exif_orientation_ignored": images.exif_turned,
        **rows,
        "boxes_considered": len(frame),
        "crops_kept": int(kept.sum()),
        "considered_per_label": {lab: int((frame["label"] == lab).sum())
                                 for lab in labels},
        "kept_per_label": {lab: int((kept & (frame["label"] == lab)).sum())
                           for lab in labels},
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


@main_guard
def main(program: bool = False) -> None:
    """``program``: the stage is the process's program (``python -m stages.extract_crops``)."""
    clean_dead_leftovers()
    cfg = params.load()
    labels = cfg.data.labels
    on_disk = openimages.images_on_disk(RAW)
    frame, rows = load_boxes(RAW, cfg, on_disk)
    for label in labels:
        if not (frame["label"] == label).any():
            raise StageError(f"label {label!r}: no boxes of classes {labels[label]} in "
                             f"the downloaded images of {RAW}; add classes or download more")
    reason = pre_read_skips(frame, cfg)
    with atomic_dir(CROPS) as tmp:
        for label in labels:
            (tmp / label).mkdir()
        tasks = make_tasks(frame[reason == ""], on_disk, tmp, cfg)
        frame, reason, images = apply_results(frame, reason, run_tasks(tasks, cfg.crops.workers,
                                                                     program))
        metrics = summarise(labels, frame, reason, on_disk=len(on_disk), rows=rows,
                            images=images)
        check_labels(metrics)
        manifest(frame[reason == ""]).to_csv(tmp / MANIFEST, index=False, lineterminator="\n")
    write_json(CROPS_METRICS, metrics)
    print(f"extract_crops: {metrics['crops_kept']} crops from {images.seen} images "
          f"({metrics['images_unreadable']} unreadable) -> {CROPS}", file=sys.stderr)

