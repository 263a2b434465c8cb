"""Bad input at the crop stage: every broken picture or row is skipped and counted by reason in
metrics/crops.json, never a crash; what cannot be worked around stops with one line.

Each case is a real file or row laid out as the download leaves data/raw/, run through the real
stage (extract_crops.main). And a bad param stops each of the 7 stages before it starts work.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages.common.pictures import decode as pictures
from stages.extract_crops import stage as extract_crops
from tests import paramfile
from tests.test_crops import (MID, basic_dataset, box, read_manifest, run_stage, textured,
                              write_params, write_raw)
from tests.test_reduced_decode import exif_rotated_jpeg


def jpeg(img: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


def pil_bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def person_box(image_id: str) -> dict:
    return box(image_id, "Person", 0.1, 0.9, 0.1, 0.9)


def hostile_pictures() -> dict[str, bytes]:
    """One picture per case, keyed by what the stage must make of it."""
    img = textured(120, 160, 5)
    rgb = Image.fromarray(img[..., ::-1])
    whole = jpeg(img)
    deep = (textured(120, 160, 6)[..., 0].astype(np.uint16) * 257)
    return {
        # unusable: skipped, counted under the reason
        "truncated": whole[: len(whole) * 6 // 10],
        "emptyfile": b"",
        "notanimage": b"%PDF-1.4 this is a document named .jpg\n",
        "bomb": png_header_only(40_000, 40_000),
        "tga": pil_bytes(rgb, "TGA"),  # PIL knows it, OpenCV cannot decode it
        # usable: converted to 8-bit BGR and cropped
        "png": pil_bytes(rgb, "PNG"),
        "gray": pil_bytes(rgb.convert("L"), "JPEG"),
        "cmyk": pil_bytes(rgb.convert("CMYK"), "JPEG"),
        "deep16": cv2.imencode(".png", deep)[1].tobytes(),
        "alpha": pil_bytes(rgb.convert("RGBA"), "PNG"),
    }


def test_every_hostile_picture_is_skipped_or_read_and_counted(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    hostile = hostile_pictures()
    images.update(hostile)
    boxes += [person_box(i) for i in hostile]
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path, workers=2)
    metrics = run_stage(tmp_path, monkeypatch)

    assert metrics["images_unreadable_by_reason"] == {
        "truncated": 1, "empty_file": 1, "not_an_image": 1, "too_many_pixels": 1,
        "decode_failed": 1}
    assert metrics["images_unreadable"] == 5 and metrics["skipped"]["unreadable_image"] == 5
    kept = {r["image_id"] for r in read_manifest(tmp_path)}
    assert {"png", "gray", "cmyk", "deep16", "alpha"} <= kept
    assert not kept & {"truncated", "emptyfile", "notanimage", "bomb", "tga"}
    for image_id in ["png", "gray", "cmyk", "deep16", "alpha"]:
        crop = cv2.imread(str(tmp_path / "data/crops/person" / f"{image_id}_0.jpg"),
                          cv2.IMREAD_UNCHANGED)
        assert crop.shape == (32, 32, 3) and crop.dtype == np.uint8, image_id
    # 16-bit values are scaled to 8 bits, not clipped: the crop is not saturated white
    deep = cv2.imread(str(tmp_path / "data/crops/person/deep16_0.jpg"))
    assert 20 < deep.mean() < 235


def test_cmyk_picture_keeps_its_colours(tmp_path, monkeypatch):
    red = np.zeros((100, 100, 3), np.uint8)
    red[..., 2] = 220  # BGR red
    cmyk = pil_bytes(Image.fromarray(red[..., ::-1]).convert("CMYK"), "JPEG", quality=95)
    decoded = extract_crops.decode(cmyk)
    assert decoded is not None
    b, g, r = decoded.reshape(-1, 3).mean(axis=0)
    assert r > 150 and g < 60 and b < 60, (b, g, r)


def test_pixel_limit_is_a_param(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    images["wide"] = textured(100, 400, 9)
    boxes.append(person_box("wide"))
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path, max_image_pixels=100 * 300)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["images_unreadable_by_reason"]["too_many_pixels"] == 1
    assert "wide" not in {r["image_id"] for r in read_manifest(tmp_path)}


def test_exif_orientation_is_ignored_because_boxes_refer_to_the_stored_picture(
        tmp_path, monkeypatch):
    """Stored left half red, right half blue; the tag says 'turn 90 degrees'. A box over the
    stored left half must give a red crop (turned, the left half would be half red, half blue)."""
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, :150] = (0, 0, 230)
    img[:, 150:] = (230, 0, 0)
    tagged = exif_rotated_jpeg(img)
    images, boxes = basic_dataset()
    images["tagged"] = tagged
    boxes.append(box("tagged", "Person", 0.02, 0.48, 0.05, 0.95))
    write_raw(tmp_path, images, boxes)
    for reduced in (False, True):
        write_params(tmp_path, reduced_decode=reduced, size=32)
        metrics = run_stage(tmp_path, monkeypatch)
        assert metrics["images_exif_orientation_ignored"] == 1
        crop = cv2.imread(str(tmp_path / "data/crops/person/tagged_0.jpg")).astype(int)
        b, g, r = crop.reshape(-1, 3).mean(axis=0)
        assert r > 180 and b < 40, (reduced, b, g, r)
        row = next(r for r in read_manifest(tmp_path) if r["image_id"] == "tagged")
        assert (row["image_width"], row["image_height"]) == ("300", "200")


def test_hostile_rows_are_skipped_and_counted(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    boxes += [
        box("img01", "Person", float("nan"), 0.5, 0.1, 0.9),      # NaN
        box("img01", "Person", "abc", 0.5, 0.1, 0.9),             # not a number
        box("img01", "Person", "inf", 0.5, 0.1, 0.9),             # not finite
        box("img01", "Person", 0.1, 1.5, 0.1, 0.9),               # outside [0, 1]
        box("img01", "Person", -0.2, 0.5, 0.1, 0.9),
        box("img01", "Person", 0.6, 0.4, 0.1, 0.9),               # XMin > XMax
        box("img01", "Person", 0.3, 0.7, 0.5, 0.5),               # zero height
        box("img02", "Person", 0.05, 0.45, 0.1, 0.9),             # an exact repeat of a row
        {**box("img02", "Person", 0, 1, 0, 1), "LabelName": "/m/not_a_class"},
        box("img03", "Person", 0.1, 1.0000001, 0.1, 0.9),         # rounding noise: clipped, kept
    ]
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    skipped = metrics["skipped"]
    assert (skipped["box_not_finite"], skipped["box_out_of_range"], skipped["box_empty"],
            skipped["duplicate_row"]) == (3, 2, 2, 1)
    assert metrics["rows_unknown_label"] == 1
    assert metrics["crops_kept"] == 25  # the 24 of basic_dataset and the clipped box
    assert metrics["detection_rows"] == len(boxes)


@pytest.mark.parametrize("image_id", ["../escape", "/etc/passwd", "a/b", "a\\b", ".hidden",
                                      "has space", "caf\u00e9", "x" * 200, "semi;colon"])
def test_image_ids_that_could_leave_the_folder_are_refused(tmp_path, monkeypatch, image_id):
    images, boxes = basic_dataset()
    boxes.append(box(image_id, "Dog", 0.1, 0.9, 0.1, 0.9))
    write_raw(tmp_path, images, boxes)
    # a picture where a joined path would land: data/raw/escape.jpg for "../escape"
    assert cv2.imwrite(str(tmp_path / "data/raw/escape.jpg"), textured(80, 80, 1))
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["boxes_bad_image_id"] == 1
    assert metrics["crops_kept"] == 24
    produced = {p.name for p in (tmp_path / "data/crops").rglob("*.jpg")}
    assert len(produced) == 24 and not any("escape" in n or "passwd" in n for n in produced)


def test_odd_file_names_on_disk_are_not_images_of_the_set(tmp_path, monkeypatch):
    images, boxes = basic_dataset()
    write_raw(tmp_path, images, boxes)
    data = tmp_path / "data/raw/data"
    (data / "we ird.jpg").write_bytes(jpeg(textured(50, 50, 2)))
    (data / "link.jpg").symlink_to(data / "img00.jpg")
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["images_on_disk"] == 8


def test_extra_columns_are_ignored_missing_ones_named(tmp_path, monkeypatch, capsys):
    import pandas as pd

    images, boxes = basic_dataset()
    write_raw(tmp_path, images, boxes)
    detections = tmp_path / "data/raw/labels/detections.csv"
    frame = pd.read_csv(detections)
    frame.assign(Comment="x").to_csv(detections, index=False)
    write_params(tmp_path)
    assert run_stage(tmp_path, monkeypatch)["crops_kept"] == 24
    capsys.readouterr()

    frame.drop(columns=["XMax", "LabelName"]).to_csv(detections, index=False)
    with pytest.raises(SystemExit) as exc:
        run_stage(tmp_path, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing required column(s) LabelName, XMax" in err[0]


@pytest.mark.parametrize("content,needle", [
    ("", "empty or not a CSV"),
    ('ImageID,LabelName,XMin,XMax,YMin,YMax\nimg00,/m/person,0,1,0,1\nimg01,"/m/person,0,1,0,1\n',
     "not a well-formed CSV at line 3 (unexpected end of data)"),
    ("ImageID,LabelName,XMin,XMax,YMin,YMax\nimg00,/m/person,0,1,0,1\n\xe9t\xe9,x,0,1,0,1\n",
     "not a well-formed CSV at line 3 (not UTF-8 text)"),
])
def test_broken_detections_file_stops_with_one_line(tmp_path, monkeypatch, capsys, content,
                                                     needle):
    images, boxes = basic_dataset()
    write_raw(tmp_path, images, boxes)
    (tmp_path / "data/raw/labels/detections.csv").write_bytes(content.encode("latin-1"))
    write_params(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "detections.csv" in err[0]


def test_csvs_saved_by_a_spreadsheet_tool_lose_no_class(tmp_path, monkeypatch):
    """A byte-order mark (what spreadsheet tools write as "CSV UTF-8") glued to the first MID
    turned that class's boxes into unknown labels, and the stage exited 0 without them."""
    from tests.test_download import as_spreadsheet_csv

    images, boxes = basic_dataset()
    write_raw(tmp_path, images, boxes)
    classes = tmp_path / "data/raw/metadata/classes.csv"
    assert classes.read_text().startswith(MID["Person"] + ",")
    as_spreadsheet_csv(classes)
    as_spreadsheet_csv(tmp_path / "data/raw/labels/detections.csv")
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["rows_unknown_label"] == 0
    assert metrics["kept_per_label"] == {"animal": 8, "object": 8, "person": 8}


