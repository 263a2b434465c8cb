"""Property-based tests (hypothesis): crop geometry, picture reading and the detections reader
driven with random and hostile inputs. Each property is an invariant the stage relies on; a
failure prints the smallest input that breaks it.
"""
from __future__ import annotations

import csv
import math
import tempfile
from pathlib import Path

import cv2
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stages.common.config.params import parse
from stages.common.pictures import crops, decode as pictures, openimages
from stages.extract_crops import stage as extract_crops
from tests import paramfile

FAST = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
SLOW = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

coordinate = st.floats(min_value=-3, max_value=3, allow_nan=False, allow_infinity=False)
side = st.integers(min_value=1, max_value=5000)


@FAST
@given(xmin=coordinate, xmax=coordinate, ymin=coordinate, ymax=coordinate, width=side,
       height=side)
def test_pixel_box_always_lies_inside_the_picture(xmin, xmax, ymin, ymax, width, height):
    x0, y0, x1, y1 = crops.pixel_box(xmin, xmax, ymin, ymax, width, height)
    assert 0 <= x0 <= width and 0 <= x1 <= width
    assert 0 <= y0 <= height and 0 <= y1 <= height


@FAST
@given(cw=st.integers(1, 100_000), ch=st.integers(1, 100_000), size=st.integers(8, 1024))
def test_fit_size_fills_the_long_side_and_never_vanishes(cw, ch, size):
    nw, nh = crops.fit_size(cw, ch, size)
    assert max(nw, nh) == size and 1 <= min(nw, nh) <= size
    # the aspect ratio is kept up to the truncation of one pixel
    assert abs(nw * ch - nh * cw) <= max(cw, ch)


picture_shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))
layouts = st.sampled_from([(None, np.uint8), (1, np.uint8), (3, np.uint8), (4, np.uint8),
                           (3, np.uint16)])


@FAST
@given(shape=picture_shapes, layout=layouts, size=st.integers(8, 96),
       box=st.tuples(coordinate, coordinate, coordinate, coordinate),
       seed=st.integers(0, 2**32 - 1), centred=st.booleans())
def test_letterbox_gives_a_square_canvas_for_any_picture_and_box(shape, layout, size, box,
                                                                 seed, centred):
    channels, dtype = layout
    h, w = shape
    full = (h, w) if channels is None else (h, w, channels)
    image = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, full, dtype=dtype)
    xmin, xmax, ymin, ymax = box
    pbox = crops.pixel_box(xmin, xmax, ymin, ymax, w, h)
    cw, ch = crops.box_size(pbox)
    if cw < 1 or ch < 1:
        return  # the stage counts these as too small and never cuts them
    rng = None if centred else crops.box_rng(seed, "img", 0)
    canvas = crops.letterbox(crops.cut(image, pbox), size, rng)
    assert canvas.shape == (size, size) + full[2:] and canvas.dtype == dtype


@FAST
@given(width=st.integers(16, 4000), height=st.integers(16, 4000),
       box=st.tuples(coordinate, coordinate, coordinate, coordinate),
       size=st.integers(8, 64), factor=st.sampled_from([2, 4, 8]))
def test_reduced_scaling_gives_the_full_scale_crop_size(width, height, box, size, factor):
    pbox = crops.pixel_box(box[0], box[1], box[2], box[3], width, height)
    cw, ch = crops.box_size(pbox)
    if cw < 1 or ch < 1:
        return
    rw, rh = crops.reduced_shape(width, height, factor)
    reduced = np.zeros((rh, rw, 3), np.uint8)
    nw, nh = crops.fit_size(cw, ch, size)
    assert crops.scale_from_reduced(reduced, pbox, factor, (nw, nh)).shape == (nh, nw, 3)


def encoded_picture(draw) -> bytes:
    h, w = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    channels, dtype = draw(layouts)
    full = (h, w) if channels is None else (h, w, channels)
    image = np.random.default_rng(draw(st.integers(0, 999))).integers(
        0, np.iinfo(dtype).max, full, dtype=dtype)
    ext = ".png" if dtype == np.uint16 or channels == 4 else draw(st.sampled_from([".png",
                                                                                  ".jpg"]))
    data = cv2.imencode(ext, image)[1].tobytes()
    damage = draw(st.sampled_from(["none", "cut", "flip", "garbage", "empty"]))
    if damage == "cut":
        data = data[: draw(st.integers(0, len(data)))]
    elif damage == "flip":
        pos = draw(st.integers(0, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
    elif damage == "garbage":
        data = draw(st.binary(min_size=1, max_size=400))
    elif damage == "empty":
        data = b""
    return data


@SLOW
@given(data=st.composite(lambda draw: encoded_picture(draw))(),
       boxes=st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), min_size=1,
                      max_size=4),
       reduced=st.booleans(), limit=st.sampled_from([10**8, 500]))
def test_any_file_is_cropped_or_skipped_with_a_reason(data, boxes, reduced, limit):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.jpg"
        path.write_bytes(data)
        (Path(tmp) / "person").mkdir()
        task = extract_crops.ImageTask(
            "x", str(path), tmp, 1, 16, 1, reduced, limit,
            tuple((k, "person", *b) for k, b in enumerate(boxes)))
        result = extract_crops.process_image(task)
        written = sorted(p.name for p in (Path(tmp) / "person").iterdir())
    if result.problem:
        assert result.problem in pictures.IMAGE_PROBLEMS
        assert written == [] and result.boxes == ()
    else:
        kept = [k for k, status, _ in result.boxes if status == "kept"]
        assert written == sorted(extract_crops.crop_name("x", k) for k in kept)
        assert len(result.boxes) == len(boxes)


