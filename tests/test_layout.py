"""The tree mirrors dvc.yaml, and stays so.

- every DVC stage is ``stages/<name>.py`` or a package ``stages/<name>/`` holding its own parts;
- ``stages/common/`` holds only what two or more stages (or commands) use, in rooms by
  responsibility (:data:`ROOMS`), each room importing only the rooms below it (:data:`ALLOWED`),
  and docs/stages.md opens with that map;
- no import cycle among the project's modules;
- a stage's code deps in dvc.yaml are exactly its module or package plus the stages/common
  modules it imports (transitively), but the few that never change what a stage writes, and
  any module of another stage it imports;
- every artifact path is named once, in stages/common/config/paths.py, and agrees with dvc.yaml;
- only the adapters (stages/download/fiftyone_internals.py, stages/common/infra/dvc_internals.py)
  touch FiftyOne's, DVC's or DVCLive's internals;
- a stage's params in dvc.yaml hold no key that changes no output (params.NO_OUTPUT, each with
  its reason), every other key is some stage's param, and export's list is the model card's.
"""
import ast
import functools
import re
import subprocess
import sys
from pathlib import Path

import yaml

from stages.common.config import paths
from stages.common.infra import dvc_internals
from stages.download import fiftyone_internals
from stages.common.config.params import NO_OUTPUT, Params, Section, load

ROOT = Path(__file__).resolve().parents[1]
STAGES = ROOT / "stages"
COMMON = STAGES / "common"
# The rooms of stages/common, each what its package's docstring says, lowest first.
ROOMS = {
    "infra": "Running a stage: one-line errors, atomic writes, progress, processes, digests, "
             "adapters.",
    "config": "What a run is told: params.yaml's schema and loader, arch families, formats, "
              "alarm label.",
    "pictures": "Picture files: one decoder, crop geometry and letterbox, the Open Images file "
                "layout.",
    "model": "The classifier: built from config's arch families, checkpoint, device, ONNX and "
             "other formats.",
    "alarm": "The person alarm: temperature, threshold, sealed operating point, what the "
             "threshold promises.",
    "inference": "A model over labelled crops: crops decoded once and batched, checked logits, "
                 "speed.",
    "serving": "Answering for picture files: PyTorch and ONNX Runtime classifiers, folder walks, "
               "batches.",
}
# The rooms a room's modules may import besides its own: a graph without cycles. config sits
# at the ground with infra: the facts it checks params against (arch families, the alarm's
# label, limits) are its own, so checking params.yaml loads no model, picture or alarm code.
ALLOWED = {
    "infra": set(),
    "config": {"infra"},
    "pictures": {"infra"},
    "model": {"infra", "config"},
    "alarm": {"infra", "model", "config"},
    "inference": {"infra", "pictures", "model"},
    "serving": {"infra", "config", "pictures", "model", "alarm", "inference"},
}
# Shared modules that check, report, name or write, never change an output: not code deps in
# dvc.yaml. paths: every path in it that a stage writes is one of dvc.yaml's outs (checked
# below), so moving an output is a dvc.yaml change, which DVC sees; as a dep of all seven
# stages, a new name or comment there would rerun the whole pipeline, download included.
NOT_DEPS = {"infra.errors", "infra.atomic", "infra.processes", "infra.progress", "infra.internals",
            "infra.jsonfile", "config.params", "config.paths"}
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def common_name(module: str) -> str:
    """``stages.common.model.build`` -> ``model.build``."""
    return module[len("stages.common."):]


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
    for name, path in modules.items():
        if name.startswith("stages.common.") and path.name != "__init__.py":  # rooms aside
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


