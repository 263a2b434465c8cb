"""``params.yaml`` as one typed object, every key checked before a stage does any work.

Each stage starts with ``cfg = params.load()`` and reads ``cfg.train.lr``, ``cfg.crops.size``...
:func:`load` checks the WHOLE file whichever stage runs, so a typo in ``train.lr`` stops
``dvc repro`` at its first stage (the download), not an hour later at train; an unknown key
(``train.lrr``) is refused too, since DVC would pass it silently and the run would use nothing.
A bad value is one line naming the key and what it accepts, e.g.
``params.yaml: model.arch='resnet51' is not allowed; expected one of resnet18, ...``.

The rules are pydantic 2 models (``extra="forbid"``, strict types, bounds): the model IS the
list of keys. Checking costs milliseconds and imports no torch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types
import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from stages.common.config.archs import (ARCH_NAMES, MAX_BATCH, MAX_CROP_SIZE, MAX_IMAGE_PIXELS,
                                        family_of)
from stages.common.config.labels import ALARM_LABEL, AUTO_MODE, MODE_NAME
from stages.common.infra.errors import ParamError
from stages.common.config.formats import FORMATS, ONNX_FP32

PARAMS_FILE = Path("params.yaml")

SOURCES = ("sample", "open-images-v7", "mirror")
# Labels become folder names (ImageFolder classes).
LABEL_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

# Upper bounds, for values that would otherwise pass here and crash or exhaust a stage hours
# later, after the stages upstream of it have run.
MAX_SEED = 2**32 - 1  # NumPy's global seeding (np.random.seed, in train) takes nothing larger
# Processes and threads: the largest single machines have 2 x 128 cores and at most 16 GPUs;
# each process is an interpreter with torch or OpenCV loaded (hundreds of MB), so more cannot
# run at once, and 100,000 would hit the machine's process and memory limits mid-run.
MAX_PROCESSES = 256
MAX_EPOCHS = 10_000
MAX_SPEED_RUNS = 10_000  # timed forward passes: more only makes the stage slower
MAX_MISTAKES = 256  # subplots of the mistakes figure: more is unreadable and minutes to draw

# The keys whose value changes no byte any stage writes (timing figures aside: they measure the
# machine, and these keys only make a stage faster or slower), so no stage lists them as a DVC
# param and `dvc exp run -S crops.workers=8` reruns nothing. Each with the reason it cannot
# change an output; tests/test_layout.py checks dvc.yaml against this map.
NO_OUTPUT = {
    "data.zoo.num_workers": "images fetched at once: FiftyOne fetches the same chosen images, "
                            "each whole, and download copies them in its own sorted order",
    "data.zoo.timeout": "how long download waits on the network: a run gets every chosen file "
                        "whole or fails, it never writes other data",
    "crops.workers": "processes: each box's crop and placement is drawn from a seed of its own, "
                     "so the bytes are the same for any count (tests/test_crops.py)",
    "train.num_workers": "threads that decode and augment crops: each crop is decoded and "
                         "jittered alone, with draws that are functions of (seed, epoch, crop) "
                         "(tests/test_reproducibility.py)",
    "train.pin_memory": "CUDA page-locked host copies: the same values reach the GPU, only "
                        "without blocking",
}


def _expect(text: str) -> Any:
    """What a key accepts, in words, for a rule pydantic cannot describe from the type."""
    return {"expected": text}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Sample(Section):
    images: int = Field(ge=1, le=1_000_000)
    # Below ~96 px there is no room for objects above the crop stage's minimum box.
    max_side: int = Field(ge=96, le=4096)


class Zoo(Section):
    splits: list[Literal["train", "validation", "test"]] = Field(
        json_schema_extra=_expect("a non-empty list of distinct splits from train, validation, "
                                  "test"))
    max_samples: int = Field(ge=1)
    shuffle: bool
    num_workers: int = Field(ge=1, le=MAX_PROCESSES)
    # Seconds the download waits for a connection or for the next bytes (download's zoo.py).
    timeout: float = Field(ge=1, le=3600)

    @field_validator("splits")
    @classmethod
    def _distinct(cls, splits: list[str]) -> list[str]:
        if not splits or len(set(splits)) != len(splits):
            raise ValueError("not distinct")
        return splits


class Data(Section):
    source: Literal[SOURCES]  # type: ignore[valid-type]
    mirror: str = Field(min_length=1, json_schema_extra=_expect(
        "the path of an Open Images-style folder"))
    labels: dict[str, list[str]] = Field(json_schema_extra=_expect(
        "a mapping of label -> list of Open Images class names"))
    sample: Sample
    zoo: Zoo

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip() and value not in SOURCES:
            # A folder path is data.mirror's: DVC cannot track a dependency named by a value
            # that is sometimes a path and sometimes not, so the path has a key of its own.
            raise ParamError(f"params.yaml: data.source={value!r} is not allowed; expected one "
                             f"of {', '.join(SOURCES)} (for a folder: data.source: mirror and "
                             f"data.mirror: {value}, which DVC tracks as a dependency)")
        return value

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, labels: Any) -> dict[str, list[str]]:
        """label -> non-empty list of class names, no class under two labels; sorted by label."""
        if not isinstance(labels, dict) or not labels:
            raise ValueError("not a mapping")
        owner: dict[str, str] = {}
        for label, names in labels.items():
            key = f"data.labels.{label}"
            if not (isinstance(label, str) and LABEL_NAME.fullmatch(label)):
                raise ParamError(f"params.yaml: {key}={label!r} is not allowed; expected a label "
                                 "usable as a folder name (letters, digits, _ . -)")
            if not (isinstance(names, list) and names
                    and all(isinstance(n, str) and n.strip() for n in names)):
                raise ParamError(f"params.yaml: {key}={names!r} is not allowed; expected a "
                                 "non-empty list of class names")
            for name in names:
                if name in owner:
                    raise ParamError(f"params.yaml: class {name!r} is listed under both "
                                     f"data.labels.{owner[name]} and {key}; a class needs one "
                                     "label")
                owner[name] = label
        if ALARM_LABEL not in labels:
            # The alarm (calibrate, evaluate, predict) is the person label's: the reason the
            # classifier exists.
            raise ParamError(f"params.yaml: data.labels has no {ALARM_LABEL!r} label; the "
                             f"{ALARM_LABEL} alarm needs one: add {ALARM_LABEL}: [Person, ...] "
                             "under data.labels")
        return {label: list(names) for label, names in sorted(labels.items())}

    @property
    def class_names(self) -> list[str]:
        """Every wanted Open Images class name, label by label."""
        return [n for label in self.labels for n in self.labels[label]]


class Crops(Section):
    size: int = Field(ge=8, le=MAX_CROP_SIZE)
    min_box_px: int = Field(ge=1)
    skip_group_of: bool
    skip_depiction: bool
    dedup_iou: float = Field(gt=0, le=1)
    reduced_decode: bool
    max_image_pixels: int = Field(ge=1, le=MAX_IMAGE_PIXELS)
    workers: int = Field(ge=1, le=MAX_PROCESSES)


class Split(Section):
    test: float = Field(gt=0, lt=1)
    val: float = Field(gt=0, lt=1)
    # 0: calibrate fits on val; > 0: on a split of its own (val also picks the best epoch).
    calibration: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _room_for_train(self) -> "Split":
        # val > 0: train needs a validation set for early stopping; the test set is never used so.
        if self.test + self.val >= 1:
            raise ParamError(f"params.yaml: split.val={self.val!r} is not allowed; expected a "
                             f"number > 0 with split.test + split.val < 1 (split.test is "
                             f"{self.test})")
        if self.test + self.val + self.calibration >= 1:
            raise ParamError(f"params.yaml: split.calibration={self.calibration!r} is not "
                             "allowed; expected a number >= 0 with split.test + split.val + "
                             f"split.calibration < 1 (split.test is {self.test}, split.val "
                             f"{self.val})")
        return self


class Model(Section):
    arch: Literal[ARCH_NAMES]  # type: ignore[valid-type]
    weights: str = Field(min_length=1, json_schema_extra=_expect(
        "imagenet, none or a path to a .pth file"))
    zero_init_residual: bool
    dropout: float = Field(ge=0, le=0.99)
    # 'all' or a list of the arch's groups (stages.common.config.archs), resolved to the list
    trainable: list[str] = Field(json_schema_extra=_expect(
        "'all' or a non-empty list of the arch's modules (stages/common/config/archs.py)"))

    @field_validator("trainable", mode="before")
    @classmethod
    def _trainable_shape(cls, value: Any) -> Any:
        return ["all"] if value == "all" else value

    @model_validator(mode="after")
    def _trainable(self) -> "Model":
        try:
            groups = trainable_modules(self.trainable, self.arch)
        except ValueError:
            allowed = ", ".join(family_of(self.arch).groups)
            raise ParamError(f"params.yaml: model.trainable={self.trainable!r} is not allowed; "
                             f"expected 'all' or a non-empty list of {allowed} ({self.arch}'s "
                             "modules)") from None
        object.__setattr__(self, "trainable", groups)  # a frozen model: resolved once, here
        return self


def trainable_modules(value: Any, arch: str) -> list[str]:
    """``model.trainable``: ``all`` or a non-empty list of ``arch``'s top-level modules (its
    family's groups), resolved to the list (``["all"]``, as a command line gives it, too)."""
    groups = family_of(arch).groups
    if value in ("all", ["all"]):
        return list(groups)
    if not (isinstance(value, list) and value
            and all(isinstance(m, str) and m in groups for m in value)):
        raise ValueError("not a module list")
    return list(value)


