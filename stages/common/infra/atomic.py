"""Atomic outputs: a killed stage leaves the old output or the new one, never half of one.

Everything is written under a temporary sibling path, then renamed into place; rename is atomic
on one filesystem, and DVC only caches what is there after the stage exits successfully.

A destination that is a symbolic link, or not a regular file (a directory for atomic_dir), is
refused before any work: renaming over it would replace the link itself (or, for
``--out /dev/stdout`` run as root, a node of /dev) instead of writing where the user meant.
Temporaries are created with O_EXCL | O_NOFOLLOW, so a link planted at a temporary's name is
never written through. An error while writing names the output it was writing (OSError's
``filename``), so a full disk is reported on the file, not as a traceback (errors.main_guard).

What a SIGKILL leaves (a temporary, or atomic_dir's moved-aside old output) is removed by the
next write of that output (clean_stale), and at every stage's start beside and inside all the
outputs dvc.yaml declares, when the process named in it is gone (clean_dead_leftovers).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path
from typing import Any, Iterator

import yaml

from stages.common.infra.errors import StageError


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


# The names above and atomic_dir's moved-aside output: ".<name>.tmp-<pid>", ".<name>.old-<pid>".
LEFTOVER = re.compile(r"\..+\.(?:tmp|old)-(?P<pid>[0-9]+)")
PIPELINE = Path("dvc.yaml")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clean_stale(path: Path) -> None:
    """Remove what a killed earlier run left beside ``path``: its temporary, and the previous
    output it had moved aside (a kill between atomic_dir's two renames)."""
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            _remove(stale)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's included: EPERM)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # no such pid can exist
        return False
    return True


def output_folders(pipeline: Path = PIPELINE) -> list[Path]:
    """Where atomic writes leave temporaries: beside each output dvc.yaml declares (outs,
    metrics, plots of every stage) and directly inside each output folder (a file written
    there, e.g. data/calibration/operating_point.json). Never deeper: data/raw/data/ holds
    thousands of pictures and no temporary of ours."""
    try:
        stages = yaml.safe_load(pipeline.read_text())["stages"].values()
    except (OSError, yaml.YAMLError, TypeError, KeyError, AttributeError):
        return []  # no pipeline here (a command run elsewhere), or DVC itself would refuse it
    folders: dict[Path, None] = {}
    for stage in stages:
        for kind in ("outs", "metrics", "plots"):
            for entry in (stage.get(kind) or []) if isinstance(stage, dict) else []:
                out = pipeline.parent / (entry if isinstance(entry, str) else next(iter(entry)))
                folders[out.parent] = None
                if out.is_dir() and not out.is_symlink():
                    folders[out] = None
    return list(folders)


def clean_dead_leftovers(pipeline: Path = PIPELINE) -> list[Path]:
    """Remove the temporaries (and moved-aside old outputs) of processes that are gone, beside
    and inside the pipeline's outputs; return them. Called first by every stage's main:
    a stage killed with SIGKILL never reaches its own cleanup, and when `dvc repro` then
    restores that stage from the run cache, no rerun of it ever comes to remove them (a killed
    export left data/.export.tmp-<pid>, 35-43 MB). A live process's temporaries are kept: it
    may be writing them now."""
    removed = []
    for folder in output_folders(pipeline):
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            found = LEFTOVER.fullmatch(entry.name)
            if found and not _alive(int(found["pid"])):
                try:
                    _remove(Path(entry.path))
                except OSError as exc:  # never a reason to stop the stage; said, not hidden
                    print(f"warning: cannot remove {entry.path}, left by a killed run "
                          f"({exc.strerror or exc}); remove it by hand", file=sys.stderr)
                    continue
                removed.append(Path(entry.path))
                print(f"removed {entry.path}, left by a killed run (process {found['pid']})",
                      file=sys.stderr)
    return removed


def refuse_odd_destination(path: Path, directory: bool = False) -> None:
    """Stop, in one line, when ``path`` exists as a link or as anything but a regular file
    (``directory``: a directory)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise StageError(f"{path}: is a symbolic link; refusing to replace it; remove the link "
                         "or give another output path")
    wanted, kind = (stat.S_ISDIR, "a directory") if directory else (stat.S_ISREG, "a regular file")
    if not wanted(mode):
        raise StageError(f"{path}: exists and is not {kind}; refusing to replace it; give "
                         "another output path")


def _name_the_output(exc: OSError, tmp: Path, path: Path) -> None:
    """Point an error raised while writing at the output (its temporary means nothing to a user)."""
    if exc.filename is None:
        exc.filename = str(path)
    elif str(exc.filename).startswith(str(tmp)):
        exc.filename = str(path) + str(exc.filename)[len(str(tmp)):]


def _exclusive(path: str, flags: int) -> int:
    """open()'s opener: create the file, never open one already there, never follow a link."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory that replaces ``path`` when the block succeeds."""
    path = Path(path)
    refuse_odd_destination(path, directory=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _tmp_sibling(path)
    tmp.mkdir()  # fails on anything already there, a link included
    try:
        yield tmp
        refuse_odd_destination(path, directory=True)  # nothing appeared there meanwhile
    except OSError as exc:
        _remove(tmp)
        _name_the_output(exc, tmp, path)
        raise
    except BaseException:
        _remove(tmp)
        raise
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    if old.exists():
        _remove(old)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", replace_link: bool = False) -> Iterator[Any]:
    """Open a temporary file that replaces ``path`` when the block succeeds.

    ``replace_link``: a symbolic link at ``path`` is replaced (the rename never writes through
    it), for an output of our own that DVC may have checked out as a link into its cache."""
    path = Path(path)
    if not (replace_link and path.is_symlink()):
        refuse_odd_destination(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)  # a SIGKILL skips the cleanup below: e.g. metrics/.train.json.tmp-<pid>
    tmp = _tmp_sibling(path)
    try:
        try:
            f = open(tmp, mode, opener=_exclusive)
        except FileExistsError:
            raise StageError(f"{tmp}: appeared while {path} was being written (another run "
                             "writing the same output?); rerun when it has finished") from None
        with f:
            yield f
        if not (replace_link and path.is_symlink()):
            refuse_odd_destination(path)
        os.replace(tmp, path)
    except OSError as exc:
        _name_the_output(exc, tmp, path)
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_json(path: str | Path, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, so reruns are byte-identical."""
    with atomic_file(path) as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
