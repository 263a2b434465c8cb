"""What the README promises around an interrupted or failed run, in a real git + DVC copy of the
project on tiny params:

- Ctrl-C during `dvc exp run -S ...` ends train with one line, and the same command resumes from
  the last saved epoch (`dvc exp run` checks the committed outputs out before it runs: a resume
  state kept as a DVC out was replaced by the commit's, and the experiment trained from scratch).
- After a run that failed on a bad value (DVC had deleted train's outputs, `cache: false` ones
  included), the README's recovery brings every output back and `dvc status` is clean.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages.common.config.paths import TRAIN_METRICS, TRAIN_PLOTS, TRAIN_RESUME
from tests.tiny_project import pipeline_env as _env

# Not marked `training`: the fixture trains (2 epochs on a few dozen 32 px crops), but the tests
# check DVC's and the CLI's behaviour, and _env pins OMP_NUM_THREADS=1, so make test-threads
# would rerun them as they ran.

WAIT_S = 300
EXP = ["dvc", "exp", "run", "train", "-S", "train.lr=0.002"]


def _run(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=repo, env=_env(), capture_output=True, text=True,
                          timeout=WAIT_S)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def committed(tiny_pipeline) -> Path:
    """A git copy of the project whose commit holds a whole run of the pipeline (conftest's,
    shared with test_crash_safety: each test here works on a copy)."""
    return tiny_pipeline


def _copy(committed: Path, dest: Path) -> Path:
    shutil.copytree(committed, dest, symlinks=True)
    return dest


def _interrupt_after(repo: Path, args: list[str], line_start: str) -> tuple[int, str]:
    """Run ``args`` in a session of its own; at the first output line starting with
    ``line_start``, SIGINT the whole group, as Ctrl-C in a terminal does. (exit code, output)."""
    proc = subprocess.Popen(args, cwd=repo, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, sent = [], False
    deadline = time.monotonic() + WAIT_S
    try:
        for line in proc.stdout:
            out.append(line)
            if not sent and line.startswith(line_start):
                os.killpg(proc.pid, signal.SIGINT)
                sent = True
            assert time.monotonic() < deadline, "".join(out)
        proc.wait(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        proc.stdout.close()
    assert sent, f"no line starting {line_start!r}:\n{''.join(out)}"
    return proc.returncode, "".join(out)


def test_an_interrupted_exp_run_resumes_from_its_last_epoch(committed, tmp_path):
    repo = _copy(committed, tmp_path / "repo")
    code, out = _interrupt_after(repo, EXP, "[01] train:")
    assert code != 0 and "Traceback" not in out, out
    said = [ln for ln in out.splitlines() if ln.startswith("interrupted:")]
    assert len(said) == 1, out
    assert said[0].startswith(f"interrupted: train stopped; epoch 1 of 2 is saved in {TRAIN_RESUME}/")
    assert said[0].endswith("rerun the same command (dvc repro, or the same dvc exp run) and "
                            "train resumes from it")
    state = said[0].split(" is saved in ")[1].split(":")[0]
    assert (repo / state).is_file()

    again = _run(repo, *EXP)
    assert f"train: resuming from {state} after epoch 1 of 2" in again.stdout, again.stdout
    assert "[01] train:" not in again.stdout and "[02] train:" in again.stdout
    assert not (repo / TRAIN_RESUME).exists()  # removed once the outputs are in place
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["lr"] == 0.002


def test_the_readme_recovery_after_a_failed_run_restores_every_output(committed, tmp_path):
    """A bad value stops train after DVC deleted its outputs; `dvc checkout` alone leaves the
    `cache: false` ones (plots/train, metrics/train.json) deleted, so train would rerun; the
    README's recovery, git's part first, leaves nothing to run. `make check` (stages.check)
    had refused the value before DVC touched anything."""
    repo = _copy(committed, tmp_path / "repo")
    text = (repo / "params.yaml").read_text()
    assert "arch: resnet18" in text
    (repo / "params.yaml").write_text(text.replace("arch: resnet18", "arch: resnet51", 1))
    check = _run(repo, sys.executable, "-m", "stages.check", check=False)
    assert check.returncode == 2 and check.stdout == ""
    assert check.stderr.startswith("error: params.yaml: model.arch='resnet51' is not allowed")
    assert len(check.stderr.splitlines()) == 1

    failed = _run(repo, "dvc", "repro", "train", check=False)
    assert failed.returncode != 0
    assert not (repo / TRAIN_METRICS).exists() and not (repo / TRAIN_PLOTS).exists()

    _run(repo, "git", "checkout", "--", "params.yaml")  # the value put right
    _run(repo, "dvc", "checkout")
    assert not (repo / TRAIN_METRICS).exists(), "dvc checkout restored a cache: false output"
    assert "train" in _run(repo, "dvc", "status").stdout

    _run(repo, "git", "checkout", "--", "metrics", "plots", "dvc.lock")  # the README's recovery
    _run(repo, "dvc", "checkout")
    assert (repo / TRAIN_METRICS).is_file() and (repo / TRAIN_PLOTS).is_dir()
    assert "Data and pipelines are up to date." in _run(repo, "dvc", "status").stdout
    assert "Running stage" not in _run(repo, "dvc", "repro", "train").stdout
    assert _run(repo, "git", "status", "--porcelain").stdout == ""
