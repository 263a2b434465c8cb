"""Reading a JSON file or text that a stage did not just write itself: one reader for all.

Every JSON a stage or command reads (the operating point, the metrics export and report read,
the metadata inside an ONNX file) comes through :func:`read_json` / :func:`parse_json`, so each
way such a file can be wrong is one line (:class:`JsonProblem`, a ValueError), never a hang, a
traceback or a value that means something else:

* not a regular file (a FIFO would block the read for ever, /dev/zero never ends): refused from
  its ``stat``, before it is opened, and again from the opened file's ``fstat``;
* larger than ``max_bytes`` (default 16 MB: the project's JSON files are a few kB): at most
  that much is read;
* nesting deeper than :data:`MAX_DEPTH` (100,000 brackets end in a RecursionError in the json
  module): counted before it is parsed;
* NaN, Infinity, a float beyond float range (``1e999``) or an integer beyond +-2^53 (a
  400-digit integer is an OverflowError wherever it meets a float): refused while parsed;
* a key given twice in one object (json keeps the last, a person reading the file sees the
  first): refused, naming the key.
"""
from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

MAX_BYTES = 16 * 2**20
MAX_DEPTH = 64  # the project's files are a few levels deep
MAX_INT = 2**53  # every integer up to it is exactly a float: compared with floats, never lost


class JsonProblem(ValueError):
    """Why a JSON file or text cannot be used, in words (no file name: the caller adds it)."""


def read_json(path: str | Path, max_bytes: int = MAX_BYTES) -> Any:
    """The JSON value in the regular file ``path``, within the bounds above.

    FileNotFoundError (and other OSErrors of the open or read) pass through as they are, so a
    caller can say "not found" its own way; everything else wrong is :class:`JsonProblem`."""
    path = Path(path)
    mode = os.stat(path).st_mode  # follows links: a link to a regular file is that file
    if not stat.S_ISREG(mode):
        raise JsonProblem(f"not a regular file ({_kind(mode)})")
    # O_NONBLOCK: should the file have become a FIFO since the stat, opening it cannot block.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise JsonProblem(f"not a regular file ({_kind(mode)})")
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise JsonProblem(f"larger than {max_bytes:,} bytes, far more than the file holds")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise JsonProblem(f"not UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})") \
            from None
    return parse_json(text)


def parse_json(text: str) -> Any:
    """``json.loads(text)`` within the bounds above; :class:`JsonProblem` otherwise."""
    depth = _depth(text)
    if depth > MAX_DEPTH:
        raise JsonProblem(f"nested {depth} deep, more than {MAX_DEPTH}")
    try:
        return json.loads(text, object_pairs_hook=_unique, parse_constant=_constant,
                          parse_float=_float, parse_int=_int)
    except JsonProblem:
        raise
    except (ValueError, RecursionError) as exc:  # json.JSONDecodeError is a ValueError
        raise JsonProblem(f"not valid JSON ({str(exc).splitlines()[0][:200]})") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


def _depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings (no recursion, linear time); at most
    MAX_DEPTH when there are too few brackets to go deeper."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:  # the usual file: no walk needed
        return MAX_DEPTH
    deepest = depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _unique(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise JsonProblem(f"key {key[:80]!r} is given twice in one object")
        out[key] = value
    return out


def _constant(name: str) -> float:
    raise JsonProblem(f"{name} is not a finite number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonProblem(f"{text[:40]} is beyond the range of a float")
    return value


def _int(text: str) -> int:
    # the length first: int() of thousands of digits is slow, and Python refuses 4,300+
    if len(text) > 17 or abs(int(text)) > MAX_INT:
        raise JsonProblem(f"the integer {text[:40]}{'...' if len(text) > 40 else ''} is beyond "
                          f"+-2^53")
    return int(text)
