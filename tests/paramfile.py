"""A complete params.yaml for a test: the project's own, with the test's values merged in.

Every stage checks every key of params.yaml before it starts (stages.common.config.params), so a
test writes the whole file, not only the section it cares about.
"""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def keys(values, prefix: str = "") -> set[str]:
    """Every key path of a params mapping (``train.lr``); the values left out."""
    if not isinstance(values, dict):
        return set()
    return {f"{prefix}{k}" for k in values} | {
        path for k, v in values.items() for path in keys(v, f"{prefix}{k}.")}


def project_defaults(root: Path = ROOT) -> dict:
    """The committed params.yaml, so that a workspace left changed by `dvc exp run -S ...` (as
    the README's quick start does) changes no test. The workspace's file is used only where its
    keys differ from the commit's (a new param not committed yet) or there is no commit."""
    workspace = yaml.safe_load((root / "params.yaml").read_text())
    committed = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=root,
                               capture_output=True, text=True)
    if committed.returncode != 0:
        return workspace
    values = yaml.safe_load(committed.stdout)
    return values if keys(values) == keys(workspace) else workspace


_PROJECT = project_defaults()


def merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` in place; nested sections merge, data.labels and
    conditions.measure (maps of free keys) are replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) \
                and key not in ("labels", "measure"):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def params(over: dict | None = None) -> dict:
    return merge(copy.deepcopy(_PROJECT), over or {})


def write(root: Path, over: dict | None = None) -> dict:
    values = params(over)
    (Path(root) / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return values
