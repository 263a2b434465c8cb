"""The FiftyOne review dataset, built offline against a private mongod that is gone afterwards.

FiftyOne starts its own database (fiftyone-db's mongod) on first use; here its files, config and
home live in a temp dir, tracking is off, and the build runs in a child process so the database
service stops with it. The test then checks no mongod of that temp dir is left running.
"""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["animal", "object", "person"]

CHILD = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from stages.review import build_dataset
    ds = build_dataset(Path(sys.argv[1]), Path(sys.argv[2]), "review-test")
    import fiftyone as fo
    ds = fo.load_dataset("review-test")  # read back from the database, not the object in hand
    schema = ds.get_field_schema()
    print(json.dumps({
        "n": len(ds),
        "fields": {k: type(v).__name__ for k, v in schema.items()},
        "embedded": {k: schema[k].document_type.__name__ for k in ("ground_truth", "prediction")},
        "mistakes": len(ds.match_tags("mistake")),
        "wrong": len(ds.match({"correct": False})),
        "rows": sorted([s.filepath, s.ground_truth.label, s.prediction.label,
                        s.prediction.confidence, len(s.prediction.logits)] for s in ds),
        "persistent": ds.persistent,
    }))
""")


def mongods_using(folder: Path) -> list[int]:
    """PIDs of mongod processes whose command line names ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "mongod" in cmd and str(folder) in cmd:
            pids.append(int(proc.name))
    return pids


@pytest.fixture
def test_split(tmp_path):
    rng = np.random.default_rng(0)
    for label in CLASSES:
        (tmp_path / "test" / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "test" / label / f"{label}{i}.jpg"),
                        rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
    torch.manual_seed(0)
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": 32, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    save_checkpoint(tmp_path / "best.pt", build_model("resnet18", 3, 0.3), ModelMeta(**meta))
    return tmp_path


def test_review_dataset_has_truth_prediction_and_confidence(test_split, tmp_path):
    fo_dir = tmp_path / "fiftyone"
    env = {**os.environ, "FIFTYONE_DATABASE_DIR": str(fo_dir / "db"),
           "FIFTYONE_CONFIG_PATH": str(fo_dir / "config.json"),
           "FIFTYONE_APP_CONFIG_PATH": str(fo_dir / "app_config.json"),
           "FIFTYONE_DO_NOT_TRACK": "true", "HOME": str(fo_dir / "home"),
           "FIFTYONE_DATABASE_VALIDATION": "false", "PYTHONPATH": str(ROOT)}
    env.pop("FIFTYONE_DATABASE_URI", None)  # our own mongod, never a shared one
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(test_split / "best.pt"),
                               str(test_split / "test")], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=240)
        if proc.returncode != 0 and "mongod" in proc.stderr.lower():
            pytest.fail(f"FiftyOne's mongod did not start: {proc.stderr.strip().splitlines()[-1]}")
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        deadline = time.time() + 20  # the service stops mongod shortly after its client exits
        while mongods_using(fo_dir) and time.time() < deadline:
            time.sleep(0.5)
        stray = mongods_using(fo_dir)
        for pid in stray:  # ours by construction: its command line names our temp dir
            os.kill(pid, 9)
    assert not stray, f"mongod {stray} was left running after FiftyOne's client exited"
    assert any((fo_dir / "db").glob("*.wt")), "the dataset was not stored in the temp database"

    assert got["n"] == 9 and got["persistent"]
    assert {"filepath", "tags", "ground_truth", "prediction", "correct"} <= set(got["fields"])
    assert got["fields"]["correct"] == "BooleanField"
    assert got["embedded"] == {"ground_truth": "Classification", "prediction": "Classification"}
    rows = got["rows"]
    assert [Path(r[0]).name for r in rows] == sorted(f"{c}{i}.jpg" for c in CLASSES
                                                     for i in range(3))
    assert all(Path(r[0]).parent.name == r[1] for r in rows)  # truth = the crop's folder
    assert all(r[2] in CLASSES and 1 / 3 <= r[3] <= 1 and r[4] == 3 for r in rows)
    wrong = sum(r[1] != r[2] for r in rows)
    assert got["mistakes"] == got["wrong"] == wrong