def test_a_label_with_no_usable_picture_stops_at_this_stage(tmp_path, monkeypatch, capsys):
    """All dog pictures are broken: the stage says so, instead of training on two classes."""
    images, boxes = basic_dataset()
    boxes = [b for b in boxes if b["LabelName"] != MID["Dog"]]
    images["brokendog"] = b"\xff\xd8\xff\xe0 not really"
    boxes.append(box("brokendog", "Dog", 0.1, 0.9, 0.1, 0.9))
    write_raw(tmp_path, images, boxes)
    write_params(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "label 'animal': 0 crops kept" in err[0]
    assert "unreadable_image 1" in err[0]
    assert not (tmp_path / "data/crops").exists()


BAD_PARAM = [  # each stage, a bad value of one of its own params, the line it must print
    ("download", {"data": {"sample": {"images": 0}}},
     "data.sample.images=0 is not allowed; expected an integer >= 1 and <= 1000000"),
    ("extract_crops", {"crops": {"size": 0}},
     "crops.size=0 is not allowed; expected an integer >= 8 and <= 1024"),
    ("split", {"split": {"test": 1.5}},
     "split.test=1.5 is not allowed; expected a number > 0 and < 1"),
    ("train", {"train": {"lr": -1.0}}, "train.lr=-1.0 is not allowed; expected a number > 0"),
    ("calibrate", {"calibrate": {"delta": 0.9}},
     "calibrate.delta=0.9 is not allowed; expected a number > 0 and <= 0.5"),
    ("evaluate", {"evaluate": {"speed_runs": 0}},
     "evaluate.speed_runs=0 is not allowed; expected an integer >= 1 and <= 10000"),
    ("export", {"export": {"opset": 99}},
     "export.opset=99 is not allowed; expected an integer >= 17 and <= 23"),
]


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*")}


@pytest.fixture(scope="module")
def bad_param_runs(tmp_path_factory) -> dict:
    """Each stage of BAD_PARAM as dvc.yaml runs it, in a folder of its own with the raw download
    in place: {stage: (folder, its tree before, exit code, stdout, stderr)}. All are started at
    once: a run that stops at its params is mostly its imports, so the cores share them."""
    started = {}
    for stage, over, _ in BAD_PARAM:
        root = tmp_path_factory.mktemp(f"bad-param-{stage}")
        images, boxes = basic_dataset()
        write_raw(root, images, boxes)
        paramfile.write(root, over)
        started[stage] = (root, _tree(root), subprocess.Popen(
            [sys.executable, "-m", f"stages.{stage}"], cwd=root, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(paramfile.ROOT)}))
    runs = {}
    try:
        for stage, (root, before, proc) in started.items():
            out, err = proc.communicate(timeout=300)
            runs[stage] = (root, before, proc.returncode, out, err)
    finally:
        for _, _, proc in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return runs


