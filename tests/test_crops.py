"""Crop geometry (stages.common.pictures.crops) and the extract_crops stage on tiny hand-made
datasets."""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from stages.common.pictures import crops
from stages.extract_crops import stage as extract_crops
from tests import paramfile

CLASSES = {"/m/person": "Person", "/m/man": "Man", "/m/dog": "Dog", "/m/car": "Car",
           "/m/tree": "Tree"}
LABELS = {"person": ["Person", "Man"], "animal": ["Dog"], "object": ["Car"]}
MID = {name: mid for mid, name in CLASSES.items()}


# ---------------------------------------------------------------------------------------------
# Pure geometry

def test_pixel_box_rounds_edges_half_up_and_clips():
    assert crops.pixel_box(0.1, 0.5, 0.0, 1.0, 100, 50) == (10, 0, 50, 50)
    # 0.125 * 100 = 12.5 -> 13 (half up; banker's rounding would give 12)
    assert crops.pixel_box(0.125, 0.625, 0.25, 0.75, 100, 10) == (13, 3, 63, 8)
    assert crops.pixel_box(-0.2, 1.3, -1.0, 2.0, 40, 30) == (0, 0, 40, 30)


@pytest.mark.parametrize("cw,ch,size,expected", [
    (300, 100, 64, (64, 21)), (100, 300, 64, (21, 64)), (50, 50, 64, (64, 64)),
    (3, 1, 224, (224, 74)),       # float int(3 * (224/3)) would give 223
    (1000, 2, 64, (64, 1)),       # a 0-pixel side is bumped to 1
    (224, 224, 224, (224, 224)),
])
def test_fit_size(cw, ch, size, expected):
    assert crops.fit_size(cw, ch, size) == expected


def test_fit_size_keeps_aspect_within_rounding():
    rnd = random.Random(0)
    for _ in range(500):
        cw, ch, size = rnd.randint(1, 2000), rnd.randint(1, 2000), rnd.choice([32, 64, 224])
        nw, nh = crops.fit_size(cw, ch, size)
        assert max(nw, nh) == size and min(nw, nh) >= 1
        # The short side is the exact scaled value truncated (or 1): off by less than a pixel.
        exact_w, exact_h = cw * size / max(cw, ch), ch * size / max(cw, ch)
        assert 0 <= exact_w - nw < 1 or nw == 1
        assert 0 <= exact_h - nh < 1 or nh == 1


def test_fit_size_rejects_empty_crop():
    with pytest.raises(ValueError):
        crops.fit_size(0, 10, 64)


def test_corner_colour_is_truncated_per_channel_median():
    img = np.zeros((5, 7, 3), np.uint8)
    img[0, 0], img[0, -1] = (10, 20, 30), (50, 61, 70)
    img[-1, 0], img[-1, -1] = (200, 0, 0), (100, 100, 100)
    # medians: (50+100)/2=75, (20+61)/2=40.5 -> 40, (30+70)/2=50
    assert crops.corner_colour(img) == (75, 40, 50)


def _corner_marked(h: int, w: int) -> np.ndarray:
    img = np.full((h, w, 3), 128, np.uint8)
    img[0, 0], img[0, -1] = (0, 0, 0), (10, 10, 10)
    img[-1, 0], img[-1, -1] = (20, 30, 40), (90, 90, 90)
    return img


def test_place_puts_crop_inside_canvas_and_pads_with_corner_colour():
    scaled = _corner_marked(20, 64)
    canvas = crops.place(scaled, 64, crops.box_rng(1, "img", 0))
    rng = crops.box_rng(1, "img", 0)
    x, y = int(rng.integers(0, 0, endpoint=True)), int(rng.integers(0, 44, endpoint=True))
    assert canvas.shape == (64, 64, 3)
    assert np.array_equal(canvas[y:y + 20, x:x + 64], scaled)
    pad = np.ones((64, 64), bool)
    pad[y:y + 20, x:x + 64] = False
    assert pad.sum() == 64 * 44
    assert (canvas[pad] == (15, 20, 25)).all()  # medians of 0,10,20,90 / 0,10,30,90 / 0,10,40,90


def test_place_reaches_both_extremes_of_the_range():
    scaled = _corner_marked(10, 63)  # one free column: x must be 0 sometimes and 1 sometimes
    xs = set()
    for k in range(64):
        canvas = crops.place(scaled, 63 + 1, crops.box_rng(0, "a", k))
        xs.add(int(np.flatnonzero((canvas[:, :, 0] == 128).any(axis=0))[0]))
    assert xs == {0, 1}


def test_place_without_rng_centres():
    canvas = crops.place(_corner_marked(10, 20), 30, None)
    assert np.array_equal(canvas[10:20, 5:25], _corner_marked(10, 20))


