"""The classifier: a torchvision ResNet with a dropout + 3-way head, freezing, checkpoints.

A checkpoint is one dict of plain types and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs) and carries everything needed to use it:
arch, class names (ImageFolder order), image size, normalisation and the params it was trained with.

It also carries ``weights_sha256``, a digest of all of that (:func:`weights_digest`), written by
:func:`save_checkpoint` and checked by :func:`load_checkpoint` before the model is built: one
flipped bit in a weight made a checkpoint call 27 of 58 people "object", and one in the class
names would swap labels, with nothing to show for it. A file without a digest, with one that
does not match, with weights that are not finite, or that is not a checkpoint of this project at
all is refused in one line (exit code 2 through main_guard). ``model.weights`` pointing at one of
our checkpoints is checked the same way; ImageNet weights against the SHA-256 prefix that
torchvision puts in their file name.
"""
from __future__ import annotations

import hashlib
import json
import math
import socket
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from stages.common.digest import file_sha256
from stages.common.errors import StageError
from stages.common.params import ARCH_NAMES, MAX_CROP_SIZE, RESNET_CHILDREN

# name -> (torchvision builder, its ImageNet weights enum), for every arch params.yaml allows
ARCHS = {name: (getattr(models, name), getattr(models, f"ResNet{name[len('resnet'):]}_Weights"))
         for name in ARCH_NAMES}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHECKPOINT_FORMAT = 1
