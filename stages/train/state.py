"""The train stage's resumable state: ``data/train_resume/<key>.pt``, rewritten after every epoch.

It holds what the next epoch starts from: model, optimizer, scheduler and (fp16) GradScaler
states, the early-stopping counters, the best epoch's weights and figures, every rank's torch /
NumPy / Python RNG states and the per-epoch history that DVCLive's plots are rebuilt from. Plain
types and tensors only, so it loads with ``torch.load(weights_only=True)``.

It also holds a fingerprint of the run: the params train depends on, the processes and device, the
torch version, digests of the train stage's code and of every file in data/split/{train,val}.
The file's name is a digest of that fingerprint (:func:`state_file`): one state per recipe, so
an interrupted `dvc exp run -S model.arch=resnet50` finds its own state again and the
workspace's run never overwrites it. The folder is no DVC output (DVC would check the
committed state out over it before `dvc exp run`) and git ignores it (data/). A state that does
not load is ignored with one line on stderr, and training starts from scratch; a run that
finds no state of its fingerprint says why the newest other one does not fit. Once a run's
outputs are in place its state is removed. What an operator sees of it: docs/stages.md
(train, "Resuming").
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from stages.common.config.paths import SPLIT_DIR, TRAIN_RESUME
from stages.common.infra.atomic import atomic_file, clean_stale
from stages.common.infra.digest import file_md5

FORMAT = 1
ROOT = Path(__file__).resolve().parents[2]


def code_files(stage: str = "train") -> list[str]:
    """The stage's code as dvc.yaml lists its deps (one list for DVC and for the fingerprint):
    the files under ``stages/``, a folder standing for its files but caches (.dvcignore)."""
    deps = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["deps"]
    files = []
    for dep in deps:
        if not dep.startswith("stages/"):
            continue
        path = ROOT / dep
        found = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts) \
            if path.is_dir() else [path]
        files += [f.relative_to(ROOT).as_posix() for f in found]
    return files


def folder_digest(folder: Path) -> str:
    """One digest of every file's relative path and content (ImageFolder reads them all)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{path.relative_to(folder).as_posix()}\0{file_md5(path)}\n".encode())
    return h.hexdigest()


def fingerprint(params: dict, folders: dict[str, Path], processes: int,
                device: torch.device) -> dict:
    """What must be equal for a state to be resumed: params (by dotted name), run, code, data."""
    return {
        "params": dict(params),
        "run": {"processes": processes, "device": device.type, "torch": str(torch.__version__)},
        "code": {f: file_md5(ROOT / f) for f in code_files()},
        "data": {name: folder_digest(path) for name, path in folders.items()},
    }


def state_file(fp: dict, folder: Path = TRAIN_RESUME) -> Path:
    """Where the state of a run of fingerprint ``fp`` lies: a name no other recipe shares."""
    text = json.dumps(fp, sort_keys=True, default=str)
    return folder / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"


def mismatch(old: dict, new: dict) -> str | None:
    """Why a state of fingerprint ``old`` cannot be resumed by a run of ``new``; None if it can."""
    if not isinstance(old, dict) or set(old) != set(new):
        return "its fingerprint is of another version"
    for part in ["params", "run", "code", "data"]:
        a, b = old[part], new[part]
        if a == b:
            continue
        keys = sorted(k for k in set(a) | set(b) if a.get(k, "(none)") != b.get(k, "(none)"))
        if part == "params":
            return "it was written with other params (" + ", ".join(
                f"{k}: {a.get(k, '(none)')!r} -> {b.get(k, '(none)')!r}" for k in keys) + ")"
        if part == "run":
            return "it was written by another run setup (" + ", ".join(
                f"{k}: {a.get(k)} -> {b.get(k)}" for k in keys) + ")"
        if part == "code":
            return f"the train stage's code changed since ({', '.join(keys)})"
        return ("the training data changed since (" +
                ", ".join(str(SPLIT_DIR / k) for k in keys) + ")")
    return None


# ----- RNG states as plain types (weights_only loads no pickled objects) ------------------------

def rng_state(device: torch.device) -> dict:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss},
        "device": None,
    }
    if device.type in ("cuda", "mps"):
        state["device"] = getattr(torch, device.type).get_rng_state()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"].tolist()), p["gauss_next"]))
    if state["device"] is not None and device.type in ("cuda", "mps"):
        getattr(torch, device.type).set_rng_state(state["device"])


# ----- saving and loading -------------------------------------------------------------------

def save(state: dict, path: Path) -> None:
    """Atomically: a kill leaves the previous epoch's state or this one, never half a file.
    A link there is replaced, never written through (DVC's symlink cache type checked the state
    out as a link into its cache while it was a persist out)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb", replace_link=True) as f:
        torch.save({"format": FORMAT, **state}, f)


def remove(path: Path) -> None:
    """The run's outputs are in place: its state has nothing left to resume (nor its folder,
    when no other run's state is there)."""
    path.unlink(missing_ok=True)
    try:
        path.parent.rmdir()
    except OSError:  # other states, or a leftover of a killed save: kept
        pass


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


NEEDED = ["fingerprint", "finished", "epoch", "model", "optimizer", "scheduler", "scaler",
          "stopper", "best", "best_model", "history", "seconds", "rng"]


def load(fp: dict, path: Path | None = None, warn: Callable[[str], Any] | None = None,
         note: Callable[[str], Any] | None = None, clean: bool = True) -> dict | None:
    """The state to resume from (``path``, by default the fingerprint's :func:`state_file`), or
    None (a fresh start). A state there that cannot be used is one line on stderr (``warn``);
    when there is none, one line on stdout (``note``) says why the newest other state of the
    folder does not fit, if there is one. ``clean``: remove what a kill mid-save left beside it."""
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    note = note or (lambda m: print(m, flush=True))
    path = state_file(fp) if path is None else path
    if clean:
        clean_stale(path)
    if not path.is_file():
        other = _newest_other(path)
        if other is not None:
            note(f"train: no state of this run in {path.parent}; the newest there ({other.name}) "
                 f"does not fit: {_why_not(other, fp)}; training from scratch")
        return None
    prefix = f"train: ignoring {path}:"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding pickled objects
        warn(f"{prefix} cannot load it ({_one_line(exc)}); training from scratch")
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "fingerprint" not in state:
        warn(f"{prefix} not a training state of this version; training from scratch")
        return None
    why = mismatch(state["fingerprint"], fp)
    if why is not None:
        warn(f"{prefix} {why}; training from scratch")
        return None
    missing = [k for k in NEEDED if k not in state]
    if missing:
        warn(f"{prefix} it lacks {', '.join(missing)}; training from scratch")
        return None
    return state


def _newest_other(path: Path) -> Path | None:
    try:
        found = [p for p in path.parent.glob("*.pt") if p.is_file() and p != path]
        return max(found, key=lambda p: p.stat().st_mtime, default=None)
    except OSError:  # a state removed meanwhile (another run finished): nothing to explain
        return None


def _why_not(other: Path, fp: dict) -> str:
    try:
        # mmap: only the fingerprint is read, not the weights
        old = torch.load(other, map_location="cpu", weights_only=True, mmap=True)["fingerprint"]
    except Exception as exc:  # noqa: BLE001 - only explained, never used
        return f"it cannot be read ({_one_line(exc)})"
    return mismatch(old, fp) or "it was written by this run's recipe under another name"
