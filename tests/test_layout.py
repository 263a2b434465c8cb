"""The tree mirrors dvc.yaml, and stays so.

- every DVC stage is ``stages/<name>.py`` or a package ``stages/<name>/`` holding its own parts;
- ``stages/common/`` holds only what two or more stages (or commands) use;
- no import cycle among the project's modules;
- a stage's code deps in dvc.yaml are exactly its module or package plus the stages/common
  modules it imports (transitively), but the few that never change what a stage writes;
- only the adapters (stages/download/fiftyone_internals.py, stages/common/dvc_internals.py)
  touch FiftyOne's, DVC's or DVCLive's internals;
- a stage's params in dvc.yaml hold no key that changes no output (params.NO_OUTPUT, each with
  its reason), every other key is some stage's param, and export's list is the model card's.
"""
import ast
import functools
import re
from pathlib import Path

import yaml

from stages.common import dvc_internals
from stages.download import fiftyone_internals
from stages.common.params import NO_OUTPUT, Params, Section, load

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
COMMON = STAGES / "common"
# Shared modules that check, report or write, never change an output: not code deps in dvc.yaml.
NOT_DEPS = {"errors", "params", "atomic", "processes", "progress", "internals"}
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every ``stages.*`` module ``path`` imports, at any depth of the file."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stages"):
            for alias in node.names:  # `from stages.common import crops` names a module
                candidate = f"{node.module}.{alias.name}"
                out.add(candidate if _exists(candidate) else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("stages")}
    return out


def _exists(module: str) -> bool:
    base = ROOT / Path(*module.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for p in STAGES.rglob("*.py") if "__pycache__" not in p.parts}


def owner(module: str) -> str:
    """The stage or command a module belongs to: ``stages.train.state`` -> ``train``."""
    return module.split(".")[1]


def test_every_dvc_stage_is_a_module_or_a_package_named_as_the_stage():
    for name, stage in DVC.items():
        assert stage["cmd"] == f"python -m stages.{name}"
        module, package = STAGES / f"{name}.py", STAGES / name
        assert module.is_file() != package.is_dir(), name
        if package.is_dir():
            assert (package / "__main__.py").is_file() and (package / "stage.py").is_file()


def test_common_holds_only_what_two_or_more_stages_use():
    modules = project_modules()
    users: dict[str, set[str]] = {}
    for name, path in modules.items():
        if name.startswith("stages.common"):
            continue
        for dep in imported(path):
            if dep.startswith("stages.common."):
                users.setdefault(dep, set()).add(owner(name))
    # a shared module used through another shared module counts for that one's users
    changed = True
    while changed:
        changed = False
        for name, path in modules.items():
            if name.startswith("stages.common.") and name in users:
                for dep in imported(path):
                    if dep.startswith("stages.common.") and not users[name] <= users.get(dep, set()):
                        users.setdefault(dep, set()).update(users[name])
                        changed = True
    for name in modules:
        if name.startswith("stages.common."):
            assert len(users.get(name, set())) >= 2, f"{name} is used by {users.get(name)} only"


