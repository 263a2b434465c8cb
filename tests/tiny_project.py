"""Tiny projects for tests that run stages or DVC in a subprocess.

``copy_project``: the repository's files in a temporary folder, with params for a run of seconds.
``write_colour_split``: a ``data/split`` of coloured squares, for train on its own.
``build_tiny_pipeline`` / ``finish_tiny_pipeline``: a git + DVC copy on :data:`TINY` params run
to train / to the end, once per session (conftest's fixtures), for modules that copy it first.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
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


# The tiny pipeline that tests/test_crash_safety.py and tests/test_interrupted_experiment.py both
# start from: a few dozen pictures at 32 px, seconds per stage.
TINY = {
    "data": {"sample": {"images": 48, "max_side": 160}},
    "crops": {"size": 32, "min_box_px": 12, "workers": 1},
    "train": {"epochs": 2, "batch_size": 16, "num_workers": 0},
    "evaluate": {"batch_size": 16, "speed_runs": 3},
    "conditions": {"measure": {"night": [1]}},  # the stage runs; its ten are test_conditions'
    "export": {"batch_size": 8, "speed_runs": 3},
}
# The stages built one by one (`dvc repro -s`), with a copy of the repo kept before each of
# KEPT_BEFORE: where a crash test kills that stage the first time it runs.
BY_STAGE = ("download", "extract_crops", "split", "train")
KEPT_BEFORE = ("extract_crops", "split", "train")
PIPELINE_TIMEOUT_S = 600


def pipeline_env() -> dict:
    """Where the tiny pipeline's git and DVC commands run: the venv's python first on PATH, a git
    identity, unbuffered output (the tests read it line by line) and one torch thread: 2-3x
    faster train on a busy 2-core machine, and the checkpoint's bytes depend on the thread count,
    so every run whose bytes are compared with this build's must use the same one."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t", DVC_NO_ANALYTICS="1", PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")
    return env


def _run_in(repo: Path, *args: str) -> None:
    proc = subprocess.run(args, cwd=repo, env=pipeline_env(), capture_output=True, text=True,
                          timeout=PIPELINE_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def build_tiny_pipeline(base: Path) -> SimpleNamespace:
    """``repo``: a git copy of the project on :data:`TINY`, committed, where `dvc repro -s` ran
    each of :data:`BY_STAGE` (download to train); ``before[stage]``: a copy of it made just
    before ``stage`` first ran (the stages before it run, nothing of it or after it)."""
    repo = copy_project(base / "repo", TINY)
    _run_in(repo, "git", "init", "-q", "-b", "main")
    _run_in(repo, "git", "add", "-A")
    _run_in(repo, "git", "commit", "-qm", "tiny pipeline")
    before = {}
    for stage in BY_STAGE:
        if stage in KEPT_BEFORE:
            before[stage] = shutil.copytree(repo, base / f"before-{stage}", symlinks=True)
        _run_in(repo, sys.executable, "-m", "dvc", "repro", "-s", stage)
    return SimpleNamespace(repo=repo, before=before)


def finish_tiny_pipeline(built: SimpleNamespace) -> Path:
    """``built.repo`` (from :func:`build_tiny_pipeline`) after the stages after train ran too,
    the whole run committed: the repo itself, changed in place."""
    _run_in(built.repo, sys.executable, "-m", "dvc", "repro")
    _run_in(built.repo, "git", "add", "-A")
    _run_in(built.repo, "git", "commit", "-qm", "a run")
    return built.repo
