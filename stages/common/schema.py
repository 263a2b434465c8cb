"""Every key of ``params.yaml`` and the values it accepts, checked all at once.

:func:`stages.common.params.load` runs :func:`check_all` before a stage does anything, so a typo
in ``train.lr`` stops ``dvc repro`` at its first stage (the download), not an hour later at
train. An unknown key (``train.lrr``) is an error too: DVC would pass it silently and the run
would use the default. Stages read their values from :func:`values`, so each rule lives here
only. No torch import: checking costs milliseconds.
"""
from __future__ import annotations

from typing import Any, Callable

from stages.common import params as P
from stages.common.openimages import read_label_map
from stages.common.pictures import MAX_IMAGE_PIXELS

ARCH_NAMES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# Top-level modules of a torchvision ResNet, in forward order.
RESNET_CHILDREN = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                   "avgpool", "fc"]
DEVICES = ["auto", "cpu", "cuda", "mps"]
AMP = ["auto", "off", "bf16", "fp16"]
ZOO_SPLITS = ("train", "validation", "test")

Rule = Callable[[dict, str], Any]

# Upper bounds, for values that would otherwise pass here and crash or exhaust a stage hours
# later, after the stages upstream of it have run.
MAX_SEED = 2**32 - 1  # NumPy's global seeding (np.random.seed, in train) takes nothing larger
# Processes and threads: the largest single machines have 2 x 128 cores and at most 16 GPUs;
# each process is an interpreter with torch or OpenCV loaded (hundreds of MB), so more cannot
# run at once, and 100,000 would hit the machine's process and memory limits mid-run.
MAX_PROCESSES = 256
# Crops per forward pass: 4,096 crops of 224 px are 2.4 GB of float32 input before any
# activation; export.batch_size repeats test crops up to this many in memory.
MAX_BATCH = 4096
# Crop side: activations grow with its square, 20x those of the report's 224 px at 1,024.
MAX_CROP_SIZE = 1024
MAX_EPOCHS = 10_000
MAX_SPEED_RUNS = 10_000  # timed forward passes: more only makes the stage slower
MAX_MISTAKES = 256  # subplots of the mistakes figure: more is unreadable and minutes to draw


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    return lambda p, k: P.number(p, k, lo=lo, hi=hi, integer=True)


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Rule:
    return lambda p, k: float(P.number(p, k, lo=lo, hi=hi, lo_open=lo_open))


def one_of(options: list | tuple) -> Rule:
    return lambda p, k: P.choice(p, k, list(options))


def boolean(p: dict, k: str) -> bool:
    return P.flag(p, k)


def text(allowed: str) -> Rule:
    def rule(p: dict, k: str) -> str:
        value = P.get(p, k)
        P.check(isinstance(value, str) and bool(value.strip()), k, allowed, value)
        return value
    return rule


def fraction(p: dict, k: str) -> float:
    value = P.number(p, k, lo=0, hi=1, lo_open=True)
    P.check(value < 1, k, "a number > 0 and < 1", value)
    return float(value)


SOURCES = ("sample", "open-images-v7", "mirror")


def source(p: dict, k: str) -> str:
    value = P.get(p, k)
    if isinstance(value, str) and value not in SOURCES and value.strip():
        # Until 2026-12 a folder path went here; DVC cannot track a dependency named by a value
        # that is sometimes a path and sometimes not, so the path has a key of its own.
        raise P.ParamError(f"params.yaml: data.source={value!r} is not allowed; expected one of "
                           f"{', '.join(SOURCES)} (for a folder: data.source: mirror and "
                           f"data.mirror: {value}, which DVC tracks as a dependency)")
    return P.choice(p, k, list(SOURCES))


def zoo_splits(p: dict, k: str) -> tuple[str, ...]:
    splits = P.get(p, k)
    P.check(isinstance(splits, list) and bool(splits) and len(set(map(str, splits))) == len(splits)
            and all(sp in ZOO_SPLITS for sp in splits),
            k, "a non-empty list of distinct splits from " + ", ".join(ZOO_SPLITS), splits)
    return tuple(splits)


def trainable(p: dict, k: str) -> list[str]:
    """``all`` or a non-empty list of top-level ResNet modules, resolved to the list."""
    value = P.get(p, k)
    allowed = "'all' or a non-empty list of " + ", ".join(RESNET_CHILDREN)
    if value == "all":
        return list(RESNET_CHILDREN)
    P.check(isinstance(value, list) and bool(value)
            and all(isinstance(m, str) and m in RESNET_CHILDREN for m in value), k, allowed, value)
    return list(value)


