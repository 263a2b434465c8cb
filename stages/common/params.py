"""Reading ``params.yaml`` and failing early, in one line, on a bad value.

Every stage calls :func:`load` first and checks the keys it reads before it does any work,
so a typo costs seconds, not an hour of training.
"""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
from pathlib import Path
from typing import Any, Callable

import yaml

PARAMS_FILE = Path("params.yaml")


class ParamError(ValueError):
    """A param is missing or has a value the pipeline cannot use."""


class StageError(RuntimeError):
    """Input data or a file the stage needs is missing or unusable."""


def load(path: str | Path = PARAMS_FILE) -> dict:
    """The params file, every key checked (stages.common.schema) before the caller does any work."""
    from stages.common import schema  # schema builds on this module

    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        with path.open() as f:
            params = _load_yaml(f, path) or {}
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ParamError(f"{path}: not valid YAML{line}; fix the file's syntax") from None
    if not isinstance(params, dict):
        raise ParamError(f"{path}: expected a mapping of sections, got {type(params).__name__}")
    schema.check_all(params)
    return params


def _load_yaml(stream, path: Path) -> Any:
    """``yaml.safe_load``, but a key given twice in one mapping is an error: PyYAML keeps the
    last value silently, while DVC refuses the file, so the stages and DVC would disagree."""
    loader = yaml.SafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(node: yaml.Node, path: Path, prefix: str = "") -> None:
    if isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path, prefix)
    elif isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
            line = key.start_mark.line + 1
            if name in first_line:
                raise ParamError(f"{path}: key '{prefix}{name}' is given twice (lines "
                                 f"{first_line[name]} and {line}); keep one (DVC refuses such "
                                 "a file)")
            first_line[name] = line
            _refuse_duplicate_keys(value, path, f"{prefix}{name}.")


def get(params: dict, dotted: str) -> Any:
    """``get(p, "train.lr")`` with an error that names the missing key."""
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamError(f"params.yaml: missing key '{dotted}'")
        node = node[part]
    return node


def check(cond: bool, key: str, allowed: str, value: Any = None) -> None:
    if not cond:
        raise ParamError(f"params.yaml: {key}={value!r} is not allowed; expected {allowed}")


def number(params: dict, key: str, *, lo: float | None = None, hi: float | None = None,
           integer: bool = False, lo_open: bool = False) -> float | int:
    """A numeric param inside [lo, hi] (or (lo, hi] with ``lo_open``)."""
    value = get(params, key)
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    ok_type = ok_type and not isinstance(value, bool)
    bounds = ""
    if lo is not None:
        bounds += f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        bounds += f"{' and' if lo is not None else ''} <= {hi}"
    check(ok_type, key, kind + bounds, value)
    if lo is not None:
        check(value > lo if lo_open else value >= lo, key, kind + bounds, value)
    if hi is not None:
        check(value <= hi, key, kind + bounds, value)
    return value


def choice(params: dict, key: str, options: list | tuple) -> Any:
    value = get(params, key)
    check(value in options, key, "one of " + ", ".join(map(str, options)), value)
    return value


def flag(params: dict, key: str) -> bool:
    value = get(params, key)
    check(isinstance(value, bool), key, "true or false", value)
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse for the commands (predict, report, review): a bad option is one line and exit
    code 2 through main_guard, not argparse's usage block."""

    def error(self, message: str):
        raise ParamError(f"{message}; see {self.prog} --help")


# A full disk or an exhausted quota: nothing the stage can work around, nothing a traceback helps.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def main_guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a ParamError / StageError, or a full disk, into one line on stderr and exit code 2.

    The disk-full line names the file being written when the writer said which
    (stages.common.atomic names its outputs)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ParamError, StageError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as exc:
            if exc.errno not in DISK_FULL:
                raise
            where = f" {exc.filename}" if exc.filename else ""
            print(f"error: cannot write{where} ({os.strerror(exc.errno)}); free space and rerun",
                  file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
