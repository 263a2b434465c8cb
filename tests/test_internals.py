"""The adapters that touch FiftyOne's, DVC's and DVCLive's private names hold what they declare.

stages/download/fiftyone_internals.py and stages/common/infra/dvc_internals.py are the only modules
that reach into a library's internals (tests/test_layout.py). These tests fail, naming the
attribute and the pinned version, when the installed library lacks a name an adapter uses or
takes other parameters, or when the pins drift apart; and show that an adapter refuses in one
line, exit code 2, on a version it was not written for.
"""
from __future__ import annotations

import importlib
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from stages.common.infra import dvc_internals, internals
from stages.common.infra.errors import StageError
from stages.common.infra.internals import Library, Private
from stages.download import fiftyone_internals, zoo
from tests.test_download import run_stage, write_params

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = [fiftyone_internals.FIFTYONE, dvc_internals.DVC, dvc_internals.DVCLIVE]


def pins() -> dict[str, str]:
    text = (ROOT / "requirements.txt").read_text()
    return dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", text, flags=re.M))


@pytest.mark.parametrize("lib", LIBRARIES, ids=lambda lib: lib.dist)
def test_adapter_is_written_for_the_version_requirements_txt_pins(lib: Library) -> None:
    assert pins().get(lib.dist) == lib.pinned, (
        f"requirements.txt pins {lib.dist} {pins().get(lib.dist)}, {lib.adapter} was written "
        f"against {lib.pinned}: read that version's source for each name in the adapter's "
        "needs, then update the adapter and its pin together")


@pytest.mark.parametrize("lib", LIBRARIES, ids=lambda lib: lib.dist)
def test_installed_library_holds_every_private_name_the_adapter_uses(lib: Library) -> None:
    found = internals.problems(lib)
    assert not found, "\n".join(found)


# ------------------------------------------------------------------ the checks themselves

@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A module ``fake_lib`` with a function, a table and an exception class."""
    module = types.ModuleType("fake_lib")
    module.fetch = lambda path, url, quiet=0: None
    module.TABLE = {"a": 1}
    module.Failed = type("Failed", (OSError,), {})
    monkeypatch.setitem(sys.modules, "fake_lib", module)
    return module


def library(*needs: Private) -> Library:
    """A Library whose version is the installed pytest's, so only ``needs`` can differ."""
    return Library(dist="pytest", pinned=internals.installed("pytest"), adapter="adapter.py",
                   needs=needs, instead="use the mirror")


@pytest.mark.parametrize("need, why", [
    (Private("fake_lib", "fetch", params=("path", "url", "quiet")), None),
    (Private("fake_lib", "gone", params=("path",)), "fake_lib.gone missing"),
    (Private("fake_lib", "fetch", params=("path", "url")),
     "fake_lib.fetch takes (path, url, quiet), not (path, url)"),
    (Private("fake_lib", "TABLE", params=()), "fake_lib.TABLE not callable (dict)"),
    (Private("fake_lib", "TABLE", is_a=types.ModuleType), "fake_lib.TABLE a dict, not a module"),
    (Private("fake_lib", "Failed", subclass_of=OSError), None),
    (Private("fake_lib", "TABLE", subclass_of=OSError), "fake_lib.TABLE not a subclass of OSError"),
    (Private("no_such_lib.sub", "x"), "cannot import no_such_lib.sub"),
])
def test_a_missing_or_changed_name_is_named_with_the_pinned_version(fake, need, why) -> None:
    found = internals.problems(library(need))
    if why is None:
        assert found == []
    else:
        assert len(found) == 1 and why in found[0], found
        assert found[0].startswith(f"pytest {internals.installed('pytest')}: "), found


def test_a_swapped_name_is_noticed(fake) -> None:
    lib = library(Private("fake_lib", "fetch", params=("path", "url", "quiet")))
    fake.fetch = lambda path: None
    assert internals.problems(lib) == [
        f"pytest {lib.pinned}: fake_lib.fetch takes (path), not (path, url, quiet) "
        "(adapter.py needs it)"]


def test_another_version_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = fiftyone_internals.FIFTYONE
    monkeypatch.setattr(internals, "installed", lambda dist: "9.0.0")
    with pytest.raises(StageError) as exc:
        internals.require(lib)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"fiftyone 9.0.0 is installed, but {lib.adapter} was written "
                               f"against fiftyone {lib.pinned}'s internals; install the pinned "
                               f"version (pip install fiftyone=={lib.pinned}")
    assert message.endswith("or use a local copy (data.source: mirror)")


