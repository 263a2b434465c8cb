"""A checkpoint's format: one dict of plain types and tensors, its digest, save and verify.

A checkpoint loads with ``torch.load(weights_only=True)`` (no pickled code runs) and carries
everything needed to use it: arch, class names (ImageFolder order), image size, normalisation and
the params it was trained with.

It also carries ``weights_sha256``, a digest of all of that (:func:`weights_digest`), written by
:func:`save_checkpoint` and checked by :func:`verify_checkpoint` before the model is built
(stages.common.model.build.load_checkpoint): one flipped bit in a weight made a checkpoint call
27 of 58 people "object", and one in the class names would swap labels, with nothing to show for
it. A file without a digest, with one that does not match, with weights that are not finite, or
that is not a checkpoint of this project at all is refused in one line (exit code 2 through
main_guard).

torch is imported only by the functions that need it: the metadata and logits checks serve the
edge runtime too (an ONNX file answering without PyTorch installed).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages.common.config.archs import ARCH_NAMES, MAX_CROP_SIZE
from stages.common.infra.errors import StageError

CHECKPOINT_FORMAT = 1
DIGEST_KEY = "weights_sha256"
REGENERATE = "regenerate it with `dvc repro` (or python -m stages.train)"

if TYPE_CHECKING:
    import torch
    from torch import nn


def weights_digest(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a checkpoint's content: its metadata (every key but the weights and the
    digest) as sorted JSON, then each tensor in name order with its dtype, shape and raw bytes.
    Any flipped bit, in a weight or in a class name, changes it. (No tensors, no torch: an
    operating point's seal is this digest of its JSON alone.)"""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    if state:
        import torch
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"\n{name}\0{tensor.dtype}\0{list(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _content(ckpt: dict) -> tuple[dict, dict]:
    return {k: v for k, v in ckpt.items() if k not in ("model_state", DIGEST_KEY)}, \
        ckpt["model_state"]


def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor],
                    meta: ModelMeta) -> None:
    """``model``: the module, or a state dict of it (the train stage keeps its best epoch's)."""
    import torch

    from stages.common.infra.atomic import atomic_file  # here: PyYAML, which predict never needs

    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    ckpt = {"format": CHECKPOINT_FORMAT, **meta.as_dict(), "model_state": state}
    ckpt[DIGEST_KEY] = weights_digest(*_content(ckpt))
    with atomic_file(path, "wb") as f:
        torch.save(ckpt, f)


def check_tensors(path: Path, state: Any) -> None:
    """Weights must be a mapping of names to tensors, every floating-point one finite: a NaN
    weight made every picture "animal nan"."""
    import torch

    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise StageError(f"{path}: not a mapping of weight names to tensors (a "
                         f"{type(state).__name__}); not a weights file of a torchvision model")
    for name, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise StageError(f"{path}: weight {name} holds NaN or infinite values; the file is "
                             f"damaged or its training diverged; {REGENERATE}")


def verify_checkpoint(path: Path, ckpt: Any) -> None:
    """``ckpt`` (as loaded from ``path``) is a checkpoint of this project, unchanged since it
    was saved, with finite weights; else one line naming the file."""
    if not isinstance(ckpt, dict):
        raise StageError(f"{path}: not a checkpoint (it holds a {type(ckpt).__name__}, not the "
                         f"train stage's dict); {REGENERATE}")
    needed = ["arch", "classes", "image_size", "mean", "std", "dropout", "model_state"]
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise StageError(f"{path}: checkpoint lacks {', '.join(missing)}; {REGENERATE}")
    if DIGEST_KEY not in ckpt:
        raise StageError(f"{path}: has no weights digest (written before checkpoints carried "
                         f"one, or not by this project), so its integrity cannot be checked; "
                         f"{REGENERATE}")
    meta, state = _content(ckpt)
    check_tensors(path, state)
    try:
        digest = weights_digest(meta, state)
    except (TypeError, ValueError):  # metadata that is not plain data
        digest = None
    if digest != ckpt[DIGEST_KEY]:
        raise StageError(f"{path}: its content does not match its weights digest: the file is "
                         f"damaged (a flipped bit, a bad copy) or was altered; restore it, or "
                         f"{REGENERATE}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _numbers(value: Any, positive: bool = False) -> bool:
    return (isinstance(value, list) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and (v > 0 or not positive) for v in value))


# What a model's metadata must hold to be used (checkpoint and ONNX file alike): the
# preprocessing and the labels of every answer come from it.
META_RULES = {
    "arch": (lambda v: v in ARCH_NAMES, "one of " + ", ".join(ARCH_NAMES)),
    "classes": (lambda v: isinstance(v, list) and bool(v) and len(set(map(str, v))) == len(v)
                and all(isinstance(c, str) and c for c in v), "a list of distinct class names"),
    "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool)
                   and 8 <= v <= MAX_CROP_SIZE, f"an integer from 8 to {MAX_CROP_SIZE}"),
    "mean": (_numbers, "3 finite numbers"),
    "std": (lambda v: _numbers(v, positive=True), "3 finite numbers > 0"),
    "dropout": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
                and 0 <= v < 1, "a number from 0 to below 1"),
}


def check_meta(path: Path, meta: dict, keys=tuple(META_RULES)) -> None:
    for key in keys:
        ok, expected = META_RULES[key]
        if not ok(meta.get(key)):
            raise StageError(f"{path}: metadata {key}={_short(meta.get(key))} is not usable "
                             f"(expected {expected}); the file is damaged or not one this "
                             "project wrote")


@dataclass(frozen=True)
class ModelMeta:
    """What a model file carries besides its weights, read and checked here only
    (:meth:`read`): what a loader needs to use the model (arch, class names in ImageFolder
    order, crop side, normalisation), and in a checkpoint its head's dropout and the run that
    made it (the recipe, best epoch and its val figures). An ONNX file carries the first five.

    :meth:`as_dict` is the checkpoint's order of keys (its bytes and digest follow it), the
    fields left unset omitted."""
    arch: str
    classes: list[str]
    image_size: int
    mean: list[float]
    std: list[float]
    dropout: float | None = None
    params: dict | None = None  # the recipe: stages.train.stage.recipe
    epoch: int | None = None
    val_loss: float | None = None
    val_acc: float | None = None

    @classmethod
    def read(cls, path: str | Path, stored: dict, keys=tuple(META_RULES)) -> "ModelMeta":
        """The record ``stored`` (a checkpoint, or an ONNX file's parsed metadata) holds, once
        ``keys`` pass META_RULES; else one line naming ``path``. Other entries are ignored."""
        check_meta(Path(path), stored, keys)
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{k: stored[k] for k in names if stored.get(k) is not None})

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def check_logits(logits, rows: int, classes: int, model_path: str | Path) -> None:
    """Stop, in one line naming the model file, when it does not answer one finite logit per
    class for each input: a damaged or diverged model must never answer "animal nan", nor
    "object 1.000000" from an overflow."""
    shape = tuple(logits.shape)
    if shape != (rows, classes):
        raise StageError(f"{model_path}: the model answered logits of shape {shape} for {rows} "
                         f"inputs of {classes} classes; the file is damaged or not of this "
                         "project: export or train it again")
    if type(logits).__module__.partition(".")[0] == "torch":  # a tensor, maybe on a GPU
        import torch

        finite = bool(torch.isfinite(logits).all())
    else:
        finite = bool(np.isfinite(logits).all())
    if not finite:
        raise StageError(f"{model_path}: the model answers NaN or infinite logits; its weights "
                         "are damaged or diverged: retrain (dvc repro) or export it again")
