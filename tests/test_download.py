"""Tests of the download stage: the synthetic sample, a folder mirror and FiftyOne's zoo, offline.

Every test runs in its own temporary directory with its own params.yaml, so the repository's
data/ and metrics/ are never touched. The zoo tests run the stage in a fresh process (as DVC
would), with sockets disabled, against a folder laid out exactly as FiftyOne 1.22.1 leaves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import yaml

from stages.common.pictures import crops
from stages.common.pictures.openimages import DETECTION_COLUMNS, read_classes, read_detections
from stages.download import sample_data, stage as download
from tests import paramfile

REPO = Path(__file__).resolve().parents[1]
LABELS = {"person": ["Person", "Man"], "animal": ["Dog", "Cat"], "object": ["Handgun", "Knife"]}
# Real MIDs (class-descriptions-boxable.csv) of the classes these tests use.
REAL_MIDS = {"Person": "/m/01g317", "Man": "/m/04yx4", "Woman": "/m/03bt1vf", "Dog": "/m/0bt9lr",
             "Cat": "/m/01yrx", "Handgun": "/m/0gxl3", "Knife": "/m/04ctx", "Tree": "/m/07j7r"}
ORDERED_CLASSES = {"/m/01g317": "Person", "/m/04yx4": "Man", "/m/0bt9lr": "Dog",
                   "/m/01yrx": "Cat", "/m/0gxl3": "Handgun", "/m/04ctx": "Knife",
                   "/m/07j7r": "Tree"}
HEADER = ",".join(DETECTION_COLUMNS)


def write_params(root: Path, source: str = "sample", labels: dict | None = None,
                 mirror: str = "mirror", **zoo: object) -> None:
    params = {
        "seed": 3,
        "data": {
            "source": source,
            "mirror": mirror,
            "labels": labels or LABELS,
            "sample": {"images": 60, "max_side": 160},
            "zoo": {"splits": ["train"], "max_samples": 10, "shuffle": True, "num_workers": 2,
                    **zoo},
        },
    }
    paramfile.write(root, params)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_stage() -> None:
    download.main()


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder where the stage made the sample of write_params' defaults: made once, for the
    tests that only read it or compare another run with it (each run takes seconds)."""
    root = tmp_path_factory.mktemp("sample")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_params(root)
        run_stage()
    return root


def fails_with(capsys: pytest.CaptureFixture, *needles: str) -> str:
    """Run the stage, expect exit 2 and one stderr line containing every needle."""
    with pytest.raises(SystemExit) as exc:
        run_stage()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err
    return err


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def pixel_boxes(raw: Path) -> pd.DataFrame:
    """detections.csv with the box in pixels of its image."""
    rows = read_detections(raw / "labels/detections.csv")
    sizes = {}
    for image_id in rows["ImageID"].unique():
        h, w = cv2.imread(str(raw / "data" / f"{image_id}.jpg")).shape[:2]
        sizes[image_id] = (w, h)
    rows["W"] = rows["ImageID"].map(lambda i: sizes[i][0])
    rows["H"] = rows["ImageID"].map(lambda i: sizes[i][1])
    rows["w_px"] = (rows["XMax"] - rows["XMin"]) * rows["W"]
    rows["h_px"] = (rows["YMax"] - rows["YMin"]) * rows["H"]
    return rows


def iou(a: pd.Series, b: pd.Series) -> float:
    return crops.iou((a.XMin, a.YMin, a.XMax, a.YMax), (b.XMin, b.YMin, b.XMax, b.YMax))


# ---------------------------------------------------------------------------- sample

def test_sample_reruns_are_byte_identical(work: Path, sample: Path) -> None:
    for made in ("params.yaml", "data", "metrics"):  # a rerun over the first run's outputs
        copy = shutil.copytree if (sample / made).is_dir() else shutil.copy
        copy(sample / made, work / made)
    run_stage()
    assert tree_digest(work / "data/raw") == tree_digest(sample / "data/raw")
    assert (work / "metrics/download.json").read_bytes() == \
        (sample / "metrics/download.json").read_bytes()
    assert not list((work / "data").glob(".raw.*")), "temporaries left behind"


