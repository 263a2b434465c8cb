"""The reproducibility promise, exactly as README states it.

- The data stages (sample download, extract_crops, split) give the same bytes on every machine:
  rebuilt here from the committed params, their outputs have the hashes the committed dvc.lock
  records (a platform, library or code drift shows at once; run `dvc repro` and commit when the
  change is meant).
- Training is bit-identical on one machine with one thread count: two runs, same bytes.
  (Across machines or thread counts it is not: float sums in another order. README gives the
  band of accuracy measured over seeds and thread counts, BENCHMARKS.md the table.)
- A local mirror (data.source: mirror) is a DVC dependency: a change to its files makes
  `dvc status` report download changed, and `dvc repro` rerun it.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests import paramfile
from tests.tiny_project import ROOT, copy_project, write_colour_split

DATA_STAGES = ["download", "extract_crops", "split"]


def _env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
            "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _git_project(dest: Path, params: dict) -> Path:
    """A copy of the project in a git repo of its own (DVC needs one), first commit made."""
    copy_project(dest, params)
    _run(dest, "git", "init", "-q", "-b", "main")
    _run(dest, "git", "add", "-A")
    _run(dest, "git", "commit", "-qm", "copy")
    return dest


def _status(cwd: Path, *stages: str) -> dict:
    return json.loads(_run(cwd, sys.executable, "-m", "dvc", "status", "--json", *stages).stdout)


def _hash_changes(status: dict) -> dict:
    """``dvc status --json`` without "not in cache": that output has the lock's hash, and only
    this copy's DVC cache lacks it."""
    out = {}
    for stage, changes in status.items():
        for change in changes:
            outs = change.get("changed outs", {})
            kept = {path: what for path, what in outs.items() if what != "not in cache"}
            if kept or set(change) != {"changed outs"}:
                out.setdefault(stage, []).append({**change, "changed outs": kept} if outs else change)
    return out


def test_data_stages_give_the_hashes_of_the_committed_dvc_lock(tmp_path):
    project = copy_project(tmp_path / "p", {})  # the committed params, as written
    shutil.copyfile(ROOT / "dvc.lock", project / "dvc.lock")
    _run(project, "git", "init", "-q", "-b", "main")
    for stage in DATA_STAGES:  # as dvc repro runs them, without DVC deciding whether to
        _run(project, sys.executable, "-m", f"stages.{stage}")
    differ = _hash_changes(_status(project, *DATA_STAGES))
    assert not differ, (
        f"the data stages' outputs differ from the committed dvc.lock: {differ}; a platform or "
        "library drift, or a change not reproduced (run `dvc repro` and commit)")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``trained(name, workers)``: the folder where train ran once on the same colour split and
    params, with train.num_workers=workers. Each (name, workers) runs once per module: the two
    tests below share the run with one worker, "a", so four trainings are three."""
    done: dict[tuple[str, int], Path] = {}

    def train(name: str, workers: int) -> Path:
        if (name, workers) not in done:
            root = tmp_path_factory.mktemp(f"train-{name}-{workers}")
            write_colour_split(root, np.random.default_rng(0), {"train": 8, "val": 4}, 40)
            paramfile.write(root, {"model": {"arch": "resnet18", "weights": "none"},
                                   "train": {"epochs": 2, "batch_size": 8,
                                             "num_workers": workers, "device": "cpu",
                                             "nproc": 1}})
            _run(root, sys.executable, "-m", "stages.train")
            done[(name, workers)] = root
        return done[(name, workers)]
    return train


@pytest.mark.training
def test_training_twice_gives_the_same_checkpoint_bytes(trained):
    runs = []
    for name in ("a", "b"):
        root = trained(name, 1)
        # the timings are in metrics/speed/train.json: every figure here must match
        runs.append(((root / "data/model/best.pt").read_bytes(),
                     json.loads((root / "metrics/train.json").read_text())))
        timings = json.loads((root / "metrics/speed/train.json").read_text())
        assert set(timings) == {"train_seconds", "train_images_per_s", "device", "processes"}
    assert runs[0][1] == runs[1][1]
    assert runs[0][0] == runs[1][0], "same data, params, machine and threads: other weights"


def _written_by_train(root: Path) -> dict:
    """Every byte train writes, its timings aside (metrics/speed/train.json: they measure the
    machine)."""
    files = {p.relative_to(root).as_posix(): p.read_bytes()
             for out in ("data/model", "plots/train")
             for p in sorted((root / out).rglob("*")) if p.is_file()}
    return {**files, "metrics/train.json": (root / "metrics/train.json").read_bytes()}


@pytest.mark.training
def test_the_train_thread_count_changes_no_byte_train_writes(trained):
    """train.num_workers is no DVC param (stages.common.config.params.NO_OUTPUT): one thread or three
    decoding and augmenting, the same checkpoint, plots, metrics and resume marker."""
    written = [_written_by_train(trained("a", workers)) for workers in (1, 3)]
    assert set(written[0]) == set(written[1])
    for name in written[0]:
        assert written[0][name] == written[1][name], f"{name} differs with another thread count"


def test_a_changed_mirror_reruns_download(tmp_path):
    project = _git_project(tmp_path / "p", {"data": {"sample": {"images": 24, "max_side": 160}}})
    # a mirror in the Open Images layout: what the sample source writes to data/raw
    _run(project, sys.executable, "-m", "stages.download")
    mirror = tmp_path / "mirror"  # outside the repository, as a mounted disk would be
    shutil.move(project / "data/raw", mirror)
    paramfile.write(project, {"data": {"source": "mirror", "mirror": str(mirror),
                                       "sample": {"images": 24, "max_side": 160}}})
    first = _run(project, sys.executable, "-m", "dvc", "repro", "download")
    assert "Running stage 'download'" in first.stdout
    images = json.loads((project / "metrics/download.json").read_text())["images"]
    assert _status(project, "download") == {}

    for picture in sorted((mirror / "data").iterdir())[:3]:
        picture.unlink()
    changed = _status(project, "download")
    assert list(changed) == ["download"]
    assert {"changed deps": {str(mirror): "modified"}} in changed["download"]
    again = _run(project, sys.executable, "-m", "dvc", "repro", "download")
    assert "Running stage 'download'" in again.stdout
    assert json.loads((project / "metrics/download.json").read_text())["images"] < images
    assert _status(project, "download") == {}