# train.augment: what train adds before the report's flip and colour jitter.
AUGMENTS = ("report", "augmix", "conditions")


class Train(Section):
    epochs: int = Field(ge=1, le=MAX_EPOCHS)
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    lr: float = Field(gt=0)
    t_max_ratio: float = Field(gt=0, le=10)
    weight_decay: float = Field(ge=0)
    focal_alpha: float = Field(gt=0)
    focal_gamma: float = Field(ge=0)
    patience: int = Field(ge=1)
    num_workers: int = Field(ge=0, le=MAX_PROCESSES)
    device: Literal["auto", "cpu", "cuda", "mps"]
    nproc: int = Field(ge=1, le=MAX_PROCESSES)
    amp: Literal["auto", "off", "bf16", "fp16"]
    compile: bool
    pin_memory: bool
    # report: the report's flip and colour jitter alone; augmix: AugMix before them; conditions:
    # a camera condition of augment_conditions before them (stages/train/augment.py)
    augment: Literal[AUGMENTS]  # type: ignore[valid-type]
    # the conditions trained on under augment: conditions (read only then); the others of
    # CONDITIONS stay held out, measured by stage conditions but never trained on
    augment_conditions: list[str] = Field(json_schema_extra=_expect(
        "a non-empty list of distinct camera conditions (docs/conditions.md)"))

    @field_validator("augment_conditions", mode="before")
    @classmethod
    def _augment_conditions(cls, value: Any) -> list[str]:
        if not (isinstance(value, list) and value
                and all(isinstance(c, str) and c in CONDITIONS for c in value)
                and len(set(value)) == len(value)):
            raise ParamError(f"params.yaml: train.augment_conditions={value!r} is not allowed; "
                             "expected a non-empty list of distinct conditions from "
                             + ", ".join(CONDITIONS))
        return list(value)