def test_download_refuses_another_fiftyone_before_touching_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import fiftyone as fo

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fo.config, "dataset_zoo_dir", str(tmp_path / "zoo"))
    monkeypatch.setattr(internals, "installed", lambda dist: "1.99.0")
    write_params(tmp_path, source="open-images-v7")
    need = fiftyone_internals.FIFTYONE.needs[0]
    before = getattr(importlib.import_module(need.module), need.name)
    with pytest.raises(SystemExit) as exc:
        run_stage()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: fiftyone 1.99.0 is installed") and "\n" not in err, err
    assert getattr(importlib.import_module(need.module), need.name) is before
    assert not (tmp_path / "data/raw").exists()


def test_hooks_are_put_back_when_the_block_fails(tmp_path: Path) -> None:
    needs = fiftyone_internals.FIFTYONE.needs
    before = [getattr(importlib.import_module(n.module), n.name) for n in needs]
    with pytest.raises(RuntimeError), zoo.patched(tmp_path, 1):
        during = [getattr(importlib.import_module(n.module), n.name) for n in needs]
        raise RuntimeError("a failed download")
    assert [a is b for a, b in zip(during[:4], before[:4])] == [False] * 4
    assert [getattr(importlib.import_module(n.module), n.name) for n in needs] == before


# ------------------------------------------------------------------ DVC and DVCLive

def git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


def live_files(folder: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Open DVCLive as the train stage does in ``folder``, log two steps; the files it wrote."""
    from dvclive import Live

    monkeypatch.chdir(folder)
    live = dvc_internals.open_live(lambda: Live(dir="plots/train", dvcyaml=False,
                                                save_dvc_exp=False, report=None))
    for loss in (0.5, 0.25):
        live.log_metric("loss", loss, plot=True)
        live.next_step()
    live.end()
    return {p.relative_to(folder).as_posix(): without_timestamps(p.read_text())
            for p in sorted((folder / "plots").rglob("*")) if p.is_file()}


def without_timestamps(text: str) -> str:
    """A DVCLive .tsv without its first column, the wall-clock time of each step."""
    lines = text.splitlines()
    if lines and lines[0].startswith("timestamp\t"):
        return "\n".join(line.split("\t", 1)[1] for line in lines)
    return text


def test_dvclive_opens_in_a_repository_with_no_commit_and_writes_the_same_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need = dvc_internals.DVCLIVE.needs[0]
    before = getattr(importlib.import_module(need.module), need.name)
    fresh, committed = tmp_path / "fresh", tmp_path / "committed"
    for folder in (fresh, committed):
        folder.mkdir()
        git(folder, "init", "-q")
    (committed / "README").write_text("x")
    git(committed, "add", "README")
    git(committed, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    written = live_files(fresh, monkeypatch)
    assert "plots/train/metrics.json" in written and "plots/train/plots/metrics/loss.tsv" in written
    assert written == live_files(committed, monkeypatch)
    assert getattr(importlib.import_module(need.module), need.name) is before


def test_revision_resolver_answers_as_dvc(tmp_path: Path) -> None:
    with pytest.raises(dvc_internals.NoRepository):
        dvc_internals.revision_resolver(tmp_path)
    git(tmp_path, "init", "-q")
    (tmp_path / "README").write_text("x")
    git(tmp_path, "add", "README")
    git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    resolve = dvc_internals.revision_resolver(tmp_path)
    assert resolve("HEAD") == git(tmp_path, "rev-parse", "HEAD")
    with pytest.raises(dvc_internals.UnknownRevision, match="no-such-rev"):
        resolve("no-such-rev")


def test_dvc_adapter_refuses_another_version_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = internals.installed
    monkeypatch.setattr(internals, "installed",
                        lambda dist: "3.99.0" if dist == "dvc" else real(dist))
    with pytest.raises(StageError, match=r"^dvc 3\.99\.0 is installed, but "
                                         r"stages/common/infra/dvc_internals\.py was written against "
                                         r"dvc 3\.67\.1's internals; .*or run without --rev"):
        dvc_internals.revision_resolver(tmp_path)
