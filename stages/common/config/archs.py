"""The architectures ``model.arch`` accepts: one table of torchvision classifier families, plain
data without torch. params.py checks ``model.*`` against it before any stage imports torch;
stages.common.model.build builds from it through torchvision's own registry
(``torchvision.models.get_model`` / ``get_model_weights``), so the weights, their download file
and their normalisation are torchvision's for every arch.

Adding a family is one :class:`Family` entry in :data:`FAMILIES` and its case in
tests/test_model.py (builds, trains one step, exports to ONNX; its groups are the model's own).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """How the pipeline uses one family of torchvision classifiers.

    ``groups``: the model's top-level modules in forward order; ``model.trainable`` names them
    (``all``: every one), and train runs a frozen leading run of them under no_grad.
    ``flatten_before``: the group whose input torchvision's forward flattens (None: the model
    flattens inside a module). ``head``: the module replaced by dropout + the new linear layer,
    as a path from the model (``classifier.-1``: the last module of ``classifier``).
    ``build_kwargs``: passed to the torchvision builder; ``dropout: 0.0`` turns off the family's
    own dropout before its head, so ``model.dropout`` is the one dropout before the linear.
    ``zero_init``: the builder's option that starts each residual block as the identity, set by
    ``model.zero_init_residual``; None where the family has no such option (train says so, and
    the model starts from torchvision's own initialisation).
    """
    archs: tuple[str, ...]
    groups: tuple[str, ...]
    head: str
    flatten_before: str | None
    build_kwargs: tuple[tuple[str, object], ...] = ()
    zero_init: str | None = None


FAMILIES = {
    "resnet": Family(
        archs=("resnet18", "resnet34", "resnet50", "resnet101", "resnet152"),
        groups=("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                "avgpool", "fc"),
        head="fc", flatten_before="fc", zero_init="zero_init_residual"),
    "mobilenet_v3": Family(
        archs=("mobilenet_v3_small", "mobilenet_v3_large"),
        groups=("features", "avgpool", "classifier"),
        head="classifier.-1", flatten_before="classifier", build_kwargs=(("dropout", 0.0),)),
    "efficientnet": Family(
        archs=("efficientnet_b0", "efficientnet_b1", "efficientnet_b2", "efficientnet_b3"),
        groups=("features", "avgpool", "classifier"),
        head="classifier.-1", flatten_before="classifier", build_kwargs=(("dropout", 0.0),)),
    "regnet": Family(
        archs=("regnet_y_400mf", "regnet_y_800mf"),
        groups=("stem", "trunk_output", "avgpool", "fc"),
        head="fc", flatten_before="fc"),
    "convnext": Family(
        archs=("convnext_tiny",),
        groups=("features", "avgpool", "classifier"),
        head="classifier.-1", flatten_before=None),  # its classifier holds a Flatten
}

# Every arch model.arch accepts, family by family: the only list of them.
ARCH_NAMES = tuple(arch for family in FAMILIES.values() for arch in family.archs)


def family_of(arch: str) -> Family:
    """The family of ``arch`` (one of :data:`ARCH_NAMES`); KeyError otherwise."""
    for family in FAMILIES.values():
        if arch in family.archs:
            return family
    raise KeyError(arch)


# Crop side: activations grow with its square, 20x those of the report's 224 px at 1,024.
MAX_CROP_SIZE = 1024
# Crops per forward pass: 4,096 crops of 224 px are 2.4 GB of float32 input before any
# activation; export.batch_size repeats test crops up to this many in memory.
MAX_BATCH = 4096
# Pixels of a picture decoded (crops.max_image_pixels, predict's --max-image-pixels): OpenCV's own
# limit (CV_IO_MAX_IMAGE_PIXELS, 2**30 = 3 GB decoded) refuses larger pictures anyway.
# These two here, not in params.py: predict checks its options without loading the params
# schema (pydantic), which the edge runtime (requirements-edge.txt) has not.
MAX_IMAGE_PIXELS = 2**30
