"""Open Images-shaped test data for the benchmarks: pictures and a full-size detections.csv.

    python -m benchmarks.synth_openimages images /tmp/oi-bench --images 2000
    python -m benchmarks.synth_openimages csv /tmp/oi-big/labels/detections.csv --rows 14600000

``images`` writes an Open Images-style folder (``data/<ImageID>.jpg`` with longest side 1024,
``labels/detections.csv``, ``metadata/classes.csv``) whose boxes are of the classes in
params.yaml's ``data.labels``, so extract_crops runs on it unchanged.

``csv`` writes (at a path ending ``labels/detections.csv``, with ``metadata/classes.csv`` beside
``labels/``) a file shaped like the train split's box file (``oidv6-train-annotations-bbox.csv``,
which FiftyOne stores as ``labels/detections.csv``): 21 columns including the eight XClick
columns, sorted by ImageID, about 8 boxes per image, 600 classes with Open Images-like
frequencies (the person classes are about a quarter of all boxes). 14.6 M rows make about 2 GB.

Everything is drawn from a fixed seed, so two runs write the same files.
"""
from __future__ import annotations

import argparse
import multiprocessing
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import yaml

from stages.common.pictures.openimages import DETECTION_COLUMNS, write_classes, write_detections

ROOT = Path(__file__).resolve().parents[1]
LONG_SIDE = 1024
# The train split's box file has eight click columns after the Open Images ones.
XCLICK_COLUMNS = ["XClick1X", "XClick2X", "XClick3X", "XClick4X",
                  "XClick1Y", "XClick2Y", "XClick3Y", "XClick4Y"]
COLUMNS = DETECTION_COLUMNS + XCLICK_COLUMNS
N_CLASSES = 600
# Share of all boxes per wanted class name, roughly Open Images V6 train's (Person, Man, Woman
# and Car alone are ~20 %); the rest of the mass is spread over the other classes (Zipf).
WANTED_SHARE = {"Person": 0.085, "Man": 0.07, "Woman": 0.05, "Girl": 0.012, "Boy": 0.008,
                "Car": 0.02, "Bicycle": 0.003, "Motorcycle": 0.002, "Truck": 0.002,
                "Dog": 0.002, "Cat": 0.001, "Horse": 0.002, "Bird": 0.006}
DEFAULT_SHARE = 0.0005


def wanted_names() -> list[str]:
    labels = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]["labels"]
    return sorted(name for names in labels.values() for name in names)


def class_table() -> pd.DataFrame:
    """MID, DisplayName, share: the wanted names plus fillers up to N_CLASSES."""
    names = wanted_names()
    fillers = [f"Thing{i:03d}" for i in range(N_CLASSES - len(names))]
    mids = [f"/m/0{i:05x}" for i in range(N_CLASSES)]
    wanted = np.array([WANTED_SHARE.get(n, DEFAULT_SHARE) for n in names])
    zipf = 1.0 / np.arange(1, len(fillers) + 1)
    other = zipf / zipf.sum() * (1.0 - wanted.sum())
    return pd.DataFrame({"MID": mids, "DisplayName": names + fillers,
                         "share": np.concatenate([wanted, other])})


def classes_of(table: pd.DataFrame) -> dict[str, str]:
    return dict(zip(table["MID"], table["DisplayName"]))


def image_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.sort(np.char.mod("%016x", rng.integers(0, 2**63, n, dtype=np.int64)))


# ---------------------------------------------------------------------------- the big CSV

def boxes_frame(rng: np.random.Generator, ids: np.ndarray, mids: np.ndarray,
                share: np.ndarray) -> pd.DataFrame:
    n = len(ids)
    x = np.sort(rng.random((n, 2)), axis=1).round(6)
    y = np.sort(rng.random((n, 2)), axis=1).round(6)
    xclick = rng.random(n) < 0.7  # human-verified xclick boxes carry click points, others -1
    clicks = np.where(xclick[:, None], rng.random((n, 8)).round(6), -1.0)
    frame = pd.DataFrame({
        "ImageID": ids, "Source": np.where(xclick, "xclick", "activemil"),
        "LabelName": mids[rng.choice(len(mids), n, p=share)], "Confidence": 1,
        "XMin": x[:, 0], "XMax": x[:, 1], "YMin": y[:, 0], "YMax": y[:, 1]})
    for col, p in [("IsOccluded", 0.6), ("IsTruncated", 0.3), ("IsGroupOf", 0.06),
                   ("IsDepiction", 0.05), ("IsInside", 0.01)]:
        frame[col] = (rng.random(n) < p).astype(np.int8)
    for i, col in enumerate(XCLICK_COLUMNS):
        frame[col] = clicks[:, i]
    return frame


