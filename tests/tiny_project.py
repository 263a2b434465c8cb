"""Tiny projects for tests that run stages or DVC in a subprocess.

``copy_project``: the repository's files in a temporary folder, with params for a run of seconds.
``write_colour_split``: a ``data/split`` of coloured squares, for train on its own.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from tests import paramfile

ROOT = Path(__file__).resolve().parents[1]
COLOURS = {"animal": (40, 160, 40), "object": (160, 40, 40), "person": (40, 40, 160)}  # BGR


# The DVC config of every copy: the project's own settings, none of the user's. A user who
# followed docs/scale-out.md has committed `dvc remote add -d shared ...` (and may have
# .dvc/config.local): copied, the e2e test's own `remote add shared` would fail.
TEST_DVC_CONFIG = "[core]\n    analytics = false\n"
USER_DVC_CONFIG = (".dvc/config", ".dvc/config.local")


def project_files(root: Path = ROOT) -> list[str]:
    """The files a clone of the repo has: tracked plus untracked-not-ignored, but the tests,
    committed results and the user's DVC config."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (root / f).is_file() and not f.startswith(("tests/", "metrics/",
                                                                         "plots/"))
            and f != "dvc.lock" and f not in USER_DVC_CONFIG]


def copy_project(dest: Path, params: dict, root: Path = ROOT) -> Path:
    """The project's files under ``dest``, its params.yaml merged with ``params``, and a DVC
    config of the project's settings alone."""
    for rel in project_files(root):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest / rel)
    (dest / ".dvc").mkdir(parents=True, exist_ok=True)
    (dest / ".dvc/config").write_text(TEST_DVC_CONFIG)
    paramfile.write(dest, params)
    return dest


def write_colour_split(root: Path, rng: np.random.Generator, counts: dict[str, int],
                       noise: int, colour_of: Callable[[str, str], tuple[int, int, int]]
                       = lambda split, label: COLOURS[label]) -> None:
    """``counts[split]`` noisy 32 px squares per label under root/data/split/<split>/<label>/,
    coloured ``colour_of(split, label)``, drawn from ``rng`` in split, label, image order."""
    for split, n in counts.items():
        for label in COLOURS:
            folder = root / "data/split" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                spread = rng.integers(-noise, noise, (32, 32, 3))
                img = np.clip(np.array(colour_of(split, label)) + spread, 0, 255)
                cv2.imwrite(str(folder / f"{i}.png"), img.astype(np.uint8))


def write_noise_test_split(root: Path, classes: list[str], size: int, per_label: int = 2,
                           seed: int = 5) -> None:
    """``per_label`` random-noise ``size`` px PNGs per label under root/data/split/test/<label>/:
    a test split for the stages that only need crops of the right shape (evaluate, export)."""
    rng = np.random.default_rng(seed)
    for label in classes:
        folder = root / "data/split/test" / label
        folder.mkdir(parents=True)
        for i in range(per_label):
            cv2.imwrite(str(folder / f"{i}.png"),
                        rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