def shared_deps(name: str) -> set[str]:
    """The stages.common modules stage ``name`` imports, directly or through a shared module
    that can change an output (a NOT_DEPS module's own imports are not followed), and another
    stage's modules it imports (train applies stages/conditions/corrupt.py's conditions)."""
    modules = project_modules()
    package = STAGES / name
    own = sorted(package.glob("*.py")) if package.is_dir() else [STAGES / f"{name}.py"]
    todo = set().union(*(imported(p) for p in own))
    shared: set[str] = set()
    while todo:
        dep = todo.pop()
        if dep in shared or dep not in modules or owner(dep) == name:
            continue
        shared.add(dep)
        if not dep.startswith("stages.common.") or common_name(dep) not in NOT_DEPS:
            todo |= imported(modules[dep])
    return {d for d in shared if not (d.startswith("stages.common.")
                                      and common_name(d) in NOT_DEPS)}


def test_dvc_code_deps_are_the_stage_and_the_shared_modules_it_imports():
    for name, stage in DVC.items():
        own = f"stages/{name}" if (STAGES / name).is_dir() else f"stages/{name}.py"
        expected = {own} | {d.replace(".", "/") + ".py" for d in shared_deps(name)}
        listed = {d for d in stage["deps"] if d.startswith("stages/")}
        assert listed == expected, (name, sorted(listed - expected), sorted(expected - listed))


# ---------------------------------------------------------------- the rooms of stages/common

def room_modules() -> dict[str, list[str]]:
    """room -> the names of its modules, sorted (its __init__ aside)."""
    return {room: sorted(p.stem for p in (COMMON / room).glob("*.py") if p.stem != "__init__")
            for room in ROOMS}