def test_sample_seed_changes_the_pictures(work: Path, sample: Path) -> None:
    first = tree_digest(sample / "data/raw")
    params = yaml.safe_load((sample / "params.yaml").read_text())
    params["seed"] = 4
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    run_stage()
    assert set(tree_digest(work / "data/raw")).isdisjoint(k for k in first if k.startswith("data/"))


def test_sample_has_the_open_images_layout(sample: Path) -> None:
    raw = sample / "data/raw"
    assert (raw / "labels/detections.csv").read_text().splitlines()[0] == HEADER
    classes = read_classes(raw / "metadata/classes.csv")
    for name, mid in REAL_MIDS.items():
        assert classes[mid] == name
    rows = read_detections(raw / "labels/detections.csv")
    files = sorted(p.stem for p in (raw / "data").iterdir())
    assert len(files) == 60
    assert all(re.fullmatch(r"[0-9a-f]{16}", f) for f in files)
    assert set(rows["ImageID"]) <= set(files)
    assert list(rows["ImageID"]) == sorted(rows["ImageID"])
    assert set(rows["LabelName"]) <= set(classes)
    metrics = json.loads((sample / "metrics/download.json").read_text())
    assert metrics["images"] == 60 and metrics["boxes"] == len(rows)
    assert metrics["source"] == "sample"


def test_sample_boxes_are_like_real_open_images(sample: Path) -> None:
    rows = pixel_boxes(sample / "data/raw")
    coords = rows[["XMin", "XMax", "YMin", "YMax"]]
    assert ((coords >= 0) & (coords <= 1)).all().all()
    assert (rows["XMin"] < rows["XMax"]).all() and (rows["YMin"] < rows["YMax"]).all()
    names = rows["LabelName"].map(read_classes(sample / "data/raw/metadata/classes.csv"))
    for label, wanted in LABELS.items():   # every label, and enough of it to crop
        big = names.isin(wanted) & (rows[["w_px", "h_px"]].min(axis=1) >= 24) \
            & (rows["IsGroupOf"] == 0) & (rows["IsDepiction"] == 0)
        assert big.sum() >= 20, label
    assert (rows[["w_px", "h_px"]].min(axis=1) < 24).sum() >= 5, "no too-small boxes"
    assert rows["IsGroupOf"].sum() >= 1 and rows["IsDepiction"].sum() >= 1
    assert names.isin(sample_data.DISTRACTORS).sum() >= 1, "no distractor rows"


def test_sample_boxes_one_person_twice(sample: Path) -> None:
    rows = read_detections(sample / "data/raw/labels/detections.csv")
    twins = 0
    for _, boxes in rows.groupby("ImageID"):
        people = [r for _, r in boxes.iterrows()
                  if r.LabelName in (REAL_MIDS["Person"], REAL_MIDS["Man"])]
        twins += sum(1 for i, a in enumerate(people) for b in people[i + 1:]
                     if a.LabelName != b.LabelName and iou(a, b) > 0.8)
    assert twins >= 2


@pytest.mark.parametrize("name", sorted(sample_data.CATALOG))
def test_sample_objects_fill_their_box(name: str) -> None:
    """The box is taken from the drawn pixels: they touch all four sides of it."""
    c = sample_data.draw_object(np.random.default_rng(0), name, 90)
    m = c.mask > 0
    assert m[0].any() and m[-1].any() and m[:, 0].any() and m[:, -1].any()
    assert c.img.shape[:2] == c.mask.shape