def test_letterbox_keeps_aspect_and_size():
    cut = np.random.default_rng(0).integers(0, 256, (30, 90, 3), dtype=np.uint8)
    canvas = crops.letterbox(cut, 64, crops.box_rng(3, "x", 2))
    assert canvas.shape == (64, 64, 3) and canvas.dtype == np.uint8
    scaled = cv2.resize(cut, (64, 21))
    colour = crops.corner_colour(scaled)
    # Find the 21-row band holding the scaled crop: every other row is pure padding.
    bands = [y for y in range(64 - 21 + 1) if np.array_equal(canvas[y:y + 21], scaled)]
    assert len(bands) == 1
    rest = np.delete(canvas, range(bands[0], bands[0] + 21), axis=0)
    assert (rest == colour).all()


def test_box_rng_is_deterministic_and_differs_per_seed_image_and_box():
    def draw(*key):
        return crops.box_rng(*key).integers(0, 1_000_000, 4).tolist()

    assert draw(42, "abc", 3) == draw(42, "abc", 3)
    keys = [(42, "abc", 3), (43, "abc", 3), (42, "abd", 3), (42, "abc", 4)]
    assert len({tuple(draw(*k)) for k in keys}) == len(keys)


def test_iou():
    assert crops.iou((0, 0, 1, 1), (0, 0, 1, 1)) == 1.0
    assert crops.iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0
    assert crops.iou((0, 0, 2, 1), (1, 0, 3, 1)) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# The stage, on a dataset written into tmp_path

def write_params(root: Path, **crops_overrides) -> None:
    params = {"seed": 7, "data": {"labels": LABELS},
              "crops": {"size": 32, "min_box_px": 10, "skip_group_of": True,
                        "skip_depiction": True, "dedup_iou": 0.7, "reduced_decode": True,
                        "workers": 1}}
    params["crops"].update(crops_overrides)
    paramfile.write(root, params)