def test_every_shared_module_lives_in_a_declared_room():
    assert sorted(p.name for p in COMMON.glob("*.py")) == ["__init__.py"]  # no loose module
    folders = {p.name for p in COMMON.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(ROOMS)
    for room, text in ROOMS.items():
        init = COMMON / room / "__init__.py"
        tree = ast.parse(init.read_text())
        # only its docstring: importing a room runs nothing, so __init__ is never a code dep
        assert len(tree.body) == 1 and ast.get_docstring(tree) == text, init
        assert not list((COMMON / room).glob("*/*.py")), f"{room}: rooms hold modules only"


def test_rooms_import_only_the_rooms_below_them():
    order: list[str] = []  # a topological order of ALLOWED: no cycle
    while len(order) < len(ALLOWED):
        ready = [r for r in ALLOWED if r not in order and ALLOWED[r] <= set(order)]
        assert ready, f"ALLOWED has a cycle among {sorted(set(ALLOWED) - set(order))}"
        order += sorted(ready)
    assert set(ALLOWED) == set(ROOMS) and all(ALLOWED[r] <= set(ROOMS) for r in ALLOWED)
    offences = []
    for name, path in project_modules().items():
        if not name.startswith("stages.common."):
            continue
        room = common_name(name).split(".")[0]
        for dep in sorted(imported(path)):
            if not dep.startswith("stages.common."):
                offences.append(f"{name} imports {dep}: shared code never imports a stage")
                continue
            other = common_name(dep).split(".")[0]
            if other != room and other not in ALLOWED[room]:
                offences.append(f"{name} imports {dep}: {room} may import only "
                                f"{sorted(ALLOWED[room]) or 'nothing shared'}")
    assert not offences, "\n".join(offences)


def test_params_import_no_torch_image_library_or_code_above_config():
    """Every stage checks params.yaml first, in milliseconds: the schema and the facts it checks
    against (config's arch families, the alarm's label, limits) pull in no torch, no image
    library and no module of the rooms above config."""
    heavy = ("torch", "torchvision", "cv2", "PIL", "simplejpeg")
    rooms = tuple(f"stages.common.{room}" for room in ("pictures", "model", "alarm", "inference",
                                                        "serving"))
    code = ("import sys, stages.common.config.params; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r} "
            f"or m.startswith({rooms!r})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def rooms_map() -> str:
    """The map docs/stages.md opens with, made from ROOMS, ALLOWED and the tree."""
    rows = [f"| `{room}/` | {text} | {', '.join(f'`{m}`' for m in modules)} | "
            f"{', '.join(r for r in ROOMS if r in ALLOWED[room]) or '-'} |"
            for (room, text), modules in zip(ROOMS.items(), room_modules().values())]
    return "\n".join([
        "## `stages/common/`, room by room",
        "",
        "What two or more stages use, by responsibility; a room imports only the rooms in its "
        "last",
        "column (no cycle). tests/test_layout.py writes this table from its `ROOMS` and "
        "`ALLOWED`",
        "and fails when it differs from this one.",
        "",
        "| room | what it holds | modules | imports from |",
        "|---|---|---|---|",
        *rows,
    ]) + "\n"


def test_docs_open_with_the_map_of_the_rooms():
    text = (ROOT / "docs/stages.md").read_text()
    expected = "# The stages\n\n" + rooms_map()
    assert text.startswith(expected), "docs/stages.md must open with:\n\n" + expected


# ---------------------------------------------------------------- artifact paths, one module

PATHS_MODULE = COMMON / "config/paths.py"
ARTIFACT = re.compile(r"(?<![\w./-])(data|metrics|plots)/\w")


def docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes of a module, its classes and functions."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def artifact_literals(path: Path) -> list[str]:
    """Strings in ``path`` (not docstrings; comments are not in the tree) naming an artifact."""
    tree = ast.parse(path.read_text())
    skip = docstrings(tree)
    return [f"line {node.lineno}: {node.value!r}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in skip and ARTIFACT.search(node.value)]


def test_artifact_paths_are_spelled_only_in_config_paths():
    offences = [f"{p.relative_to(ROOT)}: {hit}" for p in sorted(STAGES.rglob("*.py"))
                if p != PATHS_MODULE and "__pycache__" not in p.parts
                for hit in artifact_literals(p)]
    assert not offences, ("name artifact paths through stages.common.config.paths:\n"
                          + "\n".join(offences))


def test_the_rule_sees_an_artifact_path_but_not_a_docstring(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('"""Reads data/split/test."""\nA = "data/model/best.pt"\n'
                      'B = f"nothing in {A} or metrics/eval.json"\nC = "dvc_plots/x.html"\n'
                      '# data/raw in a comment\n')
    assert artifact_literals(sample) == ["line 2: 'data/model/best.pt'",
                                         "line 3: ' or metrics/eval.json'"]


def dvc_outputs() -> set[Path]:
    out = set()
    for stage in DVC.values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key, []):
                out.add(Path(next(iter(entry)) if isinstance(entry, dict) else entry))
    return out


def test_config_paths_agree_with_dvc_yaml():
    named = {k: v for k, v in vars(paths).items() if isinstance(v, Path)}
    outputs = dvc_outputs()
    assert paths.NOT_OUTPUTS <= set(named.values())
    outside = [f"{k} = {v}" for k, v in named.items() if v not in paths.NOT_OUTPUTS
               and not any(v == o or o in v.parents for o in outputs)]
    declared = [str(v) for v in paths.NOT_OUTPUTS
                if any(v == o or o in v.parents or v in o.parents for o in outputs)]
    assert not declared, f"paths.NOT_OUTPUTS holds an output of dvc.yaml: {declared}"
    assert not outside, f"paths.py names what no stage of dvc.yaml writes: {outside}"
    unnamed = sorted(str(o) for o in outputs if o not in named.values())
    assert not unnamed, f"dvc.yaml outputs not named in stages/common/config/paths.py: {unnamed}"


# ---------------------------------------------------------------- library internals, adapters only

ADAPTERS = {STAGES / "download/fiftyone_internals.py", STAGES / "common/infra/dvc_internals.py"}
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


def test_the_readme_stays_short():
    """README.md is the front page (at most 12 KB); the details live in docs/."""
    size = (ROOT / "README.md").stat().st_size
    assert size <= 12_000, f"README.md is {size:,} bytes; move details to docs/ (at most 12,000)"
