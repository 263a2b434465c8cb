"""Every third-party module that stages/, benchmarks/ and tests/ import is pinned with == in
requirements.txt: a module that arrives only as a dependency of a dependency comes at whatever
version that dependency allows, and the pipeline's results (or what the tests check) could drift
with it."""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import re
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