def test_sample_unknown_class_stops_naming_it(work: Path, capsys: pytest.CaptureFixture) -> None:
    write_params(work, labels={**LABELS, "animal": ["Dog", "Unicorn"]})
    fails_with(capsys, "'Unicorn'", "data.labels")
    assert not (work / "data/raw").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda p: p["data"]["sample"].update(images=0), "data.sample.images"),
    (lambda p: p["data"].update(source=3), "data.source"),
    (lambda p: p["data"].update(source="/mnt/mirror"), "data.mirror: /mnt/mirror"),
    (lambda p: p["data"]["labels"].update(extra=["Person"]), "'Person'"),
    (lambda p: p["data"]["labels"].update(person=[]), "data.labels.person"),
    (lambda p: p.pop("seed"), "'seed'"),
])
def test_bad_params_stop_in_one_line(work: Path, capsys: pytest.CaptureFixture,
                                     edit, needle) -> None:
    write_params(work)
    params = yaml.safe_load((work / "params.yaml").read_text())
    edit(params)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    fails_with(capsys, needle)


# ---------------------------------------------------------------------------- a folder mirror

def make_mirror(root: Path, images: dict[str, list[tuple[str, str]]], on_disk: set[str]) -> None:
    """An Open Images-style folder. ``images``: ImageID -> [(MID, XMin)]. Rows are written in
    reverse ImageID order with the v6 train file's extra XClick columns."""
    (root / "data").mkdir(parents=True)
    (root / "labels").mkdir()
    (root / "metadata").mkdir()
    for image_id in on_disk:
        (root / "data" / f"{image_id}.jpg").write_bytes(f"jpeg bytes of {image_id}".encode())
    lines = [HEADER + ",XClick1X"]
    for image_id in sorted(images, reverse=True):
        for mid, xmin in images[image_id]:
            lines.append(f"{image_id},xclick,{mid},1,{xmin},0.9,0.1,0.9,0,0,0,0,0,-1")
    (root / "labels/detections.csv").write_text("\n".join(lines) + "\n")
    (root / "metadata/classes.csv").write_text(
        "".join(f"{mid},{name}\n" for mid, name in ORDERED_CLASSES.items()))


def test_path_source_keeps_wanted_images_with_all_their_boxes(work: Path) -> None:
    person, tree, dog = REAL_MIDS["Person"], REAL_MIDS["Tree"], REAL_MIDS["Dog"]
    images = {"aaaa000000000001": [(person, "0.0125"), (tree, "0.5")],
              "aaaa000000000002": [(tree, "0.2")],                      # no wanted class
              "aaaa000000000003": [(dog, "0.25"), (dog, "0.300000")],
              "aaaa000000000004": [(person, "0.1")]}                    # not downloaded
    make_mirror(work / "mirror", images, on_disk=set(images) - {"aaaa000000000004"})
    write_params(work, source="mirror", shuffle=False)
    run_stage()
    raw = work / "data/raw"
    assert sorted(p.name for p in (raw / "data").iterdir()) == \
        ["aaaa000000000001.jpg", "aaaa000000000003.jpg"]
    assert (raw / "data/aaaa000000000003.jpg").read_bytes() == b"jpeg bytes of aaaa000000000003"
    assert (raw / "labels/detections.csv").read_text().splitlines() == [
        HEADER,
        f"aaaa000000000001,xclick,{person},1,0.0125,0.9,0.1,0.9,0,0,0,0,0",
        f"aaaa000000000001,xclick,{tree},1,0.5,0.9,0.1,0.9,0,0,0,0,0",
        f"aaaa000000000003,xclick,{dog},1,0.25,0.9,0.1,0.9,0,0,0,0,0",
        f"aaaa000000000003,xclick,{dog},1,0.300000,0.9,0.1,0.9,0,0,0,0,0",
    ]
    assert read_classes(raw / "metadata/classes.csv") == ORDERED_CLASSES
    metrics = json.loads((work / "metrics/download.json").read_text())
    assert metrics["images"] == 2 and metrics["boxes"] == 4
    assert metrics["boxes_per_label"] == {"animal": 2, "object": 0, "other": 1, "person": 1}


def as_spreadsheet_csv(path: Path) -> None:
    """Rewrite ``path`` as spreadsheet tools save "CSV UTF-8": a byte-order mark, CRLF ends."""
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))