@pytest.mark.parametrize("stage, over, line", BAD_PARAM, ids=[c[0] for c in BAD_PARAM])
def test_a_bad_param_stops_each_stage_before_work(bad_param_runs, stage, over, line):
    """Each stage as dvc.yaml runs it: one line, exit 2, nothing written or removed (the raw
    download is in place, so extract_crops had work it could have started)."""
    root, before, code, out, err = bad_param_runs[stage]
    assert (code, err, out) == (2, f"error: params.yaml: {line}\n", "")
    assert _tree(root) == before


def test_truncation_check_is_not_fooled_by_an_embedded_thumbnail():
    """An EXIF thumbnail is a whole JPEG (with its own end marker) inside the header: a picture
    cut off after it must still count as truncated, and the whole one as complete."""
    main = jpeg(textured(300, 400, 3))
    thumb = jpeg(textured(20, 30, 4))
    payload = b"Exif\0\0" + thumb
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    whole = main[:2] + app1 + main[2:]
    header = pictures.read_header(whole)
    assert header is not None and header.format == "JPEG"
    assert pictures.image_problem(whole, header, 10**8) == ""
    assert extract_crops.decode(whole) is not None
    for cut in (0.5, 0.9, 0.999):
        part = whole[: int(len(whole) * cut)]
        assert pictures.image_problem(part, pictures.read_header(part), 10**8) \
            == "truncated", cut