hostile_id = st.one_of(
    st.sampled_from(["../x", "/etc/passwd", "a/b", "a\\b", ".x", "", " ", "x" * 300, "é",
                     "0123456789abcdef", "img_1", "nul\x00byte", "new\nline", "quote\"s"]),
    st.text(max_size=20))
hostile_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "abc", "1e309", "-0", "0x10", " 0.5 ", "1,5"]),
    st.floats(min_value=0, max_value=1).map(str))
MIDS = ["/m/person", "/m/dog", "/m/unknown", ""]


@SLOW
@given(rows=st.lists(st.tuples(hostile_id, st.sampled_from(MIDS), hostile_number,
                               hostile_number, hostile_number, hostile_number,
                               st.sampled_from(["0", "1", "", "yes"])), max_size=30))
def test_detections_reader_and_box_rules_hold_on_hostile_rows(rows):
    header = ["ImageID", "LabelName", "XMin", "XMax", "YMin", "YMax", "IsGroupOf"]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "detections.csv"
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)
        stats: dict[str, int] = {}
        frame = openimages.read_detections(path, {"/m/person", "/m/dog"}, stats,
                                           known={"/m/person", "/m/dog"})
    assert stats["rows"] == len(rows)
    assert len(frame) + stats["rows_unknown_label"] == len(rows)
    assert set(frame["LabelName"]) <= {"/m/person", "/m/dog"}
    for col in openimages.BOX_COLUMNS:
        assert frame[col].dtype == np.float64
    safe = frame[np.array([openimages.is_safe_image_id(i) for i in frame["ImageID"]],
                          dtype=bool)].copy()
    for image_id in safe["ImageID"]:
        assert "/" not in image_id and "\\" not in image_id and not image_id.startswith(".")
        assert Path("data", f"{image_id}.jpg").parent == Path("data")
    safe["label"] = safe["LabelName"]
    safe["box_index"] = range(len(safe))
    cfg = parse(paramfile.params({"crops": {"size": 16, "min_box_px": 1, "skip_group_of": True,
                                            "skip_depiction": True, "dedup_iou": 0.7}}))
    reason = extract_crops.pre_read_skips(safe.reset_index(drop=True), cfg)
    assert set(reason) <= {"", *extract_crops.SKIP_REASONS}
    kept = safe.reset_index(drop=True)[reason == ""]
    for xmin, xmax, ymin, ymax in kept[openimages.BOX_COLUMNS].itertuples(index=False):
        assert all(math.isfinite(v) for v in (xmin, xmax, ymin, ymax))
        assert xmin < xmax and ymin < ymax
        assert -1e-6 <= min(xmin, ymin) and max(xmax, ymax) <= 1 + 1e-6


@SLOW
@given(h=st.integers(1, 160), w=st.integers(1, 160), mode=st.sampled_from(["RGB", "L", "CMYK"]),
       subsampling=st.sampled_from([0, 1, 2]), progressive=st.booleans(),
       quality=st.integers(5, 100), seed=st.integers(0, 999))
def test_fast_jpeg_decode_gives_opencvs_pixels_or_declines(h, w, mode, subsampling, progressive,
                                                            quality, seed):
    """The JPEG fast path (libjpeg-turbo through simplejpeg) must give exactly what OpenCV gives,
    or decline (OpenCV then decodes): the crops may not depend on which library decoded the
    picture. Either colour order is the other reversed."""
    import io

    from PIL import Image

    smooth = cv2.resize(np.random.default_rng(seed).integers(0, 256, (4, 4, 3), dtype=np.uint8),
                        (w, h), interpolation=cv2.INTER_CUBIC)
    buf = io.BytesIO()
    options = {"quality": quality, "progressive": progressive}
    if mode != "L":
        options["subsampling"] = subsampling
    try:
        Image.fromarray(smooth).convert(mode).save(buf, "JPEG", **options)
    except OSError:  # PIL cannot write some tiny progressive pictures
        return
    data = buf.getvalue()
    opencv = pictures.opencv(data, 1, pictures.STORED, pictures.BGR)
    try:
        fast = pictures.libjpeg_turbo(data, pictures.BGR)
    except pictures.Undecodable:
        fast = None
    if fast is not None:
        assert fast.shape == opencv.shape and np.array_equal(fast, opencv)
    assert np.array_equal(pictures.decode(data), opencv)
    assert np.array_equal(pictures.decode(data, colours=pictures.RGB), opencv[..., ::-1])


def test_every_hypothesis_test_draws_the_same_examples_on_every_run():
    """tests/conftest.py loads a derandomized profile: a failure in CI reproduces here. A test
    whose own settings turned it off would draw new examples each run."""
    import importlib

    found = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        if "from hypothesis import" not in path.read_text():
            continue
        module = importlib.import_module(f"tests.{path.stem}")
        for name, test in vars(module).items():
            if name.startswith("test_") and hasattr(test, "hypothesis"):
                found.append((name, test._hypothesis_internal_use_settings.derandomize))
    assert len(found) >= 8 and all(derandomized for _, derandomized in found), found
