"""Every third-party module that stages/, benchmarks/ and tests/ import is pinned with == in
requirements.txt: a module that arrives only as a dependency of a dependency comes at whatever
version that dependency allows, and the pipeline's results (or what the tests check) could drift
with it. And what pip cannot install (.ci/prerequisites, run by `make` first) is named in one
line with the package that brings it."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CODE = ("stages", "benchmarks", "tests")


def normalized(name: str) -> str:
    """A distribution's name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(requirements: Path) -> set[str]:
    """The distributions requirements.txt pins with ``==``."""
    names = set()
    for line in requirements.read_text().splitlines():
        match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==", line)
        if match:
            names.add(normalized(match[1]))
    return names


def imports(folder: Path) -> dict[str, set[str]]:
    """{absolute module name: the files under ``folder`` that import it}."""
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name, set()).add(path.relative_to(folder.parent).as_posix())
    return found


@cache
def top_level_distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


@cache
def files_of(dist: str) -> frozenset[str]:
    return frozenset(f.as_posix() for f in metadata.distribution(dist).files or ())


def providers(module: str) -> frozenset[str]:
    """The distributions that hold ``module``: where several install its top-level name
    (``fiftyone``: fiftyone, fiftyone-brain, fiftyone_db, ...), the one that installs its file or
    its closest package's."""
    parts = module.split(".")
    dists = top_level_distributions().get(parts[0], [])
    for n in range(len(parts), 0, -1) if len(dists) > 1 else ():
        base = "/".join(parts[:n])
        holders = [d for d in dists if {f"{base}.py", f"{base}/__init__.py"} & files_of(d)]
        if holders:
            return frozenset(normalized(d) for d in holders)
    return frozenset(normalized(d) for d in dists)


def unpinned(root: Path, folders: tuple[str, ...]) -> list[str]:
    """One line per third-party import of ``root``'s ``folders`` that requirements.txt does not
    pin with ``==`` (or that no installed distribution provides)."""
    pins = pinned(root / "requirements.txt")
    problems = []
    found: dict[str, set[str]] = {}
    for folder in folders:
        for module, files in imports(root / folder).items():
            found.setdefault(module, set()).update(files)
    for module, files in sorted(found.items()):
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or (root / top).is_dir() or (root / f"{top}.py").exists():
            continue
        where = ", ".join(sorted(files)[:3])
        dists = providers(module)
        if not dists:
            problems.append(f"{module} (imported by {where}): no installed distribution has it")
        elif not dists & pins:
            problems.append(f"{module} (imported by {where}): {' or '.join(sorted(dists))} not "
                            "pinned with == in requirements.txt")
    return problems


def test_every_direct_import_of_the_code_is_pinned():
    assert unpinned(ROOT, CODE) == []


def test_an_unpinned_import_is_named(tmp_path):
    """Controls: the check sees imports inside functions and dotted ones, maps a module to the
    distribution of another name that installs it (yaml: PyYAML, google.protobuf: protobuf),
    and passes the standard library and the project's own packages."""
    (tmp_path / "stages").mkdir()
    (tmp_path / "stages" / "a.py").write_text(
        "import os\nimport stages.b\nfrom stages import c\n"
        "def f():\n    import yaml\n    from google.protobuf.message import DecodeError\n")
    (tmp_path / "requirements.txt").write_text("# pyyaml==6.0.4 in a comment is no pin\n"
                                                "protobuf>=1\n")
    assert unpinned(tmp_path, ("stages",)) == [
        "google.protobuf.message (imported by stages/a.py): protobuf not pinned with == in "
        "requirements.txt",
        "yaml (imported by stages/a.py): pyyaml not pinned with == in requirements.txt"]
    (tmp_path / "requirements.txt").write_text("PyYAML==6.0.4\nprotobuf == 7.36.2\n")
    assert unpinned(tmp_path, ("stages",)) == []
    (tmp_path / "stages" / "a.py").write_text("import no_such_module_anywhere\n")
    assert unpinned(tmp_path, ("stages",)) == [
        "no_such_module_anywhere (imported by stages/a.py): no installed distribution has it"]


# What pip cannot install: .ci/prerequisites, which `make repro` / `make test` run first.
FAKE_PYTHON = """#!/bin/sh
case "$2" in *version_info*) echo {version};; *ensurepip*) exit {venv};; esac
"""


def prerequisites(tmp_path: Path, *args: str, path: str | None = None):
    """.ci/prerequisites ARGS, copied into ``tmp_path`` (no .venv there) with ``fake/`` first on
    PATH: fake/py312 is Python 3.12, fake/pynovenv a 3.11 without the venv module."""
    fake = tmp_path / "fake"
    if not fake.exists():
        (tmp_path / ".ci").mkdir()
        shutil.copy(ROOT / ".ci" / "prerequisites", tmp_path / ".ci" / "prerequisites")
        shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
        fake.mkdir()
        for name, version, venv in [("py312", "3.12", 0), ("pynovenv", "3.11", 1),
                                    ("py311", "3.11", 0)]:
            (fake / name).write_text(FAKE_PYTHON.format(version=version, venv=venv))
            (fake / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{path or os.environ['PATH']}"}
    return subprocess.run(["bash", ".ci/prerequisites", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_a_missing_prerequisite_is_one_line_naming_its_package(tmp_path):
    ok = prerequisites(tmp_path, "py311")
    assert (ok.returncode, ok.stderr) == (0, "")
    for python, line in [
            ("py312", "error: py312 is Python 3.12, not 3.11 (requirements.txt pins for 3.11); "
                      "install Python 3.11 (apt-get install python3.11) and run make "
                      "PYTHON=python3.11"),
            ("pynovenv", "error: pynovenv has no venv module (it creates .venv); install it "
                         "(apt-get install python3.11-venv)"),
            ("nosuch", "error: nosuch not found; install Python 3.11 (apt-get install "
                       "python3.11), or name it: make PYTHON=/path/to/python3.11")]:
        proc = prerequisites(tmp_path, python)
        assert (proc.returncode, proc.stderr) == (2, line + "\n")
    packages = prerequisites(tmp_path, "--packages", "pynovenv")
    assert packages.returncode == 0 and "python3.11-venv" in packages.stdout.split()
    # A PATH with the tools the script uses but not git.
    tools = tmp_path / "tools"
    tools.mkdir()
    for tool in ("bash", "dirname", "tr", "grep", "awk", "sort", "head", "ldd", "ldconfig"):
        if shutil.which(tool):
            (tools / tool).symlink_to(shutil.which(tool))
    proc = prerequisites(tmp_path, "py311", path=str(tools))
    assert (proc.returncode, proc.stderr) == (
        2, "error: git not found (DVC and the tests need it); install it (apt-get install git)\n")
    assert "git" in prerequisites(tmp_path, "--packages", "py311", path=str(tools)).stdout.split()
    # `make repro` stops there, before creating .venv.
    proc = subprocess.run(["make", "repro", "PYTHON=py312"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PATH": f"{tmp_path / 'fake'}:"
                                                                f"{os.environ['PATH']}"})
    assert proc.returncode == 2 and proc.stderr.startswith("error: py312 is Python 3.12")
    assert not (tmp_path / ".venv").exists()


def test_mongods_libraries_are_found_here():
    """The libraries FiftyOne's mongod links (else tests/test_review.py fails on a mongod that
    does not start): named here in one line, as `make test` names them."""
    proc = subprocess.run(["bash", ".ci/prerequisites", "--mongod"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
