"""The classifier: a torchvision ResNet with a dropout + 3-way head, freezing, checkpoints.

A checkpoint is one dict of plain types and tensors, so it loads with
``torch.load(weights_only=True)`` (no pickled code runs) and carries everything needed to use it:
arch, class names (ImageFolder order), image size, normalisation and the params it was trained with.
"""
from __future__ import annotations

import socket
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from stages.common.params import StageError
from stages.common.schema import RESNET_CHILDREN

ARCHS = {
    "resnet18": (models.resnet18, models.ResNet18_Weights),
    "resnet34": (models.resnet34, models.ResNet34_Weights),
    "resnet50": (models.resnet50, models.ResNet50_Weights),
    "resnet101": (models.resnet101, models.ResNet101_Weights),
    "resnet152": (models.resnet152, models.ResNet152_Weights),
}
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
CHECKPOINT_FORMAT = 1


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` (``$TORCH_HOME/hub/checkpoints``)."""
    url = ARCHS[arch][1].DEFAULT.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name


def _imagenet_state_dict(arch: str) -> dict:
    """ImageNet weights from torch's cache; downloaded there first when the network allows."""
    path = imagenet_weights_file(arch)
    if not path.is_file():
        # Bounded: on an air-gapped network the error must come in a minute, not hang the run.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)
        try:
            torch.hub.load_state_dict_from_url(ARCHS[arch][1].DEFAULT.url, progress=True)
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            raise StageError(
                f"ImageNet weights for {arch} not found at {path} and the download failed ({exc}); "
                "copy that file there (or set TORCH_HOME), or set model.weights to a local .pth "
                "file or to 'none'") from None
        finally:
            socket.setdefaulttimeout(previous)
    return torch.load(path, map_location="cpu", weights_only=True)


def _file_state_dict(path_str: str) -> dict:
    path = Path(path_str)
    if not path.is_file():
        raise StageError(f"model.weights: file {path} not found; give a torchvision ResNet "
                         "state-dict file, 'imagenet' or 'none'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model_state" in state:  # one of our own checkpoints
        state = {k: v for k, v in state["model_state"].items() if not k.startswith("fc.")}
    return state


def build_model(arch: str, num_classes: int, dropout: float, weights: str = "none") -> nn.Module:
    """A ResNet with pretrained trunk (``weights``: imagenet | none | path) and a fresh head."""
    if arch not in ARCHS:
        raise StageError(f"model.arch={arch!r} is unknown; expected one of {', '.join(ARCHS)}")
    model = ARCHS[arch][0](weights=None)
    if weights == "imagenet":
        model.load_state_dict(_imagenet_state_dict(arch))
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


def trainable_modules(trainable: str | list[str]) -> list[str]:
    """Resolve ``model.trainable`` (``all`` or module names) to top-level module names."""
    if trainable == "all":
        return list(RESNET_CHILDREN)
    unknown = [m for m in trainable if m not in RESNET_CHILDREN]
    if unknown or not trainable:
        raise StageError(f"model.trainable={trainable!r}: expected 'all' or a list of "
                         f"{', '.join(RESNET_CHILDREN)}")
    return list(trainable)


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


def save_checkpoint(path: str | Path, model: nn.Module | dict[str, torch.Tensor],
                    meta: dict[str, Any]) -> None:
    """``model``: the module, or a state dict of it (the train stage keeps its best epoch's)."""
    from stages.common.atomic import atomic_file

    weights = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    with atomic_file(path, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **meta, "model_state": state}, f)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes; returns (model in eval mode, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: checkpoint not found; run the train stage first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; a bad file fails too
        raise StageError(f"{path}: not a loadable checkpoint ({type(exc).__name__}); "
                         "only weights-only checkpoints written by the train stage are accepted") \
            from None
    needed = ["arch", "classes", "image_size", "mean", "std", "dropout", "model_state"]
    missing = [k for k in needed if k not in ckpt]
    if missing:
        raise StageError(f"{path}: checkpoint lacks {', '.join(missing)}; retrain with this version")
    model = build_model(ckpt["arch"], len(ckpt["classes"]), ckpt["dropout"], "none")
    model.load_state_dict(ckpt["model_state"])
    model.eval()
    meta = {k: v for k, v in ckpt.items() if k != "model_state"}
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
