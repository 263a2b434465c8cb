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


def project_files() -> list[str]:
    """The files a clone of the repo has: tracked plus untracked-not-ignored."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return [f for f in out if (ROOT / f).is_file() and not f.startswith(("tests/", "metrics/",
                                                                         "plots/"))
            and f != "dvc.lock"]


def copy_project(dest: Path, params: dict) -> Path:
    """The project's files under ``dest``, its params.yaml merged with ``params``."""
    for rel in project_files():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
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
