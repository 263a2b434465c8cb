"""Atomic outputs: a failed or killed stage leaves the previous output whole, or nothing."""
import errno
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from stages.common.config.paths import TRAIN_RESUME
from stages.common.infra.atomic import atomic_dir, atomic_file, clean_dead_leftovers, write_json
from stages.common.infra.errors import StageError

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_dir_replaces_the_old_output_on_success(tmp_path):
    out = tmp_path / "crops"
    out.mkdir()
    (out / "old.jpg").write_text("old")
    with atomic_dir(out) as tmp:
        assert tmp != out and not list(tmp.iterdir())
        (tmp / "new.jpg").write_text("new")
        assert (out / "old.jpg").exists()  # untouched until the block ends
    assert [p.name for p in out.iterdir()] == ["new.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["crops"]  # no temporaries left


def test_atomic_dir_keeps_the_old_output_when_the_stage_fails(tmp_path):
    out = tmp_path / "crops"
    out.mkdir()
    (out / "old.jpg").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.jpg").write_text("half")
            raise RuntimeError("killed mid-way")
    assert [p.name for p in out.iterdir()] == ["old.jpg"]
    assert [p.name for p in tmp_path.iterdir()] == ["crops"]


def test_atomic_dir_removes_what_a_killed_run_left(tmp_path):
    stale = tmp_path / ".split.tmp-12345"  # a SIGKILLed run never reaches its cleanup
    stale.mkdir()
    (stale / "x.jpg").write_text("x")
    with atomic_dir(tmp_path / "split") as tmp:
        (tmp / "y.jpg").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split"]


def test_atomic_file_and_json(tmp_path):
    path = tmp_path / "metrics" / "eval.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert path.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        with atomic_file(path) as f:
            f.write("{broken")
            raise ValueError("interrupted")
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["eval.json"]


def test_the_next_write_removes_what_a_sigkill_left(tmp_path):
    # atomic_file killed inside its block: the temporary stays beside the file (no finally runs)
    stale_file = tmp_path / ".train.json.tmp-12345"
    stale_file.write_text('{"half": ')
    # atomic_dir killed between its two renames: the previous output moved aside, never removed
    stale_old = tmp_path / ".model.old-12345"
    stale_old.mkdir()
    (stale_old / "best.pt").write_text("old")
    write_json(tmp_path / "train.json", {"a": 1})
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "best.pt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "train.json"]


# ---------------------------------------------------------------------------------------------
# Destinations that are not what they seem

@pytest.mark.parametrize("directory", [False, True])
def test_a_symlink_at_the_destination_is_refused_and_left_alone(tmp_path, directory):
    """os.replace / rename over a link replaces the link itself: refused, in one line."""
    target = tmp_path / ("target_dir" if directory else "target.txt")
    if directory:
        target.mkdir()
        (target / "keep").write_text("keep")
    else:
        target.write_text("keep")
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(StageError) as err:
        if directory:
            with atomic_dir(link) as tmp:
                (tmp / "new").write_text("new")
        else:
            with atomic_file(link) as f:
                f.write("new")
    assert "is a symbolic link" in str(err.value) and "\n" not in str(err.value)
    assert link.is_symlink() and link.resolve() == target
    assert (target / "keep" if directory else target).read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", target.name])


def test_a_device_or_folder_at_a_file_destination_is_refused(tmp_path):
    # A FIFO stands for a device node: never a real one of /dev, which the code before this
    # check would replace by a regular file.
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StageError, match="not a regular file"):
        with atomic_file(fifo) as f:
            f.write("x")
    assert fifo.is_fifo()
    (tmp_path / "metrics.json").mkdir()
    with pytest.raises(StageError, match="not a regular file"):
        write_json(tmp_path / "metrics.json", {"a": 1})
    (tmp_path / "model").write_text("a file")
    with pytest.raises(StageError, match="not a directory"):
        with atomic_dir(tmp_path / "model"):
            pass


def test_a_link_planted_at_the_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    """O_EXCL | O_NOFOLLOW: even if a link sits where the temporary goes (planted after the
    stale-temporary cleanup), the file it points at is untouched."""
    from stages.common.infra import atomic

    victim = tmp_path / "victim"
    victim.write_text("precious")
    out = tmp_path / "eval.json"
    (tmp_path / f".eval.json.tmp-{os.getpid()}").symlink_to(victim)
    monkeypatch.setattr(atomic, "clean_stale", lambda path: None)
    with pytest.raises(StageError, match="appeared while"):
        write_json(out, {"a": 1})
    assert victim.read_text() == "precious" and not out.exists()


def test_a_full_disk_names_the_output_in_one_line(tmp_path, capsys):
    """ENOSPC in the middle of a write: one line naming the output (not its temporary), exit
    code 2, nothing half-written left."""
    from stages.common.infra.errors import main_guard

    @main_guard
    def stage():
        with atomic_dir(tmp_path / "model") as tmp:
            with atomic_file(tmp / "best.pt", "wb") as f:
                f.write(b"half a checkpoint")
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(SystemExit) as exc:
        stage()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot write {tmp_path / 'model' / 'best.pt'} (No space left on "
                   "device); free space and rerun\n")
    assert list(tmp_path.iterdir()) == []


