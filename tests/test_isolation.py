"""The suite does not depend on the user's configuration: a remote the user added to the
project (as docs/scale-out.md says to), their global DVC config or their git config."""
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import ISOLATED_ENV
from tests.tiny_project import TEST_DVC_CONFIG, copy_project

USER_CONFIG = """[core]
    remote = shared
    autostage = true
['remote "shared"']
    url = /nonexistent/team-cache
"""


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_a_project_copy_has_none_of_the_users_dvc_config(tmp_path):
    """The README's shared-cache steps, committed, once made the e2e test's `remote add shared`
    fail with "remote 'shared' already exists"."""
    user = tmp_path / "user-project"
    (user / ".dvc").mkdir(parents=True)
    (user / ".dvc/config").write_text(USER_CONFIG)
    (user / ".dvc/config.local").write_text("[core]\n    no_scm = true\n")
    (user / "dvc.yaml").write_text("stages: {}\n")
    _run(user, "git", "init", "-q")
    _run(user, "git", "add", "-A")

    copy = copy_project(tmp_path / "copy", {}, root=user)
    assert (copy / ".dvc/config").read_text() == TEST_DVC_CONFIG
    assert not (copy / ".dvc/config.local").exists()
    assert (copy / "dvc.yaml").is_file() and (copy / "params.yaml").is_file()
    _run(copy, "git", "init", "-q")
    added = _run(copy, sys.executable, "-m", "dvc", "remote", "add", "-d", "shared",
                 str(tmp_path / "remote"))
    assert added.returncode == 0, added.stderr
    listed = _run(copy, sys.executable, "-m", "dvc", "remote", "list")
    assert listed.stdout.split() == ["shared", str(tmp_path / "remote"), "(default)"]


def test_git_and_dvc_read_no_global_or_system_config(tmp_path):
    for name, value in ISOLATED_ENV.items():
        assert os.environ[name] == value
    home = Path(os.path.expanduser("~"))
    assert not Path(ISOLATED_ENV["DVC_GLOBAL_CONFIG_DIR"]).is_relative_to(home / ".config")
    assert _run(tmp_path, "git", "config", "--global", "--list").stdout == ""
    _run(tmp_path, "git", "init", "-q")
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc/config").write_text("")
    for level in ("--global", "--system"):
        shown = _run(tmp_path, sys.executable, "-m", "dvc", "config", level, "--list")
        assert shown.stdout.strip() == "", f"dvc config {level}: {shown.stdout}"


def test_a_workspace_left_changed_by_an_experiment_changes_no_tests_params(tmp_path):
    """The README's quick start runs `dvc exp run -S model.arch=resnet50`, which leaves
    params.yaml changed: the tests' params come from the commit, not from that workspace. A
    workspace whose keys differ (a new param, not committed yet) is the tests' params."""
    from tests.paramfile import project_defaults

    committed = "seed: 42\nmodel:\n  arch: resnet18\n"
    (tmp_path / "params.yaml").write_text(committed)
    for args in (["init", "-q"], ["add", "params.yaml"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "params"]):
        assert _run(tmp_path, "git", *args).returncode == 0
    (tmp_path / "params.yaml").write_text("seed: 7\nmodel:\n  arch: resnet50\n")
    assert project_defaults(tmp_path) == {"seed": 42, "model": {"arch": "resnet18"}}
    (tmp_path / "params.yaml").write_text("seed: 7\nmodel:\n  arch: resnet50\n  new_key: 1\n")
    assert project_defaults(tmp_path)["model"] == {"arch": "resnet50", "new_key": 1}
