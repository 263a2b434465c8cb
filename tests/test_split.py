"""The split stage: grouped by source image, stratified by label, seeded, ImageFolder layout."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from stages import split
from tests import paramfile

LABELS = ["animal", "object", "person"]


def write_params(root: Path, seed: int = 42, test=0.2, val=0.1, calibration=0) -> None:
    paramfile.write(root, {"seed": seed, "split": {"test": test, "val": val,
                                                   "calibration": calibration}})


def write_crops(root: Path, n_images: int = 300, seed: int = 0,
                label_p=(0.2, 0.3, 0.5)) -> pd.DataFrame:
    """A crops folder like extract_crops leaves: 1-4 crops per image, labels mixed, skewed."""
    rng = np.random.default_rng(seed)
    crops_dir = root / "data" / "crops"
    for label in LABELS:
        (crops_dir / label).mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        image_id = f"{rng.integers(1 << 60):016x}"
        for k in range(int(rng.choice([1, 1, 1, 2, 2, 3, 4]))):
            label = LABELS[rng.choice(3, p=label_p)]
            crop = f"{label}/{image_id}_{k}.jpg"
            pixel = np.full((8, 8, 3), (i % 256, k * 40, 7), np.uint8)
            (crops_dir / crop).write_bytes(cv2.imencode(".jpg", pixel)[1].tobytes())
            rows.append({"crop": crop, "label": label, "image_id": image_id, "box_index": k})
    frame = pd.DataFrame(rows).sort_values(["image_id", "box_index"])
    frame.to_csv(crops_dir / "manifest.csv", index=False)
    return frame


def run_stage(root: Path, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    split.main()
    return json.loads((root / "metrics" / "split.json").read_text())


def read_split_manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "data" / "split" / "manifest.csv", dtype=str)


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_images_never_straddle_splits_and_fractions_hold_per_label(tmp_path, monkeypatch):
    crops = write_crops(tmp_path)
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    out = read_split_manifest(tmp_path)

    assert len(out) == len(crops) == metrics["crops_total"]
    assert (out.groupby("image_id")["split"].nunique() == 1).all()
    targets = {"train": 0.7, "val": 0.1, "test": 0.2}
    for label in LABELS:
        total = int((crops["label"] == label).sum())
        for name, frac in targets.items():
            got = int(((out["split"] == name) & (out["label"] == label)).sum())
            assert metrics["crops"][name][label] == got
            # Whole images of up to 4 crops: a few crops off at most, whatever the fraction.
            assert abs(got - frac * total) <= 4, (name, label, got, frac * total)
    n_images = out["image_id"].nunique()
    for name, frac in targets.items():
        assert metrics["images"][name] == out.loc[out["split"] == name, "image_id"].nunique()
        # Big multi-crop images spread like the small ones: no split is all crowded scenes.
        assert abs(metrics["images"][name] / n_images - frac) < 0.03, metrics["images"]


def test_files_are_copied_into_imagefolder_layout(tmp_path, monkeypatch):
    crops = write_crops(tmp_path, n_images=60)
    write_params(tmp_path)
    run_stage(tmp_path, monkeypatch)
    out = read_split_manifest(tmp_path)
    src = tmp_path / "data" / "crops"
    dst = tmp_path / "data" / "split"
    for row in out.itertuples():
        assert row.crop == f"{row.split}/{row.label}/{Path(row.source).name}"
        assert (dst / row.crop).read_bytes() == (src / row.source).read_bytes()
    assert sorted(out["source"]) == sorted(crops["crop"])
    assert sorted(p.name for p in dst.iterdir()) == ["manifest.csv", "test", "train", "val"]


def test_torchvision_imagefolder_loads_each_split(tmp_path, monkeypatch):
    datasets = pytest.importorskip("torchvision.datasets")
    write_crops(tmp_path, n_images=60)
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    for name in ["train", "val", "test"]:
        ds = datasets.ImageFolder(str(tmp_path / "data" / "split" / name))
        assert ds.classes == LABELS
        assert len(ds) == metrics["crops"][name]["total"]
        assert ds[0][0].size == (8, 8)


def test_deterministic_and_seeded(tmp_path, monkeypatch):
    digests, assignments = [], []
    for name, seed in [("a", 42), ("b", 42), ("c", 43)]:
        root = tmp_path / name
        root.mkdir()
        write_crops(root)
        write_params(root, seed=seed)
        run_stage(root, monkeypatch)
        digests.append((tree_digest(root / "data" / "split"),
                        (root / "metrics" / "split.json").read_bytes()))
        assignments.append(read_split_manifest(root).set_index("source")["split"])
    assert digests[0] == digests[1]
    other = assignments[2].reindex(assignments[0].index)
    assert (assignments[0] != other).sum() > 50


def test_changing_val_keeps_the_test_set(tmp_path, monkeypatch):
    tests = []
    for name, val in [("a", 0.1), ("b", 0.2)]:
        root = tmp_path / name
        root.mkdir()
        write_crops(root)
        write_params(root, val=val)
        run_stage(root, monkeypatch)
        out = read_split_manifest(root)
        tests.append(sorted(out.loc[out["split"] == "test", "source"]))
    assert tests[0] == tests[1]


def test_a_calibration_share_moves_neither_test_nor_val_and_stays_apart(tmp_path, monkeypatch):
    runs = {}
    for share in (0, 0.15):
        root = tmp_path / str(share)
        root.mkdir()
        write_crops(root)
        write_params(root, calibration=share)
        runs[share] = (run_stage(root, monkeypatch), read_split_manifest(root), root)
    (before, plain, root0), (metrics, out, root) = runs[0], runs[0.15]
    for name in ("test", "val"):  # the same crops, the same bytes
        assert sorted(plain.loc[plain["split"] == name, "source"]) == \
            sorted(out.loc[out["split"] == name, "source"])
        assert tree_digest(root0 / "data/split" / name) == tree_digest(root / "data/split" / name)
    assert "calibration" not in before["crops"] and not (root0 / "data/split/calibration").exists()
    assert (out.groupby("image_id")["split"].nunique() == 1).all()  # disjoint by source image
    part = out[out["split"] == "calibration"]
    assert set(part["image_id"]).isdisjoint(out.loc[out["split"] != "calibration", "image_id"])
    assert metrics["crops"]["calibration"]["total"] == len(part)
    assert sorted(p.name for p in (root / "data/split/calibration").iterdir()) == LABELS
    for label in LABELS:  # the share of ALL crops, taken out of train
        total = int((out["label"] == label).sum())
        assert abs(int((part["label"] == label).sum()) - 0.15 * total) <= 4
        assert abs(metrics["crops"]["train"][label] - 0.55 * total) <= 6


def test_multi_label_images_stay_whole(tmp_path, monkeypatch):
    # Every image holds all three labels: the split can only move whole images.
    crops_dir = tmp_path / "data" / "crops"
    rows = []
    for i in range(50):
        for k, label in enumerate(LABELS):
            (crops_dir / label).mkdir(parents=True, exist_ok=True)
            crop = f"{label}/im{i:03d}_{k}.jpg"
            (crops_dir / crop).write_bytes(b"\xff\xd8 not decoded by the split stage")
            rows.append({"crop": crop, "label": label, "image_id": f"im{i:03d}"})
    pd.DataFrame(rows).to_csv(crops_dir / "manifest.csv", index=False)
    write_params(tmp_path)
    metrics = run_stage(tmp_path, monkeypatch)
    assert metrics["images"] == {"train": 35, "val": 5, "test": 10}
    assert metrics["crops"]["test"] == {"animal": 10, "object": 10, "person": 10, "total": 30}


def test_label_missing_from_a_split_names_it(tmp_path, monkeypatch, capsys):
    write_crops(tmp_path, n_images=80, label_p=(0.0, 0.5, 0.5))
    # Two animal crops from one image: they cannot be in train, val and test at once.
    crops_dir = tmp_path / "data" / "crops"
    with (crops_dir / "manifest.csv").open("a", newline="") as f:
        writer = csv.writer(f)
        for k in range(2):
            (crops_dir / "animal" / f"zz_{k}.jpg").write_bytes(b"x")
            writer.writerow([f"animal/zz_{k}.jpg", "animal", "zz", k])
    write_params(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_stage(tmp_path, monkeypatch)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no 'animal' crops (2 in all)" in err[0]
    assert not (tmp_path / "data" / "split").exists()


def test_missing_crop_file_is_named(tmp_path, monkeypatch, capsys):
    crops = write_crops(tmp_path, n_images=20)
    (tmp_path / "data" / "crops" / crops["crop"].iloc[3]).unlink()
    write_params(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    assert crops["crop"].iloc[3] in capsys.readouterr().err


@pytest.mark.parametrize("test,val,key", [
    (0, 0.1, "split.test=0"), (1, 0, "split.test=1"), (0.5, 0.5, "split.val=0.5"),
    (0.2, -0.1, "split.val=-0.1"), (0.2, 0, "split.val=0"),
])
def test_bad_fractions_fail_early(tmp_path, monkeypatch, capsys, test, val, key):
    write_params(tmp_path, test=test, val=val)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)  # no crops at all: params are checked first
    assert key in capsys.readouterr().err


def test_missing_manifest_says_what_to_run(tmp_path, monkeypatch, capsys):
    write_params(tmp_path)
    with pytest.raises(SystemExit):
        run_stage(tmp_path, monkeypatch)
    assert "run the extract_crops stage first" in capsys.readouterr().err