class CameraMode(Section):
    """One of calibrate.modes: a camera mode with a threshold of its own, fitted on the
    calibration crops under ``conditions`` (each at every severity of ``severities``; none: the
    clean crops)."""
    name: str
    conditions: list[str]
    severities: list[int]


MODES_EXAMPLE = "[{name: day}, {name: infrared, conditions: [infrared]}]"


def camera_modes(value: Any) -> list[dict]:
    """calibrate.modes checked, each mode completed (no conditions: the clean crops; severities
    default to all five): one line naming the first bad entry otherwise."""
    def bad(key: str, got: Any, expected: str) -> ParamError:
        return ParamError(f"params.yaml: calibrate.{key}={got!r} is not allowed; expected "
                          f"{expected}")

    if not isinstance(value, list):
        raise bad("modes", value, f"a list of camera modes, e.g. {MODES_EXAMPLE}, or []")
    modes, names = [], set()
    for i, mode in enumerate(value):
        key = f"modes[{i}]"
        if not (isinstance(mode, dict) and "name" in mode
                and set(mode) <= {"name", "conditions", "severities"}):
            raise bad(key, mode, "a mapping of name and optional conditions and severities, "
                                 f"e.g. {MODES_EXAMPLE}")
        name = mode["name"]
        if not (isinstance(name, str) and MODE_NAME.fullmatch(name)) or name == AUTO_MODE:
            raise bad(f"{key}.name", name, "a lower-case word (letters, digits, _ -; not "
                                           f"'{AUTO_MODE}', which is predict's own choice)")
        if name in names:
            raise bad(f"{key}.name", name, "a name no other mode has")
        names.add(name)
        conditions = mode.get("conditions", [])
        if not (isinstance(conditions, list) and all(c in CONDITIONS for c in conditions)
                and len(set(conditions)) == len(conditions)):
            raise bad(f"{key}.conditions", conditions, "a list of distinct conditions from "
                      f"{', '.join(CONDITIONS)} ([]: the clean crops)")
        severities = mode.get("severities", list(SEVERITIES) if conditions else [])
        if not (isinstance(severities, list)
                and all(type(s) is int and s in SEVERITIES for s in severities)
                and len(set(severities)) == len(severities)
                and bool(severities) == bool(conditions)):
            raise bad(f"{key}.severities", severities, "a non-empty list of distinct "
                      "severities from 1 to 5, and only with conditions")
        modes.append({"name": name, "conditions": conditions, "severities": sorted(severities)})
    return modes


