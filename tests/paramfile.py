"""A complete params.yaml for a test: the project's own, with the test's values merged in.

Every stage checks every key of params.yaml before it starts (stages.common.config.params), so a
test writes the whole file, not only the section it cares about.
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
_PROJECT = yaml.safe_load((ROOT / "params.yaml").read_text())


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
