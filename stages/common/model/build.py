"""The classifier: a torchvision model of one of the families in stages.common.config.archs,
built through torchvision's registry, with a dropout + 3-way head, its starting weights,
freezing, forward, and the model a checkpoint describes (:func:`load_checkpoint`).

``model.weights`` pointing at one of our checkpoints is verified as any checkpoint is
(stages.common.model.checkpoint); ImageNet weights against the SHA-256 prefix that torchvision
puts in their file name.
"""
from __future__ import annotations

import contextlib
import socket
import urllib.error
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models

from stages.common.config.archs import ARCH_NAMES, family_of
from stages.common.infra.digest import file_sha256
from stages.common.infra.errors import StageError
from stages.common.model.checkpoint import (REGENERATE, ModelMeta, check_tensors,
                                            verify_checkpoint)

# ImageNet's normalisation: every family's weights use it today (their transforms say so);
# an arch whose weights carry none would fall back to it.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def _weights_enum(arch: str):
    """torchvision's ImageNet weights of ``arch`` (its DEFAULT entry)."""
    return models.get_model_weights(arch).DEFAULT


def normalisation(arch: str) -> tuple[list[float], list[float]]:
    """(mean, std) of the input, from the transforms of ``arch``'s ImageNet weights: the model
    sees pixels normalised as its weights were trained with, whether or not it loads them."""
    transforms = _weights_enum(arch).transforms()
    mean, std = getattr(transforms, "mean", None), getattr(transforms, "std", None)
    if mean is None or std is None:
        return list(IMAGENET_MEAN), list(IMAGENET_STD)
    return [float(v) for v in mean], [float(v) for v in std]


def imagenet_weights_file(arch: str) -> Path:
    """Where torchvision keeps the ImageNet weights of ``arch`` (``$TORCH_HOME/hub/checkpoints``,
    named as the last part of the weights' URL)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(_weights_enum(arch).url).name


def _imagenet_state_dict(arch: str) -> dict:
    """ImageNet weights from torch's cache; downloaded there first when the network allows.
    Either way the file's SHA-256 must begin with the digits torchvision puts in its name."""
    path = imagenet_weights_file(arch)
    if not path.is_file():
        # Bounded: on an air-gapped network the error must come in a minute, not hang the run.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)
        try:
            torch.hub.load_state_dict_from_url(_weights_enum(arch).url, progress=True,
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
                         "give a checkpoint written by the train stage or a torchvision "
                         "state-dict file of the arch") from None


def _file_state_dict(path_str: str, arch: str) -> dict:
    path = Path(path_str)
    if not path.is_file():
        raise StageError(f"model.weights: file {path} not found; give a torchvision {arch} "
                         "state-dict file, 'imagenet' or 'none'")
    state = _weights_file(path, "model.weights")
    if isinstance(state, dict) and "model_state" in state:  # one of our own checkpoints
        verify_checkpoint(path, state)
        return state["model_state"]
    check_tensors(path, state)
    return state


def _head(model: nn.Module, arch: str) -> tuple[nn.Module, str, str]:
    """(the module holding ``arch``'s head, the head's name in it, the head's state-dict key
    prefix), from the family's path (``fc``, ``classifier.-1``)."""
    parent_name, _, index = family_of(arch).head.partition(".")
    if not index:
        return model, parent_name, f"{parent_name}."
    parent = getattr(model, parent_name)
    name = str(int(index) % len(parent))
    return parent, name, f"{parent_name}.{name}."