def test_path_source_reads_csvs_as_spreadsheet_tools_write_them(work: Path) -> None:
    """A BOM made the first class's MID '\\ufeff/m/01g317': its boxes became unknown labels
    and both stages exited 0. Quoted commas in a class name must stay one field."""
    person, dog = REAL_MIDS["Person"], REAL_MIDS["Dog"]
    images = {"aaaa000000000001": [(person, "0.0125")], "aaaa000000000003": [(dog, "0.25")]}
    make_mirror(work / "mirror", images, on_disk=set(images))
    classes = work / "mirror/metadata/classes.csv"
    classes.write_text(classes.read_text() + '/m/0cdl1,"Tree, palm"\n')
    as_spreadsheet_csv(classes)
    as_spreadsheet_csv(work / "mirror/labels/detections.csv")
    assert next(iter(ORDERED_CLASSES)) == person  # the BOM sits right before Person's MID
    write_params(work, source="mirror", shuffle=False)
    run_stage()
    metrics = json.loads((work / "metrics/download.json").read_text())
    assert metrics["images"] == 2
    assert metrics["boxes_per_label"] == {"animal": 1, "object": 0, "other": 0, "person": 1}
    assert read_classes(work / "data/raw/metadata/classes.csv") == {
        **ORDERED_CLASSES, "/m/0cdl1": "Tree, palm"}


def test_path_source_malformed_csv_is_one_line_naming_file_and_line(
        work: Path, capsys: pytest.CaptureFixture) -> None:
    make_mirror(work / "mirror", {"c" * 16: [(REAL_MIDS["Dog"], "0.1")]}, {"c" * 16})
    detections = work / "mirror/labels/detections.csv"
    lines = detections.read_text().splitlines()
    lines.insert(2, f'{"d" * 16},"xclick,{REAL_MIDS["Dog"]},1,0.1,0.9,0.1,0.9,0,0,0,0,0,-1')
    detections.write_text("\n".join(lines) + "\n")
    write_params(work, source="mirror")
    fails_with(capsys, "error: mirror/labels/detections.csv: not a well-formed CSV at line 3 (")
    detections.write_bytes(detections.read_bytes().replace(b'"xclick', b"\xffxclick"))
    fails_with(capsys, "mirror/labels/detections.csv: not a well-formed CSV at line 3 (not UTF-8")
    make_mirror(work / "mirror2", {"c" * 16: [(REAL_MIDS["Dog"], "0.1")]}, {"c" * 16})
    classes = work / "mirror2/metadata/classes.csv"
    classes.write_text(classes.read_text() + '/m/0cdl1,"Tree, palm\n/m/0abc,Other\n')
    write_params(work, source="mirror", mirror="mirror2")
    fails_with(capsys, "error: mirror2/metadata/classes.csv: not a well-formed CSV at line 8 (")


def test_path_source_draws_max_samples_reproducibly(work: Path) -> None:
    ids = [f"bbbb{i:012x}" for i in range(12)]
    make_mirror(work / "mirror", {i: [(REAL_MIDS["Cat"], "0.1")] for i in ids}, set(ids))
    write_params(work, source="mirror", max_samples=5, shuffle=True)
    run_stage()
    first = sorted(p.stem for p in (work / "data/raw/data").iterdir())
    run_stage()
    assert sorted(p.stem for p in (work / "data/raw/data").iterdir()) == first
    assert len(first) == 5 and first != ids[:5]          # a seeded draw, not the first five
    write_params(work, source="mirror", max_samples=5, shuffle=False)
    run_stage()
    assert sorted(p.stem for p in (work / "data/raw/data").iterdir()) == ids[:5]


def test_choose_depends_on_seed_not_on_input_order() -> None:
    ids = [f"{i:016x}" for i in range(100)]
    a = download.choose(ids, 10, True, 1)
    assert a == download.choose(list(reversed(ids)), 10, True, 1) == sorted(a)
    assert a != download.choose(ids, 10, True, 2)
    assert download.choose(ids, 500, True, 1) == ids