class Calibrate(Section):
    # The share of persons that must raise the alarm (with the fewest false alarms).
    person_recall_target: float = Field(gt=0, le=1)
    # What the target promises on new pictures (stages.common.alarm.guarantee).
    guarantee: Literal["none", "average", "probability"]
    delta: float = Field(gt=0, le=0.5)  # guarantee: probability holds with probability 1 - delta
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    device: Literal["auto", "cpu", "cuda", "mps"]
    # Camera modes, each with its own threshold (Mondrian calibration); []: one threshold.
    modes: list[CameraMode]

    @field_validator("modes", mode="before")
    @classmethod
    def _modes(cls, value: Any) -> list[dict]:
        return camera_modes(value)

    @model_validator(mode="after")
    def _guarantee_reachable(self) -> "Calibrate":
        # No finite val set guarantees that every new person raises the alarm.
        if self.person_recall_target >= 1 and self.guarantee != "none":
            raise ParamError(f"params.yaml: calibrate.guarantee={self.guarantee!r} cannot "
                             "promise calibrate.person_recall_target=1 on new pictures (no "
                             "number of val persons does); set a target below 1 or "
                             "calibrate.guarantee: none")
        return self


class Evaluate(Section):
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    speed_runs: int = Field(ge=1, le=MAX_SPEED_RUNS)
    device: Literal["auto", "cpu", "cuda", "mps"]
    mistakes: int = Field(ge=1, le=MAX_MISTAKES)


# The camera conditions stages.conditions measures the alarm under (docs/conditions.md defines
# each); stages/common/pictures/corrupt.py implements exactly these (tests/test_conditions.py).
CONDITIONS = ("night", "infrared", "motion_blur", "defocus", "fog", "rain", "snow", "jpeg",
              "low_resolution", "glare")
SEVERITIES = (1, 2, 3, 4, 5)


