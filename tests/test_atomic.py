"""Atomic outputs: a failed or killed stage leaves the previous output whole, or nothing."""
import json

import pytest

from stages.common.atomic import atomic_dir, atomic_file, write_json


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