def test_path_source_missing_folder_or_file(work: Path, capsys: pytest.CaptureFixture) -> None:
    write_params(work, source="mirror", mirror="no/such/mirror")
    fails_with(capsys, "no/such/mirror")
    make_mirror(work / "mirror", {"c" * 16: [(REAL_MIDS["Dog"], "0.1")]}, {"c" * 16})
    (work / "mirror/labels/detections.csv").unlink()
    write_params(work, source="mirror")
    fails_with(capsys, "detections.csv")


@pytest.mark.parametrize("part", ["data", "labels", "labels/detections.csv", "metadata",
                                  "metadata/classes.csv"])
def test_path_source_refuses_a_link_out_of_the_mirror(work: Path, capsys: pytest.CaptureFixture,
                                                      part: str) -> None:
    """data/, labels/ or metadata/ or their CSV a symbolic link out of the mirror: refused in one
    line, as a picture that is a link is never taken; nothing written. A link that stays
    inside the mirror is followed."""
    images = {"c" * 16: [(REAL_MIDS["Dog"], "0.1")]}
    make_mirror(work / "mirror", images, set(images))
    make_mirror(work / "elsewhere", images, set(images))
    (work / "mirror" / part).rename(work / "mirror" / f"{part}.moved")
    (work / "mirror" / part).symlink_to(work / "elsewhere" / part)
    write_params(work, source="mirror")
    fails_with(capsys, f"error: mirror/{part}: a symbolic link out of mirror (to "
               f"{(work / 'elsewhere' / part).resolve()}); refusing to follow it")
    assert not (work / "data/raw").exists()
    (work / "mirror" / part).unlink()  # now a link inside the mirror
    (work / "mirror" / part).symlink_to(Path(part).name + ".moved")
    run_stage()
    assert json.loads((work / "metrics/download.json").read_text())["images"] == 1