RULES: dict[str, Rule] = {
    "seed": integer(0, MAX_SEED),
    "data.source": lambda p, k: source(p, k),
    "data.mirror": text("the path of an Open Images-style folder"),
    "data.labels": lambda p, k: read_label_map(p),
    # Below ~96 px there is no room for objects above the crop stage's minimum box.
    "data.sample.images": integer(1, 1_000_000),
    "data.sample.max_side": integer(96, 4096),
    "data.zoo.splits": zoo_splits,
    "data.zoo.max_samples": integer(lo=1),
    "data.zoo.shuffle": boolean,
    "data.zoo.num_workers": integer(1, MAX_PROCESSES),
    # Seconds the download waits for a connection or for the next bytes (stages.common.zoo).
    "data.zoo.timeout": real(1, 3600),
    "crops.size": integer(8, MAX_CROP_SIZE),
    "crops.min_box_px": integer(lo=1),
    "crops.skip_group_of": boolean,
    "crops.skip_depiction": boolean,
    "crops.dedup_iou": real(0, 1, lo_open=True),
    "crops.reduced_decode": boolean,
    "crops.max_image_pixels": integer(1, MAX_IMAGE_PIXELS),
    "crops.workers": integer(1, MAX_PROCESSES),
    "split.test": fraction,
    "split.val": fraction,
    "model.arch": one_of(ARCH_NAMES),
    "model.weights": text("imagenet, none or a path to a .pth file"),
    "model.zero_init_residual": boolean,
    "model.dropout": real(0, 0.99),
    "model.trainable": trainable,
    "train.epochs": integer(1, MAX_EPOCHS),
    "train.batch_size": integer(1, MAX_BATCH),
    "train.lr": real(0, lo_open=True),
    "train.t_max_ratio": real(0, 10, lo_open=True),
    "train.weight_decay": real(0),
    "train.focal_alpha": real(0, lo_open=True),
    "train.focal_gamma": real(0),
    "train.patience": integer(lo=1),
    "train.num_workers": integer(0, MAX_PROCESSES),
    "train.device": one_of(DEVICES),
    "train.nproc": integer(1, MAX_PROCESSES),
    "train.amp": one_of(AMP),
    "train.compile": boolean,
    "train.pin_memory": boolean,
    "evaluate.batch_size": integer(1, MAX_BATCH),
    "evaluate.speed_runs": integer(1, MAX_SPEED_RUNS),
    "evaluate.device": one_of(DEVICES),
    "evaluate.mistakes": integer(1, MAX_MISTAKES),
    "export.opset": integer(17, 23),
    "export.batch_size": integer(1, MAX_BATCH),
    "export.speed_runs": integer(1, MAX_SPEED_RUNS),
    "export.parity_atol": real(0, lo_open=True),
}


def _cross_checks(v: dict[str, Any]) -> None:
    # val > 0: train needs a validation set for early stopping; the test set is never used so.
    P.check(v["split.test"] + v["split.val"] < 1, "split.val",
            f"a number > 0 with split.test + split.val < 1 (split.test is {v['split.test']})",
            v["split.val"])


def unknown_keys(params: dict, prefix: str = "") -> None:
    """Stop on the first key no rule knows, naming the keys allowed beside it."""
    for key, value in params.items():
        dotted = f"{prefix}{key}"
        if dotted in RULES:
            continue  # a leaf, or a free-form map such as data.labels
        below = sorted({r[len(dotted) + 1:].split(".")[0] for r in RULES
                        if r.startswith(dotted + ".")})
        if not below:
            here = sorted({r[len(prefix):].split(".")[0] for r in RULES if r.startswith(prefix)})
            where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
            raise P.ParamError(f"params.yaml: unknown key '{dotted}'; keys allowed {where}: "
                               + ", ".join(here))
        P.check(isinstance(value, dict), dotted, "a section with keys " + ", ".join(below),
                value)
        unknown_keys(value, dotted + ".")


def check_all(params: dict) -> dict[str, Any]:
    """Every key's checked value by dotted name; the first bad key stops with one line."""
    unknown_keys(params)
    checked = {key: rule(params, key) for key, rule in RULES.items()}
    _cross_checks(checked)
    return checked