def build_model(arch: str, num_classes: int, dropout: float, weights: str = "none",
                zero_init_residual: bool = False) -> nn.Module:
    """``arch`` with its trunk's starting weights (``weights``: imagenet | none | path) and a
    fresh head: dropout, then a linear layer to ``num_classes``.

    ``zero_init_residual``: where the family has the option (resnet), the last BatchNorm of each
    residual block starts at 0, so every block starts as the identity and a deep ResNet trains
    from scratch like a shallow one at first (torchvision's option; loaded weights replace it).
    Other families have none and ignore it (stages.common.config.archs)."""
    if arch not in ARCH_NAMES:
        raise StageError(f"model.arch={arch!r} is unknown; expected one of "
                         f"{', '.join(ARCH_NAMES)}")
    family = family_of(arch)
    kwargs = dict(family.build_kwargs)
    if family.zero_init:
        kwargs[family.zero_init] = zero_init_residual
    model = models.get_model(arch, weights=None, **kwargs)
    owner, name, head_prefix = _head(model, arch)
    if weights == "imagenet":
        state = _imagenet_state_dict(arch)
        try:
            model.load_state_dict(state)
        except RuntimeError:  # StageError is one too: only load_state_dict is in here
            raise StageError(f"{imagenet_weights_file(arch)}: does not hold {arch}'s weights; "
                             "delete it so it is downloaded again") from None
    elif weights != "none":
        # the trunk only: the head is new (our checkpoints' and torchvision's heads alike)
        state = {k: v for k, v in _file_state_dict(weights, arch).items()
                 if not k.startswith(head_prefix)}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError:  # same key names, other shapes: another depth of the family
            missing, unexpected = ["(tensor shapes differ)"], []
        wrong = [k for k in missing if not k.startswith(head_prefix)] + list(unexpected)
        if wrong:
            raise StageError(f"model.weights: {weights} does not fit {arch} "
                             f"(mismatch: {wrong[0]}); give weights of the same arch")
    linear = getattr(owner, name)
    setattr(owner, name, nn.Sequential(nn.Dropout(p=dropout),
                                       nn.Linear(linear.in_features, num_classes)))
    return model


def freeze(model: nn.Module, trainable: list[str]) -> None:
    """Only the named top-level modules keep ``requires_grad``."""
    for name, child in model.named_children():
        for p in child.parameters():
            p.requires_grad = name in trainable


def frozen_prefix(arch: str, trainable: list[str]) -> int:
    """How many leading top-level modules hold no trainable weights (they run under no_grad)."""
    n = 0
    for name in family_of(arch).groups:
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


def forward(model: nn.Module, x: torch.Tensor, n_frozen: int = 0, *, arch: str) -> torch.Tensor:
    """The family's forward, group by group, the first ``n_frozen`` groups under no_grad (no
    graph kept)."""
    family = family_of(arch)
    for i, name in enumerate(family.groups):
        with torch.no_grad() if i < n_frozen else contextlib.nullcontext():
            if name == family.flatten_before:
                x = torch.flatten(x, 1)
            x = getattr(model, name)(x)
    return x


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is the machine running out of memory (Python's MemoryError, or torch's
    allocator failing, a RuntimeError), not a fault of the file being read."""
    return isinstance(exc, MemoryError) or (
        isinstance(exc, RuntimeError) and any(words in str(exc) for words in (
            "can't allocate memory", "out of memory", "Cannot allocate memory")))


def load_checkpoint(path: str | Path) -> tuple[nn.Module, ModelMeta]:
    """Rebuild the model a checkpoint describes, once verified (:func:`verify_checkpoint`);
    returns (model in eval mode, its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: checkpoint not found; run the train stage first")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # weights_only refuses pickled objects; a bad file fails too
        if out_of_memory(exc):  # the file may be fine: the machine is short, not the file
            raise StageError(f"{path}: out of memory while loading it ({path.stat().st_size:,} "
                             "bytes); free memory (or use a machine with more) and rerun") \
                from None
        raise StageError(f"{path}: not a loadable checkpoint ({type(exc).__name__}); "
                         "only weights-only checkpoints written by the train stage are accepted") \
            from None
    verify_checkpoint(path, ckpt)
    meta = ModelMeta.read(path, ckpt)
    model = build_model(meta.arch, len(meta.classes), meta.dropout, "none")
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:  # names or shapes of another arch or class count
        first = str(exc).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0] if first else ""
        raise StageError(f"{path}: its weights do not fit a {meta.arch} with "
                         f"{len(meta.classes)} classes ({detail[:120]}); the file is not one "
                         f"the train stage wrote; {REGENERATE}") from None
    model.eval()
    return model, meta