def test_path_source_unknown_class_stops_naming_it(work: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    make_mirror(work / "mirror", {"c" * 16: [(REAL_MIDS["Dog"], "0.1")]}, {"c" * 16})
    write_params(work, source="mirror", labels={**LABELS, "object": ["Handgun", "Lightsaber"]})
    fails_with(capsys, "'Lightsaber'")


# ------------------------------------------------------------------- FiftyOne's zoo, offline

OFFLINE = """
import socket
def _off(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _off
socket.create_connection = _off
socket.getaddrinfo = _off
import runpy
runpy.run_module("stages.download", run_name="__main__")
"""


def run_offline(cwd: Path, zoo_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FIFTYONE_DATASET_ZOO_DIR": str(zoo_dir), "PYTHONPATH": str(REPO),
           "FIFTYONE_DO_NOT_TRACK": "true"}
    return subprocess.run([sys.executable, "-c", OFFLINE], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=180)


# Where FiftyOne 1.22.1 fetches each train label file from (fiftyone_internals.label_urls).
ZOO_URLS = {
    "train/metadata/classes.csv":
        "https://storage.googleapis.com/openimages/v5/class-descriptions-boxable.csv",
    "train/metadata/image_ids.csv":
        "https://storage.googleapis.com/openimages/2018_04/train/train-images-boxable-with-rotation.csv",
    "train/labels/detections.csv":
        "https://storage.googleapis.com/openimages/v6/oidv6-train-annotations-bbox.csv",
}


def write_record(zoo_dir: Path) -> None:
    """download-record.json as the stage leaves it once every label file is complete."""
    root = zoo_dir / "open-images-v7"
    files = {rel: {"url": url, "bytes": (root / rel).stat().st_size}
             for rel, url in ZOO_URLS.items()}
    (root / "download-record.json").write_text(json.dumps({"files": files}))


def make_zoo_split(zoo_dir: Path, images: dict[str, list[tuple[str, str]]],
                   record: bool = True) -> Path:
    """One split as FiftyOne 1.22.1 leaves it after a complete partial download
    (fiftyone/utils/openimages.py): data/<id>.jpg, labels/detections.csv (the whole split's
    boxes), metadata/classes.csv, metadata/image_ids.csv (every ID of the split) and
    metadata/hierarchy.json. Images without wanted classes are not downloaded. With ``record``,
    the stage's download-record.json (stages/download/zoo.py) says the label files are complete."""
    split = zoo_dir / "open-images-v7" / "train"
    wanted = {REAL_MIDS[n] for names in LABELS.values() for n in names}
    on_disk = {i for i, boxes in images.items() if any(m in wanted for m, _ in boxes)}
    make_mirror(split, images, on_disk)
    (split / "metadata/image_ids.csv").write_text(
        "ImageID,Subset,OriginalURL,Rotation\n"
        + "".join(f"{i},train,https://example.invalid/{i}.jpg,0.0\n" for i in sorted(images)))
    (split / "metadata/hierarchy.json").write_text(json.dumps({"LabelName": "Entity"}))
    if record:
        write_record(zoo_dir)
    return split


def test_zoo_complete_download_is_normalised_offline(work: Path) -> None:
    person, man, dog, handgun, tree = (REAL_MIDS[n]
                                       for n in ("Person", "Man", "Dog", "Handgun", "Tree"))
    images = {"dddd000000000001": [(person, "0.1"), (man, "0.11")],
              "dddd000000000002": [(tree, "0.2")],
              "dddd000000000003": [(dog, "0.3"), (tree, "0.4")],
              "dddd000000000004": [(handgun, "0.5")]}
    split = make_zoo_split(work / "zoo", images)
    write_params(work, source="open-images-v7")
    result = run_offline(work, work / "zoo")
    assert result.returncode == 0, result.stderr
    raw = work / "data/raw"
    assert sorted(p.stem for p in (raw / "data").iterdir()) == \
        ["dddd000000000001", "dddd000000000003", "dddd000000000004"]
    rows = pd.read_csv(raw / "labels/detections.csv", dtype=str)
    assert list(rows.columns) == DETECTION_COLUMNS
    assert rows["LabelName"].tolist() == [person, man, dog, tree, handgun]
    assert (raw / "data/dddd000000000004.jpg").read_bytes() == \
        (split / "data/dddd000000000004.jpg").read_bytes()
    assert json.loads((work / "metrics/download.json").read_text())["source"] == "open-images-v7"


def test_zoo_unknown_class_stops_before_downloading(work: Path) -> None:
    make_zoo_split(work / "zoo", {"e" * 16: [(REAL_MIDS["Dog"], "0.1")]})
    write_params(work, source="open-images-v7", labels={**LABELS, "animal": ["Dog", "Dragon"]})
    result = run_offline(work, work / "zoo")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "'Dragon'" in result.stderr and "network" not in result.stderr


def test_zoo_without_network_fails_in_one_line(work: Path) -> None:
    write_params(work, source="open-images-v7")
    result = run_offline(work, work / "empty-zoo")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: open-images-v7:"), err
    assert "network disabled by the test" in err
    assert not (work / "data/raw").exists()


def test_zoo_folder_without_record_is_not_trusted_offline(work: Path) -> None:
    """Label files with no record that they finished (a folder FiftyOne filled by itself) are
    checked against the server's size; offline that cannot be done, and the stage says so."""
    make_zoo_split(work / "zoo", {"e" * 16: [(REAL_MIDS["Dog"], "0.1")]}, record=False)
    write_params(work, source="open-images-v7")
    result = run_offline(work, work / "zoo")
    assert result.returncode == 2
    err = result.stderr.strip()
    assert len(err.splitlines()) == 1, err
    assert "classes.csv: no record that its download finished" in err
    assert "network disabled by the test" in err and "data.source" in err
    assert not (work / "data/raw").exists()


def test_zoo_bad_split_is_a_param_error(work: Path, capsys: pytest.CaptureFixture) -> None:
    write_params(work, source="open-images-v7", splits=["training"])
    fails_with(capsys, "data.zoo.splits", "'training'")