def write_big_csv(path: Path, rows: int, seed: int = 0, chunk_images: int = 120_000) -> None:
    """``rows`` boxes, ~8.4 per image, ImageID-sorted like the real file; written in chunks."""
    rng = np.random.default_rng(seed)
    table = class_table()
    mids, share = table["MID"].to_numpy(), table["share"].to_numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_classes(path.parent.parent, classes_of(table))  # the layout's metadata/classes.csv
    written = 0
    with path.open("w", newline="") as f:
        f.write(",".join(COLUMNS) + "\n")
        while written < rows:
            ids = image_ids(rng, chunk_images)
            per_image = rng.integers(1, 17, chunk_images)  # mean 8.5 boxes per image
            flat = np.repeat(ids, per_image)[: rows - written]
            boxes_frame(rng, flat, mids, share).to_csv(f, header=False, index=False,
                                                       lineterminator="\n")
            written += len(flat)


# ---------------------------------------------------------------------------- the pictures

def picture(seed: int, width: int, height: int) -> np.ndarray:
    """Smooth shapes plus fine texture: compresses like a photograph (~150-250 KB at q 90)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    img = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    fine = rng.normal(0, 10, (height, width, 1))
    return np.clip(img + fine, 0, 255).astype(np.uint8)


def picture_boxes(rng: np.random.Generator, image_id: str, mids: list[str]) -> list[dict]:
    """1-6 wanted boxes; side lengths log-uniform in [0.05, 0.95], a few flagged boxes."""
    rows = []
    for _ in range(int(rng.integers(1, 7))):
        w, h = np.exp(rng.uniform(np.log(0.05), np.log(0.95), 2))
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        rows.append({"ImageID": image_id, "Source": "xclick",
                     "LabelName": mids[int(rng.integers(len(mids)))], "Confidence": 1,
                     "XMin": round(x0, 6), "XMax": round(x0 + w, 6),
                     "YMin": round(y0, 6), "YMax": round(y0 + h, 6),
                     "IsOccluded": 0, "IsTruncated": 0, "IsGroupOf": int(rng.random() < 0.05),
                     "IsDepiction": int(rng.random() < 0.05), "IsInside": 0})
    return rows


def _write_picture(job: tuple[str, int, int, int]) -> None:
    path, seed, width, height = job
    cv2.imwrite(path, picture(seed, width, height), [cv2.IMWRITE_JPEG_QUALITY, 90])


def write_image_set(root: Path, n: int, seed: int = 0, workers: int = 2) -> None:
    rng = np.random.default_rng(seed)
    table = class_table()
    wanted = table[table["DisplayName"].isin(wanted_names())]
    ids = image_ids(rng, n)
    (root / "data").mkdir(parents=True, exist_ok=True)
    write_classes(root, classes_of(table))
    jobs, rows = [], []
    for i, image_id in enumerate(ids):
        short = int(rng.integers(576, 1024))  # Open Images: long side 1024, aspect 4:3 to 16:9
        width, height = (LONG_SIDE, short) if rng.random() < 0.75 else (short, LONG_SIDE)
        jobs.append((str(root / "data" / f"{image_id}.jpg"), seed * 1_000_003 + i, width, height))
        rows += picture_boxes(rng, str(image_id), wanted["MID"].tolist())
    write_detections(root, pd.DataFrame(rows))
    with multiprocessing.Pool(workers) as pool:
        pool.map(_write_picture, jobs, chunksize=16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    im = sub.add_parser("images", help="an Open Images-style folder of JPEGs")
    im.add_argument("root", type=Path)
    im.add_argument("--images", type=int, default=2000)
    im.add_argument("--workers", type=int, default=2)
    big = sub.add_parser("csv", help="a train-split-sized detections.csv")
    big.add_argument("path", type=Path)
    big.add_argument("--rows", type=int, default=14_600_000)
    args = ap.parse_args()
    if args.what == "images":
        write_image_set(args.root, args.images, workers=args.workers)
    else:
        write_big_csv(args.path, args.rows)


if __name__ == "__main__":
    main()