class Conditions(Section):
    # condition -> severities (1-5) measured, each on every test crop
    measure: dict[str, list[int]] = Field(json_schema_extra=_expect(
        "a non-empty mapping of condition -> non-empty list of severities 1-5"))
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    device: Literal["auto", "cpu", "cuda", "mps"]

    @field_validator("measure", mode="before")
    @classmethod
    def _measure(cls, value: Any) -> dict[str, list[int]]:
        if not isinstance(value, dict) or not value:
            raise ParamError(f"params.yaml: conditions.measure={value!r} is not allowed; "
                             "expected a non-empty mapping of condition -> severities, e.g. "
                             "night: [1, 2, 3, 4, 5]")
        for name, severities in value.items():
            if name not in CONDITIONS:
                raise ParamError(f"params.yaml: conditions.measure.{name} is not a condition; "
                                 f"expected one of {', '.join(CONDITIONS)}")
            if not (isinstance(severities, list) and severities
                    and all(type(s) is int and s in SEVERITIES for s in severities)
                    and len(set(severities)) == len(severities)):
                raise ParamError(f"params.yaml: conditions.measure.{name}={severities!r} is not "
                                 "allowed; expected a non-empty list of distinct severities "
                                 "from 1 to 5")
        return {name: sorted(value[name]) for name in value}


class Accept(Section):
    # Site sets: ImageFolder-style folders (<class>/<pictures>) that stages.accept measures the
    # alarm on, each with its verdict (docs/acceptance.md); [] measures none
    folders: list[str] = Field(json_schema_extra=_expect(
        "a list of distinct folder paths (possibly empty)"))
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    device: Literal["auto", "cpu", "cuda", "mps"]

    @field_validator("folders", mode="before")
    @classmethod
    def _folders(cls, value: Any) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(f, str) and f.strip()
                                                  for f in value):
            raise ParamError(f"params.yaml: accept.folders={value!r} is not allowed; expected a "
                             "list of folder paths, e.g. [sites/north-gate], or [] for none")
        seen: dict[str, str] = {}
        for folder in value:
            first = seen.setdefault(os.path.normpath(folder), folder)
            if first is not folder:
                raise ParamError(f"params.yaml: accept.folders lists {folder!r} twice (as "
                                 f"{first!r} too); list each site set once")
        return value


class Export(Section):
    opset: int = Field(ge=17, le=23)
    batch_size: int = Field(ge=1, le=MAX_BATCH)
    speed_runs: int = Field(ge=1, le=MAX_SPEED_RUNS)
    parity_atol: float = Field(gt=0)
    # stages.common.config.formats.FORMATS: every other format is converted from the fp32 ONNX
    formats: list[str] = Field(json_schema_extra=_expect(
        f"a list of distinct formats from {', '.join(FORMATS)}, holding {ONNX_FP32}"))
    calibration_min_crops: int = Field(ge=1, le=MAX_BATCH * 100)
    max_persons_lost: int = Field(ge=0)
    refit_threshold: bool

    @field_validator("formats", mode="before")
    @classmethod
    def _formats(cls, value: Any) -> list[str]:
        expected = (f"expected a list of distinct formats from {', '.join(FORMATS)}, holding "
                    f"{ONNX_FP32} (every other one is converted from it)")
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)
                and len(set(value)) == len(value)):
            raise ParamError(f"params.yaml: export.formats={value!r} is not allowed; {expected}")
        unknown = [v for v in value if v not in FORMATS]
        if unknown:
            raise ParamError(f"params.yaml: export.formats: {', '.join(map(repr, unknown))} is "
                             f"not a format; {expected}")
        if ONNX_FP32 not in value:
            raise ParamError(f"params.yaml: export.formats={value!r} lacks {ONNX_FP32}; "
                             f"{expected}")
        return value


class Params(Section):
    seed: int = Field(ge=0, le=MAX_SEED)
    data: Data
    crops: Crops
    split: Split
    model: Model
    train: Train
    calibrate: Calibrate
    evaluate: Evaluate
    conditions: Conditions
    accept: Accept
    export: Export


# ----- reading ---------------------------------------------------------------------------------

