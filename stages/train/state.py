"""The train stage's resumable state: ``data/train_state/state.pt``, rewritten after every epoch.

It holds what the next epoch starts from: model, optimizer, scheduler and (fp16) GradScaler
states, the early-stopping counters, the best epoch's weights and figures, every rank's torch /
NumPy / Python RNG states and the per-epoch history that DVCLive's plots are rebuilt from. Plain
types and tensors only, so it loads with ``torch.load(weights_only=True)``.

It also holds a fingerprint of the run: the params train depends on, the processes and device, the
torch version, digests of the train stage's code and of every file in data/split/{train,val}.
A state whose fingerprint differs from the run's, or that does not load, is ignored with one line
on stderr, and training starts from scratch. Once a run's outputs are in place the state shrinks
to a finished marker (fingerprint only, a few KB) so DVC caches it for next to nothing.
What an operator sees of it: docs/stages.md (train, "Resuming").
"""
from __future__ import annotations

import hashlib
import random
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

from stages.common.config.paths import SPLIT_DIR, TRAIN_STATE
from stages.common.infra.atomic import atomic_file, clean_stale
from stages.common.infra.digest import file_md5

STATE_FILE = TRAIN_STATE / "state.pt"
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

def save(state: dict, path: Path = STATE_FILE) -> None:
    """Atomically: a kill leaves the previous epoch's state or this one, never half a file.
    The state is a persist out: with DVC's symlink cache type it is checked out as a link into
    the cache, which is replaced, never written through."""
    with atomic_file(path, "wb", replace_link=True) as f:
        torch.save({"format": FORMAT, **state}, f)


def save_finished(fp: dict, epochs_run: int, path: Path = STATE_FILE) -> None:
    """Replace the full state by a marker once the run's outputs are in place."""
    save({"fingerprint": fp, "finished": True, "epoch": epochs_run}, path)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0][:160] if text else ""
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


NEEDED = ["fingerprint", "finished", "epoch", "model", "optimizer", "scheduler", "scaler",
          "stopper", "best", "best_model", "history", "seconds", "rng"]


def load(fp: dict, path: Path = STATE_FILE, warn: Callable[[str], Any] | None = None,
         note: Callable[[str], Any] | None = None, clean: bool = True) -> dict | None:
    """The state to resume from, or None (a fresh start). Every reason a state present on disk is
    not used is one line: on stderr (``warn``) when it is unusable or stale, on stdout (``note``)
    when it only marks a finished run. ``clean``: remove what a kill mid-save left beside it."""
    warn = warn or (lambda m: print(m, file=sys.stderr, flush=True))
    note = note or (lambda m: print(m, flush=True))
    if clean:
        clean_stale(path)
    if not path.is_file():
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
    if state.get("finished") and "model" not in state:
        note(f"train: {path} marks a finished run of these params and data; training again")
        return None
    missing = [k for k in NEEDED if k not in state]
    if missing:
        warn(f"{prefix} it lacks {', '.join(missing)}; training from scratch")
        return None
    return state
