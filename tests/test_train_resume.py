"""Crash safety of the train stage: a run killed with SIGKILL resumes from its state in
data/train_resume (one file per run fingerprint, stages/train/state.py).

The stage prints an epoch's ``[NN] train:`` line only once that epoch's state is on disk, so the
test kills the process (and its whole process group: data-loader workers too, as a crash would)
the moment it reads that line. The resumed run must end with the same checkpoint bytes, the same
metrics/train.json and the same DVCLive plots as an uninterrupted run.
"""
import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from stages.common.config.paths import TRAIN_RESUME
from stages.train import state as TS
from tests import paramfile
from tests.tiny_project import COLOURS, write_colour_split


# Not marked `training`: each stage run here is a subprocess with OMP_NUM_THREADS=1 (_env), so
# make test-threads would rerun them as they ran; the in-process tests check messages and the
# state file, not floats. Mark the resume test `training` again if _env stops pinning it.

ROOT = Path(__file__).resolve().parents[1]
EPOCHS, PATIENCE, KILL_AFTER = 5, 2, 2  # the data makes the best epoch early: a stop before 5
RUN_TIMEOUT_S = 180


def _make_project(root: Path, val_against_train: bool = True, **train) -> Path:
    """A tiny split (same bytes every call) and params for it; ``train`` overrides train.*.

    ``val_against_train``: each val class wears another class's colour, so the val loss rises as
    the model learns: the best epoch is the first, and early stopping ends the run. A resumed run
    then has to take the best weights and the early-stopping counters from the state."""
    labels = list(COLOURS)

    def colour_of(split: str, label: str) -> tuple[int, int, int]:
        if split == "val" and val_against_train:
            return COLOURS[labels[(labels.index(label) + 1) % 3]]
        return COLOURS[label]

    write_colour_split(root, np.random.default_rng(0), {"train": 8, "val": 4}, 60, colour_of)
    # BatchNorm trains in layer4, dropout 0.3 before fc: every kind of state a resume must restore
    paramfile.write(root, {
        "model": {"arch": "resnet18", "weights": "none", "trainable": ["layer4", "fc"]},
        "train": {"epochs": EPOCHS, "batch_size": 8, "num_workers": 1, "device": "cpu",
                  "nproc": 1, "patience": PATIENCE, **train}})
    return root


def _env() -> dict:
    # One thread per run: two runs share 2 cores below, and oversubscribed CPU threads make a
    # run several times slower. Both runs a test compares use the same setting.
    return {"OMP_NUM_THREADS": "1", **os.environ, "PYTHONPATH": str(ROOT),
            "DVC_NO_ANALYTICS": "1"}