# Bounds on the YAML itself, checked while it is read: params.yaml holds a few hundred values a
# few levels deep. An alias repeats the whole value it names, so 6 KB of aliases of aliases
# stand for 10^9 values (a "billion laughs" file) and every reader of them would run for ever;
# deep nesting ends in a RecursionError in PyYAML's composer.
MAX_YAML_VALUES = 100_000  # values, each alias counted as every value it repeats
MAX_YAML_DEPTH = 64  # lists and mappings inside one another


def load(path: str | Path = PARAMS_FILE) -> Params:
    """The params file as a checked :class:`Params`; the first bad key stops with one line.
    Reads only: what killed runs left is removed by each stage's start, before it calls this."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: not found; run from the repository root (where dvc.yaml is)")
    try:
        raw = _load_yaml(_utf8_text(path), path)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ParamError(f"{path}: not valid YAML{line}; fix the file's syntax") from None
    return parse(raw if raw is not None else {})


def parse(raw: Any) -> Params:
    """A params mapping (as read from YAML) checked into :class:`Params`."""
    if not isinstance(raw, dict):
        raise ParamError(f"params.yaml: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamError(_first_error(exc, raw)) from None


def _utf8_text(path: Path) -> str:
    """The file's text; YAML files are UTF-8, and DVC reads them so."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ParamError(f"{path}: not UTF-8 (byte 0x{data[exc.start]:02x} at line {line}); "
                         "save the file as UTF-8") from None


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses nesting deeper than MAX_YAML_DEPTH before it recurses
    further (each level is a few Python frames)."""

    def __init__(self, text: str, path: Path):
        super().__init__(text)
        self.path, self.depth = path, 0

    def compose_node(self, parent, index):
        self.depth += 1
        try:
            if self.depth > MAX_YAML_DEPTH:
                raise ParamError(_too_deep(self.path, self.peek_event().start_mark))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


def _load_yaml(text: str, path: Path) -> Any:
    """The file's values as DVC reads them, once its shape is within the bounds above and no
    key is given twice in one mapping (PyYAML keeps the last value silently, while DVC refuses
    the file).

    PyYAML checks the shape (its nodes, before anything is built); the values are built by
    ruamel.yaml exactly as DVC builds them (``YAML(typ="safe")``, YAML 1.2; tests/test_readers.py
    holds the two equal through dvc_internals). PyYAML's own values follow YAML 1.1, where
    ``seed: 052`` is the octal 42 and ``seed: 1:10`` the base-60 70 while DVC records 52 and
    '1:10', and ``1e-3`` is a string while DVC reads 0.001: a stage would run with other values
    than the ones DVC tracks."""
    loader = _BoundedLoader(text, path)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _measure(node, path, 1, {})
    finally:
        loader.dispose()
    from ruamel.yaml import YAML
    from ruamel.yaml import YAMLError as RuamelError

    try:
        return YAML(typ="safe").load(text)
    except RuamelError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ParamError(f"{path}: DVC cannot read it{line} ({problem}); fix it") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date 2026-13-45
        raise ParamError(f"{path}: a value YAML cannot read ({exc}); fix it") from None


def _measure(node: yaml.Node, path: Path, depth: int, seen: dict[int, tuple[int, int] | None],
             prefix: str = "") -> tuple[int, int]:
    """(values, height) of ``node`` with every alias expanded, refusing a key given twice, an
    alias inside the value it names, and the bounds. An alias is the very node it names, so each
    node is measured once (``seen``, by identity) however often it is repeated: linear time."""
    if depth > MAX_YAML_DEPTH:
        raise ParamError(_too_deep(path, node.start_mark))
    if id(node) in seen:
        known = seen[id(node)]
        if known is None:  # still being measured: the node holds an alias of itself
            raise ParamError(f"{path}: the value anchored at line {node.start_mark.line + 1} "
                             "holds an alias of itself, an endless value; write the values out")
        if depth + known[1] - 1 > MAX_YAML_DEPTH:
            raise ParamError(_too_deep(path, node.start_mark))
        return known
    seen[id(node)] = None
    values, height = 1, 1
    for child, name in _children(node, path, prefix):
        count, below = _measure(child, path, depth + 1, seen, name)
        values, height = values + count, max(height, below + 1)
        if values > MAX_YAML_VALUES:
            raise ParamError(f"{path}: its aliases expand to more than {MAX_YAML_VALUES:,} "
                             "values (a 'billion laughs' file?); a params file holds a few "
                             "hundred: write the values out")
    seen[id(node)] = (values, height)
    return values, height


def _children(node: yaml.Node, path: Path, prefix: str) -> list[tuple[yaml.Node, str]]:
    """The nodes inside ``node``, each with the dotted name of its key; a key given twice in
    one mapping is refused here, naming both lines."""
    if isinstance(node, yaml.SequenceNode):
        return [(item, prefix) for item in node.value]
    if not isinstance(node, yaml.MappingNode):
        return []
    first_line: dict[str, int] = {}
    out = []
    for key, value in node.value:
        name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
        line = key.start_mark.line + 1
        if name in first_line:
            raise ParamError(f"{path}: key '{prefix}{name}' is given twice (lines "
                             f"{first_line[name]} and {line}); keep one (DVC refuses such "
                             "a file)")
        first_line[name] = line
        out += [(key, prefix), (value, f"{prefix}{name}.")]
    return out


def _too_deep(path: Path, mark) -> str:
    return (f"{path}: lists and mappings nested more than {MAX_YAML_DEPTH} deep (line "
            f"{mark.line + 1}); a params file needs a few levels: fix the nesting")


# ----- one line per error ----------------------------------------------------------------------

def _first_error(exc: ValidationError, raw: dict) -> str:
    """The message of the error a reader should fix first: an unknown key before a bad value
    (a misspelt key also shows up as the right one missing)."""
    errors = exc.errors()
    error = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
    dotted = ".".join(loc)
    cause = (error.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):  # a rule of our own said it in full
        return str(cause)
    owner, field = _field_of(loc)
    if error["type"] == "extra_forbidden":
        where = f"under '{'.'.join(loc[:-1])}'" if len(loc) > 1 else "at the top level"
        return (f"params.yaml: unknown key '{dotted}'; keys allowed {where}: "
                + ", ".join(sorted(owner.model_fields)))
    if error["type"] == "missing":
        return f"params.yaml: missing key '{dotted}'"
    value = _value_at(raw, loc)
    if field is not None and isinstance(field.annotation, type) \
            and issubclass(field.annotation, Section):
        return (f"params.yaml: {dotted}={value!r} is not allowed; expected a section with keys "
                + ", ".join(field.annotation.model_fields))
    return f"params.yaml: {dotted}={value!r} is not allowed; expected {_expected(field)}"


def _field_of(loc: list[str]):
    """(the model that holds the key at ``loc``, its FieldInfo or None when unknown)."""
    owner: type[BaseModel] = Params
    field = None
    for i, part in enumerate(loc):
        field = owner.model_fields.get(part)
        if field is None:
            return owner, None
        nested = field.annotation
        if i < len(loc) - 1 and isinstance(nested, type) and issubclass(nested, BaseModel):
            owner = nested
        elif i < len(loc) - 1:  # below a leaf: an item of a list or a map
            return owner, field
    return owner, field


def _value_at(raw: Any, loc: list[str]) -> Any:
    for part in loc:
        if not isinstance(raw, dict) or part not in raw:
            return None
        raw = raw[part]
    return raw


def _expected(field) -> str:
    """What a field accepts, in the words of the old checks: 'an integer >= 1 and <= 256'."""
    extra = field.json_schema_extra if field is not None else None
    if isinstance(extra, dict) and "expected" in extra:
        return str(extra["expected"])
    annotation = field.annotation
    if annotation is bool:
        return "true or false"
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(map(str, get_args(annotation)))
    kind = "an integer" if annotation is int else "a number"
    bounds = []
    for rule in field.metadata:
        for name, sign in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
            if isinstance(rule, getattr(annotated_types, name.capitalize())):
                bounds.append(f"{sign} {getattr(rule, name)}")
    return f"{kind} {' and '.join(bounds)}".strip()