DIGEST_KEY = "weights_sha256"
REGENERATE = "regenerate it with `dvc repro` (or python -m stages.train)"


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` (``$TORCH_HOME/hub/checkpoints``)."""
    url = ARCHS[arch][1].DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _imagenet_state_dict(arch: str) -> dict:
    """ImageNet weights from torch's cache; downloaded there first when the network allows.
    Either way the file's SHA-256 must begin with the digits torchvision puts in its name."""
    path = imagenet_weights_file(arch)
    if not path.is_file():
        # Bounded: on an air-gapped network the error must come in a minute, not hang the run.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)
        try:
            torch.hub.load_state_dict_from_url(ARCHS[arch][1].DEFAULT.url, progress=True,
                                               check_hash=True)
        except (urllib.error.URLError, OSError, TimeoutError, RuntimeError) as exc:
            raise StageError(
                f"ImageNet weights for {arch} not found at {path} and the download failed ({exc}); "
                "copy that file there (or set TORCH_HOME), or set model.weights to a local .pth "
                "file or to 'none'") from None
        finally:
            socket.setdefaulttimeout(previous)
    check_hub_file(path)
    state = _weights_file(path, "model.weights: imagenet")
    check_tensors(path, state)
    return state


def check_hub_file(path: Path) -> None:
    """torch.hub's files are named ``<name>-<first hex digits of their SHA-256>.<ext>``
    (``resnet18-f37072fd.pth``): a file whose bytes do not hash to that is refused."""
    named = torch.hub.HASH_REGEX.search(path.name)
    expected = named.group(1) if named else ""
    if len(expected) < 8:
        return  # not a hub file name: nothing to check against
    actual = file_sha256(path)
    if not actual.startswith(expected):
        raise StageError(f"{path}: its SHA-256 begins {actual[:len(expected)]}, not "
                         f"{expected} as its name says: the file is damaged or not torchvision's; "
                         "delete it so it is downloaded again, or copy it again")


def _weights_file(path: Path, what: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; a bad file fails too
        raise StageError(f"{what}: {path} is not a loadable weights file ({type(exc).__name__}); "
                         "give a checkpoint written by the train stage or a torchvision ResNet "
                         "state-dict file") from None


def _file_state_dict(path_str: str) -> dict:
    path = Path(path_str)
    if not path.is_file():
        raise StageError(f"model.weights: file {path} not found; give a torchvision ResNet "
                         "state-dict file, 'imagenet' or 'none'")
    state = _weights_file(path, "model.weights")
    if isinstance(state, dict) and "model_state" in state:  # one of our own checkpoints
        verify_checkpoint(path, state)
        return {k: v for k, v in state["model_state"].items() if not k.startswith("fc.")}
    check_tensors(path, state)
    return state


def build_model(arch: str, num_classes: int, dropout: float, weights: str = "none",
                zero_init_residual: bool = False) -> nn.Module:
    """A ResNet with pretrained trunk (``weights``: imagenet | none | path) and a fresh head.

    ``zero_init_residual``: the last BatchNorm of each residual block starts at 0, so every block
    starts as the identity and a deep ResNet trains from scratch like a shallow one at first
    (torchvision's option; loaded weights replace it)."""
    if arch not in ARCHS:
        raise StageError(f"model.arch={arch!r} is unknown; expected one of {', '.join(ARCHS)}")
    model = ARCHS[arch][0](weights=None, zero_init_residual=zero_init_residual)
    if weights == "imagenet":
        state = _imagenet_state_dict(arch)
        try:
            model.load_state_dict(state)
        except RuntimeError:  # StageError is one too: only load_state_dict is in here
            raise StageError(f"{imagenet_weights_file(arch)}: does not hold {arch}'s weights; "
                             "delete it so it is downloaded again") from None
    elif weights != "none":
        state = _file_state_dict(weights)
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:  # same key names, other shapes: another depth of ResNet
            missing, unexpected = ["(tensor shapes differ)"], []
        wrong = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
        if wrong:
            raise StageError(f"model.weights: {weights} does not fit {arch} "
                             f"(mismatch: {wrong[0]}); give weights of the same arch")
    model.fc = nn.Sequential(nn.Dropout(p=dropout), nn.Linear(model.fc.in_features, num_classes))
    return model


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """Only the named top-level modules keep ``requires_grad``."""
    for name, child in model.named_children():
        for p in child.parameters():
            p.requires_grad = name in trainable


def frozen_prefix(trainable: list[str]) -> int:
    """How many leading top-level modules hold no trainable weights (they run under no_grad)."""
    n = 0
    for name in RESNET_CHILDREN:
        if name in trainable:
            break
        n += 1
    return n


def set_train_mode(model: nn.Module, trainable: list[str]) -> None:
    """Train mode for the trainable modules only: frozen BatchNorm keeps ImageNet's statistics."""
    model.train()
    for name, child in model.named_children():
        if name not in trainable:
            child.eval()


def forward(model: nn.Module, x: torch.Tensor, n_frozen: int = 0) -> torch.Tensor:
    """ResNet's forward, with the first ``n_frozen`` modules under no_grad (no graph kept)."""
    children = [getattr(model, name) for name in RESNET_CHILDREN]
    with torch.no_grad():
        for module in children[:n_frozen]:
            x = module(x)
    for i, module in enumerate(children[n_frozen:], start=n_frozen):
        if RESNET_CHILDREN[i] == "fc":
            x = torch.flatten(x, 1)
        x = module(x)
    return x


def weights_digest(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a checkpoint's content: its metadata (every key but the weights and the
    digest) as sorted JSON, then each tensor in name order with its dtype, shape and raw bytes.
    Any flipped bit, in a weight or in a class name, changes it."""
    h = hashlib.sha256()
    h.update(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        h.update(f"\n{name}\0{tensor.dtype}\0{list(tensor.shape)}\n".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _content(ckpt: dict) -> tuple[dict, dict]:
    return {k: v for k, v in ckpt.items() if k not in ("model_state", DIGEST_KEY)}, \
        ckpt["model_state"]


def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """``model``: the module, or a state dict of it (the train stage keeps its best epoch's)."""
    from stages.common.atomic import atomic_file

    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    ckpt = {"format": CHECKPOINT_FORMAT, **meta, "model_state": state}
    ckpt[DIGEST_KEY] = weights_digest(*_content(ckpt))
    with atomic_file(path, "wb") as f:
        torch.save(ckpt, f)


def check_tensors(path: Path, state: Any) -> None:
    """Weights must be a mapping of names to tensors, every floating-point one finite: a NaN
    weight made every picture "animal nan"."""
    if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise StageError(f"{path}: not a mapping of weight names to tensors (a "
                         f"{type(state).__name__}); not a weights file of a ResNet")
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
    "arch": (lambda v: v in ARCHS, "one of " + ", ".join(ARCHS)),
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


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes, once verified (:func:`verify_checkpoint`);
    returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: checkpoint not found; run the train stage first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; a bad file fails too
        raise StageError(f"{path}: not a loadable checkpoint ({type(exc).__name__}); "
                         "only weights-only checkpoints written by the train stage are accepted") \
            from None
    verify_checkpoint(path, ckpt)
    check_meta(path, ckpt)
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["dropout"], "none")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:  # names or shapes of another arch or class count
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise StageError(f"{path}: its weights do not fit a {ckpt['arch']} with "
                         f"{len(ckpt['classes'])} classes ({detail[:120]}); the file is not one "
                         f"the train stage wrote; {REGENERATE}") from None
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k not in ("model_state", DIGEST_KEY)}
    return model, meta


def check_logits(logits, rows: int, classes: int, model_path: str | Path) -> None:
    """Stop, in one line naming the model file, when it does not answer one finite logit per
    class for each input: a damaged or diverged model must never answer "animal nan", nor
    "object 1.000000" from an overflow."""
    import numpy as np

    shape = tuple(logits.shape)
    if shape != (rows, classes):
        raise StageError(f"{model_path}: the model answered logits of shape {shape} for {rows} "
                         f"inputs of {classes} classes; the file is damaged or not of this "
                         "project: export or train it again")
    finite = (bool(torch.isfinite(logits).all()) if isinstance(logits, torch.Tensor)
              else bool(np.isfinite(logits).all()))
    if not finite:
        raise StageError(f"{model_path}: the model answers NaN or infinite logits; its weights "
                         "are damaged or diverged: retrain (dvc repro) or export it again")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StageError("device=cuda but no CUDA device is visible; use auto or cpu")
    return torch.device(name)