def _run(root: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"train exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _run_and_kill_after(root: Path, epoch: int) -> tuple[str, str]:
    """Start the stage; SIGKILL it (and its workers) as soon as epoch ``epoch``'s line is out.
    Returns (stdout, stderr) up to the kill."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        for line in proc.stdout:
            out.append(line)
            if line.startswith(f"[{epoch:02d}] train:"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "no epoch line in time"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, f"not killed ({proc.returncode}):\n{err[-3000:]}"
    return "".join(out), err


def _states(root: Path) -> list[Path]:
    """The state files under root (relative to it), oldest first."""
    found = sorted((root / TRAIN_RESUME).glob("*.pt"), key=lambda p: p.stat().st_mtime_ns)
    return [p.relative_to(root) for p in found]


def _state_file(root: Path) -> Path:
    """The one state file under root (relative to it)."""
    found = _states(root)
    assert len(found) == 1, found
    return found[0]


def _state(root: Path) -> dict:
    return torch.load(root / _state_file(root), map_location="cpu", weights_only=True)


def _metrics(root: Path) -> dict:
    """metrics/train.json, whole: its timings are in metrics/speed/train.json."""
    return json.loads((root / "metrics/train.json").read_text())


def _plots(root: Path) -> dict:
    live = root / "plots/train"
    return {p.relative_to(live).as_posix(): p.read_bytes()
            for p in sorted(live.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Side by side: an uninterrupted run, and one killed right after epoch KILL_AFTER's state
    was written (with a copy of that state)."""
    ref = _make_project(tmp_path_factory.mktemp("uninterrupted"))
    root = _make_project(tmp_path_factory.mktemp("killed"))
    proc = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=ref, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, _ = _run_and_kill_after(root, KILL_AFTER)
    finally:
        ref_out, ref_err = proc.communicate(timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"train exited {proc.returncode}:\n{ref_err[-3000:]}"
    return {"reference": (ref, ref_out), "killed": (root, out),
            "state": (_state_file(root), (root / _state_file(root)).read_bytes())}


@pytest.fixture(scope="module")
def reference(runs):
    return runs["reference"]


@pytest.fixture(scope="module")
def killed(runs):
    return (*runs["killed"], runs["state"])


def test_killed_run_resumes_to_the_checkpoint_metrics_and_plots_of_an_uninterrupted_one(
        reference, killed):
    ref, ref_out = reference
    root, out, _ = killed
    state = _state(root)
    assert state["epoch"] == KILL_AFTER and not state["finished"]
    assert len(state["history"]) == KILL_AFTER
    assert not (root / "data/model/best.pt").exists()  # the kill left no output

    path = _state_file(root)
    resumed = _run(root)
    assert f"resuming from {path} after epoch {KILL_AFTER} of {EPOCHS}" in resumed.stdout
    assert "[01] train:" not in resumed.stdout and "[03] train:" in resumed.stdout
    # each epoch's line is the one the uninterrupted run printed
    ref_lines = [ln for ln in ref_out.splitlines() if ln.startswith("[")]
    got = [ln for ln in (out + resumed.stdout).splitlines() if ln.startswith("[")]
    assert got == ref_lines

    # the same checkpoint, byte for byte (torch.save of equal tensors and metadata is)
    assert (root / "data/model/best.pt").read_bytes() == (ref / "data/model/best.pt").read_bytes()
    assert _metrics(root) == _metrics(ref)
    # What the data is built for, an assumption about what the model learns (val wears another
    # class's colour, so its loss rises as training goes on; best epoch 1 on every run seen): the
    # best epoch comes before the kill and early stopping ends the run after it, so the resumed
    # run had to take the best weights and the early-stopping counters from the state.
    ran = _metrics(ref)
    assert ran["stopped_early"] and ran["best_epoch"] <= KILL_AFTER < ran["epochs_run"], \
        f"the data no longer stops the run early after the kill, so this test checks less: {ran}"
    assert ran["epochs_run"] == ran["best_epoch"] + PATIENCE  # early stopping's own rule
    assert _plots(root) == _plots(ref)
    # once the outputs are in place the state is gone, as after the reference: the same name
    assert _states(root) == _states(ref) == []
    assert path == TS.state_file(_state_fingerprint(killed))


def _state_fingerprint(killed) -> dict:
    _, state_bytes = killed[2]
    return torch.load(io.BytesIO(state_bytes), weights_only=True)["fingerprint"]


def test_a_run_of_other_params_keeps_the_old_state_and_says_why_it_does_not_fit(killed,
                                                                                 tmp_path):
    """What `dvc exp run -S train.lr=0.002` after an interrupted workspace run does: it trains
    from scratch, saying why the state there is not its own, and writes its own state beside
    it; the old one stays, byte for byte, for its own recipe's rerun."""
    path, state_bytes = killed[2]
    root = _make_project(tmp_path, lr=0.002)
    (root / path).parent.mkdir(parents=True)
    (root / path).write_bytes(state_bytes)
    out, err = _run_and_kill_after(root, 1)
    assert f"train: no state of this run in {TRAIN_RESUME}; the newest there ({path.name}) does " \
        "not fit: it was written with other params (train.lr: 0.001 -> 0.002); training from " \
        "scratch" in out.splitlines()
    assert str(TRAIN_RESUME) not in err
    assert "resuming" not in out and "[01] train:" in out
    assert (root / path).read_bytes() == state_bytes
    states = _states(root)
    assert len(states) == 2 and states[0] == path
    state = torch.load(root / states[1], weights_only=True)  # the new run's own state
    assert state["epoch"] == 1 and state["fingerprint"]["params"]["train.lr"] == 0.002


def test_corrupt_state_is_reported_and_training_starts_from_scratch(killed, tmp_path):
    path, state_bytes = killed[2]
    root = _make_project(tmp_path)
    (root / path).parent.mkdir(parents=True)
    (root / path).write_bytes(state_bytes[: len(state_bytes) // 2])  # truncated
    out, err = _run_and_kill_after(root, 1)
    lines = [ln for ln in err.splitlines() if str(path) in ln]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"train: ignoring {path}: cannot load it (")
    assert lines[0].endswith("; training from scratch")
    assert "resuming" not in out and "[01] train:" in out
    assert _state(root)["epoch"] == 1


def test_state_of_a_finished_training_gives_its_outputs_without_training(killed, tmp_path):
    """A kill after the last epoch's state but before the outputs were in place: the rerun
    writes the outputs from the state (here: as if early stopping had ended the run at
    KILL_AFTER), training nothing."""
    path, state_bytes = killed[2]
    root = _make_project(tmp_path)
    state = torch.load(io.BytesIO(state_bytes), weights_only=True)
    state["finished"] = True
    TS.save({k: v for k, v in state.items() if k != "format"}, root / path)
    proc = _run(root)
    assert (f"{path}: this run finished training after epoch {KILL_AFTER}; "
            "writing its outputs without training") in proc.stdout
    assert "] train: [" not in proc.stdout
    ckpt = torch.load(root / "data/model/best.pt", weights_only=True)
    best = state["best"]["best_epoch"]  # whichever epoch it was: the outputs are the state's
    assert 1 <= best <= KILL_AFTER and ckpt["epoch"] == best
    assert all(torch.equal(ckpt["model_state"][k], v) for k, v in state["best_model"].items())
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["epochs_run"] == KILL_AFTER and metrics["best_epoch"] == best
    assert len((root / "plots/train/plots/metrics/val/loss.tsv").read_text().splitlines()) == \
        1 + KILL_AFTER  # header + one row per epoch, rebuilt from the history
    assert _states(root) == []


def test_train_runs_in_a_git_repo_with_no_commit_yet(reference, tmp_path):
    """`git init` and `dvc repro` before the first commit: DVCLive 3.49 alone fails there
    ("Empty git repo"); the stage runs, with the same checkpoint, metrics and plots."""
    ref, _ = reference
    root = _make_project(tmp_path)
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    proc = _run(root)
    assert "Empty git repo" not in proc.stderr
    assert _metrics(root) == _metrics(ref)
    assert _plots(root) == _plots(ref)
    assert (root / "data/model/best.pt").read_bytes() == (ref / "data/model/best.pt").read_bytes()


# ----- the state file itself, in process (fast) ------------------------------------------------

def _fp(root: Path, **params) -> dict:
    return TS.fingerprint({"seed": 42, "model.arch": "resnet18", "train.lr": 0.001, **params},
                          {s: root / "data/split" / s for s in ("train", "val")}, 1,
                          torch.device("cpu"))


class _Payload:
    def __reduce__(self):
        return (print, ("pickled code ran",))


@pytest.mark.parametrize("content", ["garbage", "pickled", "empty", "other-format"])
def test_unloadable_state_is_one_stderr_line_and_ignored(tmp_path, capsys, content):
    _make_project(tmp_path)
    path = tmp_path / "state.pt"
    if content == "garbage":
        path.write_bytes(b"\x00not a torch file" * 100)
    elif content == "pickled":  # weights_only refuses it: no code from the file ever runs
        torch.save({"format": TS.FORMAT, "fingerprint": _Payload()}, path, pickle_module=pickle)
    elif content == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"format": TS.FORMAT + 1, "fingerprint": {}}, path)
    assert TS.load(_fp(tmp_path), path) is None
    captured = capsys.readouterr()
    assert "pickled code ran" not in captured.out
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert captured.err.startswith(f"train: ignoring {path}: ")


def test_changed_data_or_code_is_named(tmp_path, monkeypatch):
    _make_project(tmp_path)
    fp = _fp(tmp_path)
    assert TS.mismatch(fp, _fp(tmp_path)) is None
    img = tmp_path / "data/split/val/person/0.png"
    img.write_bytes(img.read_bytes() + b"\0")
    assert TS.mismatch(fp, _fp(tmp_path)) == "the training data changed since (data/split/val)"
    code = dict(fp, code={**fp["code"], "stages/train/stage.py": "0" * 32})
    assert TS.mismatch(code, fp) == (
        "the train stage's code changed since (stages/train/stage.py)")
    assert TS.mismatch(fp, _fp(tmp_path, **{"model.arch": "resnet50", "train.lr": 0.01})) == (
        "it was written with other params (model.arch: 'resnet18' -> 'resnet50', "
        "train.lr: 0.001 -> 0.01)")


def test_each_fingerprint_has_a_state_file_of_its_own(tmp_path):
    _make_project(tmp_path)
    fp = _fp(tmp_path)
    assert TS.state_file(fp) == TS.state_file(_fp(tmp_path))
    assert TS.state_file(fp).parent == TRAIN_RESUME
    others = [_fp(tmp_path, **{"model.arch": "resnet50"}),
              dict(fp, run={**fp["run"], "processes": 2}),
              dict(fp, code={**fp["code"], "stages/train/stage.py": "0" * 32})]
    names = {TS.state_file(f) for f in [fp, *others]}
    assert len(names) == 4


def test_no_state_is_silent_and_another_recipes_state_is_one_stdout_line(tmp_path, capsys):
    _make_project(tmp_path)
    folder = tmp_path / "resume"
    assert TS.load(_fp(tmp_path), TS.state_file(_fp(tmp_path), folder)) is None
    assert capsys.readouterr() == ("", "")
    other = TS.state_file(_fp(tmp_path, **{"train.lr": 0.01}), folder)
    TS.save({"fingerprint": _fp(tmp_path, **{"train.lr": 0.01}), "epoch": 1}, other)
    assert TS.load(_fp(tmp_path), TS.state_file(_fp(tmp_path), folder)) is None
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == (
        f"train: no state of this run in {folder}; the newest there ({other.name}) does not "
        "fit: it was written with other params (train.lr: 0.01 -> 0.001); training from "
        "scratch\n")
    assert other.is_file()


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    dev = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    TS.save({"rng": TS.rng_state(dev)}, tmp_path / "s.pt")
    expected = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    TS.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"], dev)
    got = torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)]
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def _processes_in(root: Path) -> list[int]:
    """Pids of live processes whose working directory is ``root`` (Linux /proc)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == root:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_processes_killed_leave_no_worker_and_all_ranks_resume(tmp_path):
    """train.nproc: 2 relaunches under torchrun, which puts each worker in a session of its own;
    killing the stage's process group must still stop them (they die with their parent), and on
    the rerun every rank loads the state and continues from it."""
    root = _make_project(tmp_path.resolve(), val_against_train=False, nproc=2, epochs=2,
                         num_workers=0)
    out, _ = _run_and_kill_after(root, 1)
    deadline = time.monotonic() + 20
    while _processes_in(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in(root) == [], "torchrun workers outlived the killed stage"
    assert _state(root)["epoch"] == 1 and len(_state(root)["rng"]) == 2  # each rank's RNG

    path = _state_file(root)
    resumed = _run(root)
    assert f"resuming from {path} after epoch 1 of 2" in resumed.stdout
    assert "[01] train:" not in resumed.stdout and resumed.stdout.count("[02] train:") == 1
    assert json.loads((root / "metrics/train.json").read_text())["processes"] == 2
    assert _states(root) == []


def test_diverged_training_stops_with_one_line_naming_the_learning_rate(tmp_path):
    """A learning rate that blows the weights up gives a NaN loss: the stage says so at that
    epoch instead of failing later without a best epoch."""
    root = _make_project(tmp_path, lr=1.0e30, weight_decay=0.0)
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: epoch 1: the loss is not a number") and "train.lr" in last
    assert not (root / "data/model").exists()


def test_a_full_disk_while_saving_the_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    """ENOSPC half-way through best.pt (injected into torch.save, the real write path): one
    line naming the output and what to do, exit code 2, instead of a 40-line traceback; and,
    as before, nothing half-written in data/model or metrics."""
    import errno

    from stages.train import stage as train

    root = _make_project(tmp_path, val_against_train=False, epochs=1, num_workers=0)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and "model_state" in obj:  # the checkpoint, not the state
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.chdir(root)
    with pytest.raises(SystemExit) as exc:
        train.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("error: cannot write data/model/best.pt (No space left on "
                                    "device); free space and rerun")
    assert "Traceback" not in err
    assert not (root / "data/model").exists() and not (root / "metrics/train.json").exists()
    assert not list((root / "data").glob(".model.*"))


def test_the_fingerprint_reads_the_train_stage_code_from_dvc_yaml():
    """One list: the code a resumed state must have been written by is train's deps in dvc.yaml,
    a package folder standing for its files (bytecode caches aside)."""
    import yaml

    files = TS.code_files()
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["train"]["deps"]
    code = [d for d in deps if d.startswith("stages/")]
    assert "stages/train" in code and {"stages/train/stage.py", "stages/train/state.py",
                                       "stages/common/model/build.py"} <= set(files)
    assert all(any(f == d or f.startswith(d + "/") for d in code) for f in files)
    assert not any("__pycache__" in f or f.endswith(".pyc") for f in files)
