"""Reduced-scale decoding in extract_crops (crops.reduced_decode): same geometry, pixels within
the stated tolerance.

Tolerance (see BENCHMARKS.md): with the same boxes, a crop cut from the 1/f decode
  * is never further from an anti-aliased downscale of the full picture (cv2.INTER_AREA) than the
    full-decode crop is, plus AREA_SLACK levels (mean absolute difference, 0-255 scale);
  * differs from the full-decode crop by at most PHOTO_TOLERANCE[f] levels (mean absolute) on
    photo-like content (detail of 32 px and coarser at 1024 px). Finer detail than that is
    aliased by the full-decode path's bilinear shrink, so the two differ more there, by what the
    first rule bounds.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages.common.pictures import crops, decode as pictures
from tests.test_crops import box, read_manifest, run_stage, write_params, write_raw

AREA_SLACK = 0.5
PHOTO_TOLERANCE = {2: 1.0, 4: 1.5, 8: 3.5}


def picture(seed: int, detail_px: int, width: int = 1024, height: int = 768) -> np.ndarray:
    """Random colours upsampled smoothly: structure about ``detail_px`` pixels across."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // detail_px + 1, width // detail_px + 1, 3),
                         dtype=np.uint8)
    return cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC)


def as_jpeg_file(path: Path, image: np.ndarray) -> str:
    assert cv2.imwrite(str(path), image, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return str(path)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize("sizes,size,expected", [
    ([(448, 100), (300, 460)], 224, 2),   # both long sides >= 2 * 224
    ([(448, 100), (447, 10)], 224, 1),    # one crop shrinks less than 2x
    ([(1024, 700)], 64, 8),               # capped at 1/8, libjpeg's smallest scale
    ([(300, 20), (20, 256)], 64, 4),
    ([], 64, 1),
])
def test_reduce_factor(sizes, size, expected):
    assert crops.reduce_factor(sizes, size) == expected


def test_reduced_shape_matches_what_libjpeg_decodes(tmp_path):
    path = as_jpeg_file(tmp_path / "odd.jpg", picture(0, 32, 1021, 767))
    for factor in (2, 4, 8):
        decoded = pictures.decode(Path(path).read_bytes(), factor)
        assert decoded.shape[1::-1] == crops.reduced_shape(1021, 767, factor)


@pytest.mark.parametrize("detail_px", [8, 16, 32])
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_scaled_crop_is_within_tolerance(tmp_path, factor, detail_px):
    size = 64
    path = as_jpeg_file(tmp_path / "p.jpg", picture(detail_px, detail_px))
    data = Path(path).read_bytes()
    full, reduced = pictures.decode(data), pictures.decode(data, factor)
    rng = np.random.default_rng(factor)
    for _ in range(6):
        w, h = rng.uniform(factor * size / 768 * 1.01, 0.95, 2)
        x0, y0 = rng.uniform(0, 1 - w), rng.uniform(0, 1 - h)
        bx = crops.pixel_box(x0, x0 + w, y0, y0 + h, 1024, 768)
        cw, ch = crops.box_size(bx)
        assert crops.reduce_factor([(cw, ch)], size) >= factor
        scaled_size = crops.fit_size(cw, ch, size)
        from_full = cv2.resize(crops.cut(full, bx), scaled_size)
        from_reduced = crops.scale_from_reduced(reduced, bx, factor, scaled_size)
        reference = cv2.resize(crops.cut(full, bx), scaled_size, interpolation=cv2.INTER_AREA)
        assert from_reduced.shape == from_full.shape
        assert (mean_abs(from_reduced, reference)
                <= mean_abs(from_full, reference) + AREA_SLACK)
        if detail_px >= 32:
            assert mean_abs(from_reduced, from_full) <= PHOTO_TOLERANCE[factor]


def crops_digest(root: Path) -> dict[str, np.ndarray]:
    return {r["crop"]: cv2.imread(str(root / "data" / "crops" / r["crop"]))
            for r in read_manifest(root)}


def test_stage_geometry_is_identical_and_pixels_within_tolerance(tmp_path, monkeypatch):
    images = {f"p{i}": picture(100 + i, 32) for i in range(3)}
    boxes = []
    for image_id in images:
        boxes += [box(image_id, "Person", 0.05, 0.60, 0.05, 0.95),   # shrunk > 8x at 64 px
                  box(image_id, "Dog", 0.55, 0.95, 0.50, 0.90),
                  box(image_id, "Car", 0.30, 0.70, 0.10, 0.35)]
    boxes.append(box("p0", "Car", 0.0, 0.1, 0.0, 0.1))  # 102 px long: p0 is decoded at 1/1
    outputs = {}
    for reduced in (False, True):
        root = tmp_path / str(reduced)
        root.mkdir()
        write_raw(root, images, boxes)
        write_params(root, size=64, reduced_decode=reduced)
        metrics = run_stage(root, monkeypatch)
        outputs[reduced] = ((root / "data" / "crops" / "manifest.csv").read_bytes(), metrics,
                            crops_digest(root))
    (man_full, met_full, full), (man_red, met_red, red) = outputs[False], outputs[True]
    assert man_full == man_red and met_full == met_red and full.keys() == red.keys()
    diffs = {name: mean_abs(full[name], red[name]) for name in full}
    assert all(d == 0 for name, d in diffs.items() if name.split("/")[1].startswith("p0_"))
    changed = [d for name, d in diffs.items() if not name.split("/")[1].startswith("p0_")]
    assert changed and all(0 < d <= PHOTO_TOLERANCE[8] for d in changed)


def test_reduced_decode_is_deterministic_across_workers(tmp_path, monkeypatch):
    images = {f"p{i}": picture(200 + i, 16) for i in range(4)}
    boxes = [box(i, name, 0.1, 0.9, 0.1, 0.9) for i in images for name in ("Person", "Dog")]
    boxes += [box(i, "Car", 0.2, 0.6, 0.3, 0.5) for i in images]
    digests = []
    for workers in (1, 2):
        root = tmp_path / str(workers)
        root.mkdir()
        write_raw(root, images, boxes)
        write_params(root, size=64, workers=workers)
        run_stage(root, monkeypatch)
        digests.append({p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                        for p in sorted((root / "data" / "crops").rglob("*")) if p.is_file()})
    assert digests[0] == digests[1]


def exif_rotated_jpeg(image: np.ndarray) -> bytes:
    """A JPEG whose EXIF says 'rotate 90 degrees' (orientation 6), as phone pictures often are."""
    exif = Image.Exif()
    exif[pictures.ORIENTATION_TAG] = 6
    buf = io.BytesIO()
    Image.fromarray(image[..., ::-1]).save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def test_exif_rotated_picture_gets_the_same_geometry(tmp_path, monkeypatch):
    jpeg = exif_rotated_jpeg(picture(7, 32, 1024, 640))
    path = tmp_path / "r.jpg"
    path.write_bytes(jpeg)
    # Open Images boxes refer to the stored picture: decoding ignores the tag, and the header
    # read must agree, or reduced decoding falls back.
    assert pictures.decode(jpeg).shape[1::-1] == (1024, 640)
    header = pictures.read_header(jpeg)
    assert (header.width, header.height, header.exif_turned) == (1024, 640, True)
    boxes = [box("r", "Person", 0.1, 0.9, 0.05, 0.95), box("r", "Dog", 0.2, 0.8, 0.5, 0.9),
             box("r", "Car", 0.0, 1.0, 0.0, 0.6)]
    manifests = []
    for reduced in (False, True):
        root = tmp_path / str(reduced)
        root.mkdir()
        write_raw(root, {"r": jpeg}, boxes)
        write_params(root, size=64, reduced_decode=reduced)
        metrics = run_stage(root, monkeypatch)
        assert metrics["images_exif_orientation_ignored"] == 1
        manifests.append((root / "data" / "crops" / "manifest.csv").read_bytes())
        assert {r["image_width"] for r in read_manifest(root)} == {"1024"}
    assert manifests[0] == manifests[1]


def test_worker_pool_survives_opencv_threads_in_the_parent(tmp_path):
    """A forked pool deadlocks once the parent has run OpenCV's thread pool (the test suite does,
    a notebook would); the stage must finish anyway. Run in a subprocess so a hang fails."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
        import cv2, numpy as np
        big = np.zeros((2000, 2000, 3), np.uint8)
        for _ in range(3):
            cv2.resize(big, (1000, 1000))
            cv2.warpAffine(big, np.eye(2, 3), (2000, 2000))
        from stages.extract_crops import stage as extract_crops
        from stages.common.pictures import crops
        tasks = [extract_crops.ImageTask(f"i{{k}}", {str(tmp_path / "p.jpg")!r}, {str(tmp_path)!r},
                                         1, 32, 4, True, 10**8, ((0, "out", 0.1, 0.9, 0.1, 0.9),))
                 for k in range(4)]
        print(sum(len(r.boxes) for r in extract_crops.run_tasks(tasks, 2)))
    """)
    as_jpeg_file(tmp_path / "p.jpg", picture(1, 32, 320, 240))
    (tmp_path / "out").mkdir()
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "4"