def textured(h: int, w: int, seed: int) -> np.ndarray:
    """A picture with structure, so crops of different boxes differ."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def box(image_id, name, xmin, xmax, ymin, ymax, group=0, depiction=0):
    return {"ImageID": image_id, "Source": "xclick", "LabelName": MID[name], "Confidence": 1,
            "XMin": xmin, "XMax": xmax, "YMin": ymin, "YMax": ymax, "IsOccluded": 0,
            "IsTruncated": 0, "IsGroupOf": group, "IsDepiction": depiction, "IsInside": 0}


def write_raw(root: Path, images: dict[str, np.ndarray | bytes], boxes: list[dict]) -> None:
    raw = root / "data" / "raw"
    for sub in ["data", "labels", "metadata"]:
        (raw / sub).mkdir(parents=True, exist_ok=True)
    for image_id, img in images.items():
        path = raw / "data" / f"{image_id}.jpg"
        if isinstance(img, bytes):
            path.write_bytes(img)
        else:
            assert cv2.imwrite(str(path), img)
    (raw / "metadata" / "classes.csv").write_text(
        "".join(f"{mid},{name}\n" for mid, name in CLASSES.items()))
    cols = list(box("x", "Person", 0, 1, 0, 1))
    lines = [",".join(cols)] + [",".join(str(b[c]) for c in cols) for b in boxes]
    (raw / "labels" / "detections.csv").write_text("\n".join(lines) + "\n")


def run_stage(root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    extract_crops.main()
    return json.loads((root / "metrics" / "crops.json").read_text())


def read_manifest(root: Path) -> list[dict]:
    import csv
    with (root / "data" / "crops" / "manifest.csv").open() as f:
        return list(csv.DictReader(f))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def basic_dataset() -> tuple[dict, list]:
    images = {f"img{i:02d}": textured(120 + 10 * i, 200 - 7 * i, i) for i in range(8)}
    boxes = []
    for i, image_id in enumerate(images):
        boxes += [box(image_id, "Person", 0.05, 0.45, 0.1, 0.9),
                  box(image_id, "Dog", 0.5, 0.95, 0.5, 0.95),
                  box(image_id, "Car", 0.1 + 0.01 * i, 0.8, 0.05, 0.4)]
    boxes.append(box("not_downloaded", "Dog", 0, 1, 0, 1))
    boxes.append(box("img00", "Tree", 0, 1, 0, 1))  # not a wanted class
    return images, boxes


def test_stage_writes_crops_manifest_and_metrics(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)

    rows = read_manifest(tmp_path)
    assert len(rows) == 24 == metrics["crops_kept"]
    assert metrics["kept_per_label"] == {"animal": 8, "object": 8, "person": 8}
    assert metrics["boxes_image_not_on_disk"] == 1
    assert metrics["images_seen"] == 8 and metrics["images_unreadable"] == 0
    assert metrics["boxes_considered"] == metrics["crops_kept"] + sum(metrics["skipped"].values())
    assert [(r["image_id"], int(r["box_index"])) for r in rows] == sorted(
        (r["image_id"], int(r["box_index"])) for r in rows)
    for row in rows:
        path = tmp_path / "data" / "crops" / row["crop"]
        assert row["crop"].startswith(row["label"] + "/")
        img = cv2.imread(str(path))
        assert img.shape == (32, 32, 3)
    person = next(r for r in rows if r["image_id"] == "img00" and r["label"] == "person")
    # 200 x 120 image: XMin 0.05 -> 10, XMax 0.45 -> 90, YMin 0.1 -> 12, YMax 0.9 -> 108
    assert (person["x0"], person["x1"], person["y0"], person["y1"]) == ("10", "90", "12", "108")
    assert person["class_name"] == "Person" and person["label_mid"] == "/m/person"
    files = sorted(p.relative_to(tmp_path / "data" / "crops").as_posix()
                   for p in (tmp_path / "data" / "crops").rglob("*.jpg"))
    assert files == sorted(r["crop"] for r in rows)


def test_crop_pixels_come_from_the_box(tmp_path, monkeypatch):
    img = np.full((112, 112, 3), (255, 0, 0), np.uint8)  # blue, with a red square inside
    # Red spans whole 16 px JPEG blocks around the box, so compression cannot bleed into it.
    img[16:96, 16:96] = (0, 0, 255)
    write_raw(tmp_path, {"a": img}, [box("a", "Person", 2 / 7, 4 / 7, 2 / 7, 5 / 7),
                                     box("a", "Dog", 0.0, 0.2, 0.0, 0.2),
                                     box("a", "Car", 0.8, 1.0, 0.8, 1.0)])
    write_params(tmp_path)
    run_stage(tmp_path, monkeypatch)
    crop = cv2.imread(str(tmp_path / "data" / "crops" / "person" / "a_1.jpg")).astype(int)
    # Box [32, 64) x [32, 80) and its corners are all red, so the whole canvas is red.
    assert np.abs(crop - (0, 0, 255)).max() <= 8


def test_same_bytes_with_one_or_two_workers_and_any_row_order(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    digests = []
    for name, workers, rows in [("one", 1, boxes), ("two", 2, boxes),
                                ("shuffled", 2, random.Random(1).sample(boxes, len(boxes)))]:
        root = tmp_path / name
        root.mkdir()
        write_raw(root, images, rows)
        write_params(root, workers=workers)
        run_stage(root, monkeypatch)
        digests.append((tree_digest(root / "data" / "crops"),
                        (root / "metrics" / "crops.json").read_bytes()))
    assert digests[0] == digests[1] == digests[2]
    assert len(digests[0][0]) == 25  # 24 crops + manifest


def test_seed_changes_positions(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    digests = []
    for seed in [1, 2]:
        root = tmp_path / str(seed)
        root.mkdir()
        write_raw(root, images, boxes)
        write_params(root)
        params = yaml.safe_load((root / "params.yaml").read_text())
        params["seed"] = seed
        (root / "params.yaml").write_text(yaml.safe_dump(params))
        run_stage(root, monkeypatch)
        digests.append(tree_digest(root / "data" / "crops"))
    assert digests[0].keys() == digests[1].keys()
    changed = [k for k in digests[0] if k.endswith(".jpg") and digests[0][k] != digests[1][k]]
    assert len(changed) > 12  # most crops have room to move; a square box may not


def test_skip_rules(tmp_path, monkeypatch):
    img = textured(100, 200, 0)
    write_raw(tmp_path, {"a": img}, [
        box("a", "Person", 0.0, 0.3, 0.0, 0.5),
        box("a", "Person", 0.5, 0.54, 0.0, 1.0),            # 8 px wide < 10: too small
        box("a", "Person", 0.5, 0.9, 0.0, 0.095),           # 9.5 -> 10 px tall: kept
        box("a", "Dog", 0.3, 0.6, 0.5, 1.0, group=1),
        box("a", "Dog", 0.6, 1.0, 0.5, 1.0),
        box("a", "Car", 0.0, 0.4, 0.5, 1.0, depiction=1),
        box("a", "Car", 0.6, 0.9, 0.1, 0.4),
        box("a", "Car", 0.5, 0.5, 0.1, 0.4),                # zero width: invalid
    ])
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["skipped"] == {"too_small": 1, "group_of": 1, "depiction": 1,
                                  "duplicate": 0, "box_empty": 1, "unreadable_image": 0,
                                  "box_not_finite": 0, "box_out_of_range": 0, "duplicate_row": 0}
    assert metrics["kept_per_label"] == {"animal": 1, "object": 1, "person": 2}

    write_params(tmp_path, skip_group_of=False, skip_depiction=False, min_box_px=8)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["skipped"]["too_small"] == 0
    assert metrics["kept_per_label"] == {"animal": 2, "object": 2, "person": 3}


def test_near_duplicates_of_one_label_become_one_crop(tmp_path, monkeypatch):
    img = textured(200, 200, 3)
    write_raw(tmp_path, {"a": img}, [
        box("a", "Person", 0.10, 0.40, 0.10, 0.90),   # one body boxed twice...
        box("a", "Man", 0.11, 0.40, 0.12, 0.88),      # ...as Person and as Man
        box("a", "Person", 0.60, 0.90, 0.10, 0.90),   # a second person
        box("a", "Dog", 0.10, 0.40, 0.10, 0.90),      # same place, other label: kept
        box("a", "Car", 0.0, 0.5, 0.0, 0.5),
    ])
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["skipped"]["duplicate"] == 1
    people = [r for r in read_manifest(tmp_path) if r["label"] == "person"]
    assert sorted(r["class_name"] for r in people) == ["Person", "Person"]  # the larger box won
    assert metrics["kept_per_label"] == {"animal": 1, "object": 1, "person": 2}


def test_unreadable_image_is_counted_not_fatal(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    images["img03"] = b"this is not a jpeg"
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path, workers=2)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["images_unreadable"] == 1 and metrics["images_seen"] == 8
    assert metrics["skipped"]["unreadable_image"] == 3
    assert metrics["crops_kept"] == 21
    assert not any(r["image_id"] == "img03" for r in read_manifest(tmp_path))


def test_label_with_nothing_kept_stops_with_one_line(tmp_path, monkeypatch, capsys):
    img = textured(100, 100, 0)
    write_raw(tmp_path, {"a": img}, [box("a", "Person", 0, 0.5, 0, 0.5),
                                     box("a", "Car", 0.5, 1, 0.5, 1),
                                     box("a", "Dog", 0.5, 0.55, 0.5, 0.55)])  # 5 px: too small
    write_params(tmp_path)
    (tmp_path / "data" / "crops").mkdir(parents=True)
    (tmp_path / "data" / "crops" / "old.txt").write_text("previous output")
    with pytest.raises(SystemExit) as exc:
        run_stage(tmp_path, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: label 'animal': 0 crops kept of 1 boxes") and "too_small 1" in err
    # Atomic: the previous output is untouched and no temporary is left behind.
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["crops", "raw"]
    assert (tmp_path / "data" / "crops" / "old.txt").exists()


def test_label_without_boxes_stops(tmp_path, monkeypatch, capsys):
    write_raw(tmp_path, {"a": textured(100, 100, 0)}, [box("a", "Person", 0, 0.5, 0, 0.5)])
    write_params(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    assert "label 'animal': no boxes of classes ['Dog']" in capsys.readouterr().err


@pytest.mark.parametrize("key,value,message", [
    ("dedup_iou", 0, "crops.dedup_iou=0"),
    ("workers", 0, "crops.workers=0"),
    ("skip_group_of", "yes", "crops.skip_group_of='yes'"),
    ("min_box_px", 2.5, "crops.min_box_px=2.5"),
])
def test_bad_params_fail_early(tmp_path, monkeypatch, capsys, key, value, message):
    write_params(tmp_path, **{key: value})
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)  # no data/raw at all: params are checked first
    assert message in capsys.readouterr().err


def test_class_under_two_labels_is_rejected(tmp_path, monkeypatch, capsys):
    write_params(tmp_path)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["data"]["labels"]["object"].append("Man")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    assert "class 'Man' is listed under both" in capsys.readouterr().err


def reference_place(scaled: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The report's padding, written plainly: np.median of the corners, a filled canvas."""
    nh, nw = scaled.shape[:2]
    x = int(rng.integers(0, size - nw, endpoint=True))
    y = int(rng.integers(0, size - nh, endpoint=True))
    xy = np.array([scaled[0, 0], scaled[0, -1], scaled[-1, 0], scaled[-1, -1]])
    canvas = np.empty((size, size) + scaled.shape[2:], dtype=scaled.dtype)
    canvas[...] = np.median(xy, axis=0).astype(int).astype(scaled.dtype)
    canvas[y:y + nh, x:x + nw] = scaled
    return canvas


def test_fast_place_is_pixel_identical_to_the_plain_one():
    rnd = np.random.default_rng(3)
    for i in range(400):
        h, w = (int(v) for v in rnd.integers(1, 33, 2))
        shape = (h, w, 3) if i % 3 else ((h, w, 1) if i % 2 else (h, w))
        scaled = rnd.integers(0, 256, shape, dtype=np.uint8)
        fast = crops.place(scaled, 32, np.random.default_rng(i))
        assert fast.shape == (32, 32) + shape[2:]
        assert np.array_equal(fast, reference_place(scaled, 32, np.random.default_rng(i)))