def test_the_train_state_replaces_a_link_into_dvcs_cache(tmp_path):
    """DVC's symlink cache type checked the state out as a link into the cache when it was a
    persist out: the next epoch's state replaces the link and never writes through it."""
    from stages.train import state as TS

    cached = tmp_path / "cache" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"the cached state")
    state = tmp_path / "data" / "train_resume" / "0123456789abcdef.pt"
    state.parent.mkdir(parents=True)
    state.symlink_to(cached)
    TS.save({"fingerprint": {"params": {}}, "epoch": 3}, state)
    assert not state.is_symlink() and state.stat().st_size > 0
    assert cached.read_bytes() == b"the cached state"


# --------------------------------------------------------------------- what killed runs left

STAGES = ["download", "extract_crops", "split", "train", "calibrate", "evaluate", "conditions",
          "accept", "export"]


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_leftovers(root: Path, dead: int, live: int) -> tuple[list[Path], list[Path]]:
    """(what a killed run left beside or inside the outputs, what must stay): a live process's
    temporary, names that are no temporary of ours, and one too deep to be ours."""
    gone = [root / f"data/.export.tmp-{dead}", root / f"data/.model.old-{dead}",
            root / f"metrics/.eval.json.tmp-{dead}", root / f"plots/eval/.pr.csv.tmp-{dead}",
            root / f"data/calibration/.operating_point.json.tmp-{dead}"]
    kept = [root / f"data/.export.tmp-{live}", root / "data/.export.tmp-x1",
            root / f"data/export.tmp-{dead}", root / f"data/mirror/.README.md.tmp-{dead}",
            root / f"data/raw/data/.x.jpg.tmp-{dead}"]
    for path in gone + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        if ".export." in path.name or ".model." in path.name:
            path.mkdir()
            (path / "model.onnx").write_bytes(b"x" * 1000)
        else:
            path.write_text("half")
    return gone, kept


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_start_removes_what_dead_runs_left(stage, tmp_path, monkeypatch, capsys):
    """A SIGKILLed export leaves data/.export.tmp-<pid>; when `dvc repro` then restores export
    from the run cache, export never reruns to remove it. Every stage's start does, even one
    that stops at once (no params.yaml here), beside and inside the outputs dvc.yaml declares;
    a live process's temporaries, and anything not named as ours, stay."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    live = subprocess.Popen(["sleep", "60"])
    try:
        gone, kept = plant_leftovers(tmp_path, dead_pid(), live.pid)
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SystemExit) as exc:
            module = importlib.import_module(f"stages.{stage}")  # a package: its stage.py
            (getattr(module, "main", None) or importlib.import_module(f"stages.{stage}.stage").main)()
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert [p for p in gone if p.exists()] == [] and all(p.exists() for p in kept), err
        assert err.count("left by a killed run") == len(gone), err
    finally:
        live.kill()
        live.wait()


def test_loading_params_deletes_nothing(tmp_path, monkeypatch, capsys):
    """Reading params.yaml (params.load, and `python -m stages.check` on it) only reads: a dead
    run's leftovers beside the pipeline's outputs are the stages' to remove, at their start."""
    from stages import check
    from stages.common.config import params

    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    gone, kept = plant_leftovers(tmp_path, dead_pid(), os.getpid())
    monkeypatch.chdir(tmp_path)
    params.load()
    check.main([])
    assert all(p.exists() for p in gone + kept)
    assert capsys.readouterr().err == ""


def test_without_a_pipeline_here_nothing_is_touched(tmp_path, monkeypatch):
    """A command run outside the project (no dvc.yaml) removes nothing, whatever it finds."""
    gone, kept = plant_leftovers(tmp_path, dead_pid(), os.getpid())
    monkeypatch.chdir(tmp_path)
    assert clean_dead_leftovers() == [] and all(p.exists() for p in gone + kept)


def test_make_clean_removes_every_data_output_and_leftovers(tmp_path):
    """`make clean`: every data/ output dvc.yaml declares, the resume states and what killed runs
    left, gone; the committed data/mirror/README.md, a mirror there, metrics and plots kept."""
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values()
    outs = {e if isinstance(e, str) else next(iter(e)) for s in stages for e in s.get("outs", [])}
    data_outs = sorted(o for o in outs if o.startswith("data/"))
    assert len(data_outs) >= 6, data_outs
    data_outs.append(str(TRAIN_RESUME))  # interrupted trainings' states: no DVC out, removed too
    for out in data_outs:
        (tmp_path / out).mkdir(parents=True)
        (tmp_path / out / "f").write_text("x")
    gone, kept = plant_leftovers(tmp_path, dead_pid(), os.getpid())
    # make clean runs when no stage does: every temporary of ours goes, whatever its pid.
    gone += [p for p in kept if p.name.startswith(".export.tmp-")]
    kept = [p for p in kept if p not in gone and not any(
        p.is_relative_to(tmp_path / out) for out in data_outs)]
    for keep in ("data/mirror/README.md", "data/mirror/data/a.jpg", "metrics/eval.json",
                 "plots/train/loss.tsv"):
        (tmp_path / keep).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / keep).write_text("keep")
        kept.append(tmp_path / keep)
    subprocess.run(["make", "-s", "clean"], cwd=tmp_path, check=True, capture_output=True)
    assert [o for o in data_outs if (tmp_path / o).exists()] == []
    assert [p for p in gone if p.exists()] == [] and [p for p in kept if not p.exists()] == []
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted(
        [p.name for p in kept if p.parent == tmp_path / "data"] + ["mirror"])
