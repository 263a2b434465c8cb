"""`python -m stages.check` / `make check`: params.yaml checked with no DVC, before DVC touches
anything (under DVC a stage checks it only if it runs, and after its outputs were deleted)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import check
from tests import paramfile

ROOT = Path(__file__).resolve().parents[1]


def test_a_good_file_is_ok_and_exit_0(tmp_path, monkeypatch, capsys):
    paramfile.write(tmp_path)
    monkeypatch.chdir(tmp_path)
    check.main([])
    assert capsys.readouterr() == ("params.yaml: ok\n", "")


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, old
    return text.replace(old, new)


@pytest.mark.parametrize("old, new, needle", [
    # a stray key beside the real one: DVC sees no param of a stage change, says "up to date"
    ("  lr: ", "  lrr: 0.5\n  lr: ", "unknown key 'train.lrr'"),
    # a renamed key: DVC itself stops with "Parameters 'train.lr' are missing"
    ("  lr: ", "  lrate: ", "train.lr"),
    # a bad value: train refuses it only after DVC deleted train's outputs
    ("  arch: resnet18", "  arch: resnet51", "model.arch='resnet51' is not allowed"),
])
def test_a_bad_file_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, old, new, needle):
    paramfile.write(tmp_path, {"model": {"arch": "resnet18"}})
    path = tmp_path / "params.yaml"
    path.write_text(_edit(path.read_text(), old, new))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        check.main([])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith("error: params.yaml: ") and needle in err


def test_the_command_names_another_file_and_refuses_a_bad_option(tmp_path):
    paramfile.write(tmp_path)
    shutil.move(tmp_path / "params.yaml", tmp_path / "other.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "stages.check", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=120)

    ok = run("other.yaml")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "other.yaml: ok\n", "")
    missing = run()
    assert missing.returncode == 2 and missing.stderr.startswith("error: params.yaml: not found")
    bad = run("--bogus")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1
    assert "Traceback" not in missing.stderr + bad.stderr


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_repro_checks_params_before_dvc_runs(tmp_path):
    for name in ("Makefile", "requirements.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    venv_python = tmp_path / ".venv/bin/python"
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text("")
    venv_python.chmod(0o755)
    stamp = tmp_path / ".venv/.installed"
    stamp.write_text("")
    later = (tmp_path / "requirements.txt").stat().st_mtime + 10
    os.utime(stamp, (later, later))  # set up: make has nothing to install
    lines = subprocess.run(["make", "-n", "repro"], cwd=tmp_path, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    checks = [i for i, ln in enumerate(lines) if "python -m stages.check" in ln]
    repros = [i for i, ln in enumerate(lines) if ln.rstrip().endswith("dvc repro")]
    assert len(checks) == 1 and len(repros) == 1 and checks[0] < repros[0], lines