def test_no_import_cycle():
    modules = project_modules()
    graph = {m: {d for d in imported(p) if d in modules and d != m} for m, p in modules.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for dep in sorted(graph[m]):
            if dep.startswith(m + "."):  # a package importing its own parts is not a cycle
                continue
            assert state.get(dep) != 1, "import cycle: " + " -> ".join(path + [m, dep])
            if dep not in state:
                visit(dep, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_dvc_code_deps_are_the_stage_and_the_shared_modules_it_imports():
    modules = project_modules()
    for name, stage in DVC.items():
        package = STAGES / name
        own = sorted(package.glob("*.py")) if package.is_dir() else [STAGES / f"{name}.py"]
        todo = set().union(*(imported(p) for p in own))
        shared: set[str] = set()
        while todo:
            dep = todo.pop()
            if not dep.startswith("stages.common.") or dep in shared:
                continue
            shared.add(dep)
            if dep.split(".")[-1] not in NOT_DEPS:
                todo |= imported(modules[dep])
        expected = {f"stages/{name}" if package.is_dir() else f"stages/{name}.py"}
        expected |= {f"stages/common/{d.split('.')[-1]}.py" for d in shared
                     if d.split(".")[-1] not in NOT_DEPS}
        listed = {d for d in stage["deps"] if d.startswith("stages/")}
        assert listed == expected, name


# ---------------------------------------------------------------- library internals, adapters only

ADAPTERS = {STAGES / "download/fiftyone_internals.py", STAGES / "common/dvc_internals.py"}
LIBRARIES = (fiftyone_internals.FIFTYONE, dvc_internals.DVC, dvc_internals.DVCLIVE)
# Packages whose private parts only the adapters may touch, and what is public of those where
# not every name without an underscore is (DVC's Python API is dvc.api, DVCLive's is Live).
TRACKED = ("fiftyone", "eta", "dvc", "dvclive", "scmrepo")
PUBLIC_ONLY = {"dvc": r"dvc\.api(\..+)?", "dvclive": r"dvclive(\.Live)?", "scmrepo": r"(?!)"}


def tracked(dotted: str | None) -> bool:
    return dotted is not None and dotted.split(".")[0] in TRACKED


def non_public(dotted: str) -> bool:
    """``dotted`` names a private part: an ``_name`` anywhere or, in a package with a narrow
    public API (PUBLIC_ONLY), anything outside it."""
    top = dotted.split(".")[0]
    if any(part.startswith("_") for part in dotted.split(".")):
        return True
    public = PUBLIC_ONLY.get(top)
    return public is not None and not re.fullmatch(public, dotted)


def dotted_name(node: ast.AST, aliases: dict[str, str]) -> str | None:
    """``fouo.x.y`` -> ``fiftyone.utils.openimages.x.y`` through the file's imports."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in aliases:
        return None
    return ".".join([aliases[node.id], *reversed(parts)])


def imports_of_internals(tree: ast.AST) -> tuple[dict[str, str], list[str]]:
    """The names the file's imports bind (name -> dotted path), and its imports of internals."""
    aliases: dict[str, str] = {}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:   # `import a.b` binds a; `import a.b as x` binds x to a.b
                top = a.name.split(".")[0]
                aliases[a.asname or top] = a.name if a.asname else top
                if tracked(a.name) and non_public(a.name):
                    found.append(f"line {node.lineno}: import {a.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                if tracked(node.module) and non_public(f"{node.module}.{a.name}"):
                    found.append(f"line {node.lineno}: from {node.module} import {a.name}")
    return aliases, found


def touches_of_internals(path: Path) -> list[str]:
    """Where ``path`` imports, reads or replaces a tracked library's internals."""
    tree = ast.parse(path.read_text())
    aliases, found = imports_of_internals(tree)
    # the modules the file imported, to tell a replaced module attribute from a config field
    modules = set(aliases.values()) | {a.name for node in ast.walk(tree)
                                       if isinstance(node, ast.Import) for a in node.names}
    for node in ast.walk(tree):
        targets = (node.targets if isinstance(node, (ast.Assign, ast.Delete)) else
                   [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        for t in targets:
            parent = dotted_name(t.value, aliases) if isinstance(t, ast.Attribute) else None
            if tracked(parent) and parent in modules:
                found.append(f"line {node.lineno}: replaces {parent}.{t.attr}")
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            name = dotted_name(node, aliases)
            if tracked(name):
                found.append(f"line {node.lineno}: reads {name}")
        if isinstance(node, ast.Call) and node.args and (
                getattr(node.func, "id", None) in ("setattr", "delattr")
                or getattr(node.func, "attr", None) in ("setattr", "delattr")):
            replaced = replaced_by_call(node.args, aliases, modules)
            if replaced:
                found.append(f"line {node.lineno}: replaces {replaced}")
    return sorted(found, key=lambda f: int(f.split()[1].rstrip(":")))


def replaced_by_call(args: list[ast.expr], aliases: dict[str, str],
                     modules: set[str]) -> str | None:
    """What ``setattr(module, "name", v)`` or ``monkeypatch.setattr("pkg.mod.name", v)``
    replaces in a tracked library's module, if anything."""
    first = args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value if tracked(first.value) and "." in first.value else None
    owner = dotted_name(first, aliases)
    if not (tracked(owner) and owner in modules):
        return None
    name = args[1].value if len(args) > 1 and isinstance(args[1], ast.Constant) else "?"
    return f"{owner}.{name}"


def test_only_the_adapters_touch_library_internals():
    declared = {need.name for lib in LIBRARIES for need in lib.needs
                if need.name.startswith("_") or need.params is not None}
    word = re.compile(r"\b(" + "|".join(map(re.escape, sorted(declared))) + r")\b")
    offences = []
    for path in sorted([*STAGES.rglob("*.py"), *(ROOT / "tests").rglob("*.py")]):
        if path in ADAPTERS or path == Path(__file__) or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(ROOT)
        offences += [f"{rel}: {hit}" for hit in touches_of_internals(path)]
        # also in strings (a harness run by a subprocess) and comments
        offences += [f"{rel}: names {m[1]}" for m in word.finditer(path.read_text())]
    assert not offences, ("only the adapters may touch library internals; go through "
                          "fiftyone_internals / dvc_internals:\n" + "\n".join(offences))


def test_the_rule_sees_each_way_of_touching_internals(tmp_path):
    source = """
import dvclive.live
import fiftyone.utils.openimages as fouo
import fiftyone as fo
from dvc.scm import resolve_rev
from fiftyone.utils import aws
url = fouo._ANNOTATION_DOWNLOAD_URLS
dvclive.live.get_dvc_repo = None
aws.boto3 = None
setattr(fouo, "x", 1)
monkeypatch.setattr("fiftyone.utils.aws.boto3", None)
fo.config.show_progress_bars = False
from dvc.api import read
from dvclive import Live
"""
    path = tmp_path / "sample.py"
    path.write_text(source)
    assert touches_of_internals(path) == [
        "line 2: import dvclive.live",
        "line 5: from dvc.scm import resolve_rev",
        "line 7: reads fiftyone.utils.openimages._ANNOTATION_DOWNLOAD_URLS",
        "line 8: replaces dvclive.live.get_dvc_repo",
        "line 9: replaces fiftyone.utils.aws.boto3",
        "line 10: replaces fiftyone.utils.openimages.x",
        "line 11: replaces fiftyone.utils.aws.boto3",
    ]


# ----- params: a stage depends on exactly the params that can change what it writes ------------

PARAMS = load(ROOT / "params.yaml")


def leaves(name: str) -> set[str]:
    """The keys a dvc.yaml param names: itself, or every key of the section it names."""
    value = functools.reduce(getattr, name.split("."), PARAMS)
    if isinstance(value, Section):
        return set().union(*(leaves(f"{name}.{key}") for key in type(value).model_fields))
    return {name}


def stage_params(name: str) -> set[str]:
    return set().union(*(leaves(p) for p in DVC[name].get("params", [])))


def test_no_output_keys_are_params_with_a_reason():
    every = leaves_of_all()
    for key, reason in NO_OUTPUT.items():
        assert key in every, f"params.NO_OUTPUT names {key}, which params.yaml does not hold"
        assert isinstance(reason, str) and len(reason.split()) >= 5, key


def leaves_of_all() -> set[str]:
    return set().union(*(leaves(section) for section in Params.model_fields))


def test_no_stage_depends_on_a_key_that_changes_no_output():
    for name in DVC:
        listed = stage_params(name) & set(NO_OUTPUT)
        assert not listed, (f"{name} depends on {sorted(listed)}, which change no output: list "
                            "that section key by key in dvc.yaml, without them")


def test_every_other_key_is_a_param_of_some_stage():
    used = set().union(*(stage_params(name) for name in DVC))
    assert leaves_of_all() - set(NO_OUTPUT) == used, (
        "a key no stage depends on: a DVC param of the stage that reads it, or into "
        "params.NO_OUTPUT with the reason it changes no output")


def test_export_depends_on_the_model_cards_params_and_its_own():
    from stages import export

    assert DVC["export"]["params"] == list(export.PARAMS)
    # the card states what the data and the model depend on: every param of the stages that made
    # them, and nothing else
    made = set().union(*(stage_params(s) for s in ("download", "extract_crops", "split", "train")))
    assert set().union(*(leaves(p) for p in export.CARD_PARAMS)) == made
    card = yaml.safe_dump(export.card_recipe(PARAMS))
    for key in NO_OUTPUT:
        assert f"{key.split('.')[-1]}:" not in card, key


def test_trains_resume_fingerprint_holds_exactly_its_dvc_params():
    from stages.train import stage as train

    assert set(train.fingerprint_params(PARAMS)) == stage_params("train")
