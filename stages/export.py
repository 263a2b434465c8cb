"""Stage `export`: the best checkpoint as ONNX (dynamic batch), checked and timed against PyTorch.

Writes data/export/model.onnx (with the class names, size and normalisation in its metadata, so
`python -m stages.predict --model data/export/model.onnx` needs nothing else),
data/export/MODEL_CARD.md (what the model is for and not for, the data it came from with the
dvc.lock hashes, the recipe, the test figures, the speed, how to rebuild it),
metrics/export.json (size, parity) and metrics/speed/export.json (the timings, apart from the
scores because they swing with the machine's load). The model file carries calibrate's sealed
operating point; the card's alarm figures are metrics/eval.json's only when evaluate scored that
very point (its ``point_sha256``), as are its camera conditions metrics/conditions.json's (stage
conditions), and its threshold and temperature are read back from the model file:
  * parity on the test crops: max absolute logit difference and top-1 agreement between ONNX
    Runtime and PyTorch; the stage fails when the difference exceeds ``export.parity_atol``;
  * speed on the CPU, both runtimes on the same threads and the same inputs: ms per image at
    batch 1 and images/s at ``export.batch_size``, medians with their quartiles
    (stages.common.inference.speed, as evaluate measures);
  * every format of ``export.formats`` (stages.common.model.formats: ONNX int8, OpenVINO IR
    fp16 / int8, converted from the fp32 file, quantized on the calibration crops, never test's)
    re-certified on the test crops at the operating point it carries (:func:`certify`): top-1
    and alarm agreement with PyTorch, the test persons PyTorch's alarm catches and its misses,
    person recall with its 95 % lower bound, false alarms per 1,000 with the upper bound. One
    that misses more than ``export.max_persons_lost`` such persons is not written (one line
    says why), unless ``export.refit_threshold`` gives it its own threshold, fitted on the
    calibration crops with its own logits and sealed for its digest, and it then passes. With
    camera modes (calibrate.modes) each file is certified under each mode as well, on the test
    crops as the mode sees them at the mode's threshold (:class:`ModeCrops`); a format that
    loses too many persons under one is not written, and the fp32 file must keep its parity
    there. The figures go to metrics/export.json ``formats``, and to the card when there is a
    format beyond ``onnx`` (with ``[onnx]`` the card is as before).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import yaml

from stages.common.alarm.calibration import (alarm_figures, crop_pictures, person_log_odds,
                                             person_threshold, probability,
                                             threshold_order)
from stages.common.alarm.guarantee import alarm_bounds, assurance, persons_needed
from stages.common.alarm.point import OperatingPoint, embedded, operating_point_for, seal
from stages.common.alarm.statement import (ASSUMPTION, InconsistentFigures, statement,
                                           threshold_text)
from stages.common.config import params
from stages.common.config.labels import ALARM_LABEL
from stages.common.config.paths import (CALIBRATION_SPLIT, CHECKPOINT, CONDITIONS_METRICS,
                                        EVAL_METRICS, EXPORT_DIR, EXPORT_METRICS, EXPORT_SPEED,
                                        MODEL_DIR, MODEL_TABLE, OPERATING_POINT, SPLIT_MANIFEST,
                                        SPLIT_METRICS,
                                        TEST_SPLIT, VAL_SPLIT)
from stages.common.inference.batches import normalise
from stages.common.inference.corrupted import (crop_keys, host_pixels, mode_labels,
                                               under_mode)
from stages.common.inference.logits import checked_crops
from stages.common.inference.speed import speed_figures
from stages.common.infra.atomic import atomic_dir, clean_dead_leftovers, write_json
from stages.common.infra.errors import StageError, main_guard
from stages.common.infra.jsonfile import JsonProblem, read_json
from stages.common.model.build import load_checkpoint
from stages.common.model.checkpoint import ModelMeta, check_logits
from stages.common.model.formats import FORMATS, ONNX_FP32, build, reseal
from stages.common.model.onnx import export
from stages.common.serving.classifiers import (DEFAULT_THREADS, OnnxClassifier, TorchClassifier,
                                               load_classifier)

ONNX_FILE = FORMATS[ONNX_FP32].file
TABLE_FORMAT = ONNX_FP32  # benchmarks/model_table.py's row of the file this stage always writes
CARD_FILE = "MODEL_CARD.md"
LOCK_FILE = Path("dvc.lock")
DATA_STAGES = ("download", "extract_crops", "split")
# The params that define the model and its data: every param download, extract_crops, split and
# train depend on, and nothing else (not worker counts: params.NO_OUTPUT). The model card states
# them, so they and export's own section are this stage's DVC params, exactly:
# tests/test_layout.py checks dvc.yaml against PARAMS.
CARD_PARAMS = (
    "seed",
    "data.source", "data.mirror", "data.labels", "data.sample",
    "data.zoo.splits", "data.zoo.max_samples", "data.zoo.shuffle",
    "crops.size", "crops.min_box_px", "crops.skip_group_of", "crops.skip_depiction",
    "crops.dedup_iou", "crops.reduced_decode", "crops.max_image_pixels",
    "split",
    "model",
    "train.epochs", "train.batch_size", "train.lr", "train.t_max_ratio", "train.weight_decay",
    "train.focal_alpha", "train.focal_gamma", "train.patience", "train.device", "train.nproc",
    "train.amp", "train.compile", "train.augment", "train.augment_conditions",
)
PARAMS = CARD_PARAMS + ("export",)


def test_arrays(meta: ModelMeta) -> np.ndarray:
    """Every test crop, normalised as evaluate sees it: N x 3 x S x S float32."""
    return labelled_arrays(TEST_SPLIT, meta)[0]


def labelled_arrays(folder: Path, meta: ModelMeta) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A labelled split's crops normalised as evaluate sees them (N x 3 x S x S float32), their
    labels, and each crop's source picture (the alarm's bounds count pictures)."""
    crops = checked_crops(folder, meta, CHECKPOINT, torch.device("cpu"))
    pictures, _ = crop_pictures(crops.paths, SPLIT_MANIFEST)
    return (normalise(crops.pixels, meta.mean, meta.std).contiguous().numpy(),
            crops.targets.numpy(), pictures)


def calibration_source(cfg: params.Params) -> Path:
    """Where quantization and a refitted threshold take their crops: calibrate's split (the
    calibration split, or val without one), never test."""
    return CALIBRATION_SPLIT if cfg.split.calibration > 0 else VAL_SPLIT


def calibration_set(cfg: params.Params, meta: ModelMeta):
    """The calibration crops a quantized format needs, once there are
    ``export.calibration_min_crops`` of them; None when no format asks for any. Checked before
    any export or timing: too few is one line."""
    if not any(FORMATS[name].calibrated for name in cfg.export.formats) \
            and not cfg.export.refit_threshold:
        return None
    source = calibration_source(cfg)
    arrays, targets, pictures = labelled_arrays(source, meta)
    need = cfg.export.calibration_min_crops
    if len(arrays) < need:
        raise StageError(f"{source} holds {len(arrays)} crops, fewer than "
                         f"export.calibration_min_crops {need} that quantization needs to "
                         f"see the range of each activation; raise split.calibration (or "
                         f"split.val), or leave the int8 formats out of export.formats")
    return arrays, targets, pictures


def certify(reference: np.ndarray, logits: np.ndarray, pipeline_point: OperatingPoint,
            point: OperatingPoint, targets: np.ndarray, pictures: list[str], person: int
            ) -> dict:
    """An artifact's answers on the test crops against PyTorch's (``reference``), each alarm at
    its own point (``pipeline_point``: calibrate's; ``point``: the one the artifact carries):
    top-1 and alarm agreement (share of crops with the same yes / no), the test persons
    PyTorch's alarm catches and the artifact's misses (``persons_lost``), and the artifact's
    alarm figures with their one-sided 95 % bounds (stages.common.alarm.guarantee, as evaluate
    states them)."""
    ours = person_log_odds(logits, point.temperature, person)
    theirs = person_log_odds(reference, pipeline_point.temperature, person)
    alarm, reference_alarm = (ours >= point.threshold_log_odds,
                              theirs >= pipeline_point.threshold_log_odds)
    is_person = targets == person
    figures = alarm_figures(ours, is_person, point.threshold_log_odds, pictures)
    bounds = alarm_bounds(figures, point.target_recall)
    return {**parity(reference, logits),
            "alarm_agreement": round(float((alarm == reference_alarm).mean()), 4),
            "persons_lost": int((is_person & reference_alarm & ~alarm).sum()),
            "persons": figures["persons"], "persons_missed": figures["persons_missed"],
            "person_recall": figures["person_recall"],
            "person_recall_lower_95": bounds["person_recall_lower_95"],
            "false_alarms_per_1000": figures["false_alarms_per_1000"],
            "false_alarms_per_1000_upper_95": bounds["false_alarms_per_1000_upper_95"],
            "threshold": point.threshold, "threshold_log_odds": point.threshold_log_odds,
            "temperature": round(point.temperature, 4)}


# ----- camera modes: each file's alarm re-certified under each mode it carries ---------------

Logits = Callable[[np.ndarray], np.ndarray]  # normalised float32 N x 3 x S x S -> logits


@dataclasses.dataclass(frozen=True)
class ModeCrops:
    """The test crops as each camera mode of the operating point (calibrate.modes) sees them,
    corrupted as calibrate corrupts the calibration crops for that mode (every condition x
    severity of the mode, seeded per crop, stages.common.pictures.corrupt; none: the clean
    crops), with PyTorch's logits on them (``reference``, by mode name). Only the clean uint8
    pixels are kept: a file's answers are computed a batch at a time, so memory follows the
    batch, not crops x conditions x severities."""
    pixels: np.ndarray  # uint8 N x S x S x 3, the clean test crops
    keys: list[str]  # crop_keys: each crop's corruptions' seed, on any machine
    seed: int
    meta: ModelMeta
    targets: np.ndarray
    pictures: list[str]
    reference: dict[str, np.ndarray]

    def logits(self, mode, logits_of: Logits, batch_size: int = 64) -> np.ndarray:
        """``logits_of`` on every crop as ``mode`` sees it (under_mode: calibrate's order)."""
        def classify(pixels: np.ndarray) -> np.ndarray:
            batch = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)
            return logits_of(normalise(batch, self.meta.mean, self.meta.std).contiguous()
                             .numpy())
        return under_mode(mode, self.pixels, self.keys, self.seed, classify, batch_size,
                          threads=1)

    def labels(self, mode) -> tuple[np.ndarray, list[str]]:
        """Each crop's label and source picture in :meth:`logits`' order (mode_labels)."""
        return mode_labels(mode, self.targets, self.pictures)


def mode_crops(point: OperatingPoint, meta: ModelMeta, seed: int, reference_of: Logits
               ) -> ModeCrops | None:
    """The test crops under each camera mode of ``point`` with ``reference_of``'s (PyTorch's)
    answers; None when the point has no modes (the default: nothing computed)."""
    if not point.modes:
        return None
    crops = checked_crops(TEST_SPLIT, meta, CHECKPOINT, torch.device("cpu"), keep="host")
    pictures, _ = crop_pictures(crops.paths, SPLIT_MANIFEST)
    seen = ModeCrops(host_pixels(crops), crop_keys(crops.paths), seed, meta,
                     crops.targets.numpy(), pictures, {})
    for mode in point.modes:
        seen.reference[mode.name] = seen.logits(mode, reference_of)
    return seen


def certify_modes(crops: ModeCrops, logits_of: Logits, pipeline_point: OperatingPoint,
                  point: OperatingPoint, person: int) -> dict[str, dict]:
    """:func:`certify` under each camera mode ``point`` (the file's) carries, each alarm at its
    own point's threshold for that mode, on the test crops as the mode sees them."""
    out = {}
    for mode in point.modes:
        targets, pictures = crops.labels(mode)
        out[mode.name] = certify(crops.reference[mode.name], crops.logits(mode, logits_of),
                                 pipeline_point.at_mode(mode.name), point.at_mode(mode.name),
                                 targets, pictures, person)
    return out


def mode_parity(figures: dict[str, dict], atol: float) -> dict[str, dict]:
    """The fp32 file's figures under each camera mode, once its logits there are PyTorch's
    within ``atol`` (the clean crops' parity check, on the crops as each mode sees them)."""
    for name, f in figures.items():
        if f["max_abs_logit_diff"] > atol:
            raise StageError(f"ONNX parity failed under camera mode {name!r}: max abs logit "
                             f"difference {f['max_abs_logit_diff']} > export.parity_atol "
                             f"{atol} on {f['test_crops']} test crops as the mode sees them; "
                             "try another export.opset or report the arch")
    return figures


def refitted_point(point: OperatingPoint, logits: np.ndarray, targets: np.ndarray,
                   pictures: list[str], person: int, name: str, source: Path
                   ) -> OperatingPoint:
    """``point`` with its threshold chosen again by its own rule, target and delta
    (calibration.person_threshold, as calibrate chooses it) on the artifact's own logits of the
    calibration crops; the temperature kept. Sealed: the artifact embeds it for its digest."""
    rule, target = point.guarantee or "none", point.target_recall
    delta = 0.05 if point.delta is None else point.delta
    scores = person_log_odds(logits, point.temperature, person)
    is_person = targets == person
    threshold = person_threshold(scores, is_person, target, rule, delta, pictures)
    _, k, resolved = threshold_order(scores, is_person, target, rule, delta, pictures)
    figures = alarm_figures(scores, is_person, threshold, pictures)
    val = {"crops": int(len(targets)), **figures, **alarm_bounds(figures, target),
           **assurance(figures["person_pictures"], k, target),
           "persons_needed": persons_needed(rule, target, delta), "resolved": resolved}
    # the artifact embeds it under its own digest (formats.reseal, embedded)
    return OperatingPoint.parse(seal({**point.content, "threshold": probability(threshold),
                                      "threshold_log_odds": threshold, "val": val,
                                      "fitted_on": str(source), "refitted_for": name}),
                                embedded=True, source=point.source)


def refused_line(name: str, figures: dict, bound: int, refit: bool) -> str:
    lost = figures["persons_lost"]
    if lost > bound:
        why = ("even with its threshold refitted on the calibration crops" if refit else
               "set export.refit_threshold: true to fit it its own threshold")
        return (f"warning: {name} not written: its alarm misses {lost} test "
                f"person{'s' if lost != 1 else ''} that the PyTorch model's catches, more than "
                f"export.max_persons_lost {bound}; {why}, or leave {name} out of "
                "export.formats")
    mode, lost = next((m, f["persons_lost"]) for m, f in figures["modes"].items()
                      if f["persons_lost"] > bound)
    return (f"warning: {name} not written: under camera mode {mode!r} its alarm misses {lost} "
            f"test person{'s' if lost != 1 else ''} (crops as the mode sees them) that the "
            f"PyTorch model's catches at that mode's threshold, more than "
            f"export.max_persons_lost {bound}; export.refit_threshold refits the clean "
            f"threshold only: leave {name} out of export.formats, or {mode} out of "
            "calibrate.modes")


def lost_too_many(figures: dict, bound: int) -> bool:
    """More test persons lost than ``bound``, clean or under any camera mode."""
    return figures["persons_lost"] > bound or any(
        f["persons_lost"] > bound for f in figures.get("modes", {}).values())


def formats_section(formats: dict) -> str:
    """The card's table of the formats beyond the fp32 ONNX file: each re-certified on the test
    crops at the operating point it carries."""
    rows = []
    for name, f in formats.items():
        written = f"`{f['file']}`, {f['mb']} MB" if f["written"] else "**not written**"
        rows.append(f"| {name} | {written} | {f['top1_agreement']} | {f['alarm_agreement']} | "
                    f"{f['persons_lost']} | {f['person_recall']} (>= "
                    f"{f['person_recall_lower_95']}) | {f['false_alarms_per_1000']} (<= "
                    f"{f['false_alarms_per_1000_upper_95']}) | "
                    f"{threshold_text(f['threshold'], f['threshold_log_odds'])} |")
    return f"""## Formats
Each file re-certified on the test crops at the operating point it carries (its threshold; a
refitted one was fitted on the calibration crops with that file's own answers): agreement with
PyTorch (top-1; alarm: share of crops with the same yes / no), test persons PyTorch's alarm
catches and this one misses (more than `export.max_persons_lost`: not written), and its alarm's
figures with their one-sided 95 % bounds. `python -m stages.predict --model <file>` runs each.

| format | file | top-1 agr. | alarm agr. | persons lost | person recall | false alarms / 1,000 \
| threshold |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}
{modes_lost(formats)}"""


def modes_lost(formats: dict) -> str:
    """The card's lines on the formats under the camera modes: test persons lost at each
    mode's threshold, on the crops as the mode sees them; empty without modes."""
    lines = [f"- {name}: " + ", ".join(
                 f"{mode} {m['persons_lost']} of {m['persons']} (recall {m['person_recall']}, "
                 f">= {m['person_recall_lower_95']})" for mode, m in f["modes"].items())
             for name, f in formats.items() if f.get("modes")]
    if not lines:
        return ""
    return ("\nUnder each camera mode (test crops as the mode sees them, each file at the "
            "mode's threshold it carries), test persons PyTorch's alarm catches and the file's "
            "misses, of the mode's persons; more than `export.max_persons_lost` under any mode: "
            "not written.\n\n" + "\n".join(lines) + "\n")


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far the ONNX logits are from PyTorch's, and how often the top class agrees."""
    if reference.shape != candidate.shape:
        raise StageError(f"ONNX logits have shape {candidate.shape}, PyTorch's {reference.shape}; "
                         "the export is broken, file an issue with the arch and opset")
    return {"test_crops": int(len(reference)),
            "max_abs_logit_diff": float(f"{np.abs(reference - candidate).max():.3g}"),
            "top1_agreement": round(float((reference.argmax(1) == candidate.argmax(1)).mean()), 4)}


def in_batches(forward, x: np.ndarray, size: int = 64) -> np.ndarray:
    return np.concatenate([forward(x[i:i + size]) for i in range(0, len(x), size)])


def read_metrics(path: Path) -> dict:
    try:
        scores = read_json(path)
    except (OSError, JsonProblem) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise StageError(f"{path}: cannot read it ({why}); run `dvc repro` (evaluate, "
                         "conditions and split write it)") from None
    if not isinstance(scores, dict):
        raise StageError(f"{path}: not a JSON object; run `dvc repro` (evaluate, conditions "
                         "and split write it)")
    return scores


def evaluated(scores: dict, point: OperatingPoint) -> dict:
    """eval.json's figures, once they are of ``point`` (the operating point export embeds):
    a card must never describe another alarm than the one the model file carries."""
    seen = (scores.get("operating_point") or {}).get("point_sha256")
    if seen != point.point_sha256:
        raise StageError(f"{EVAL_METRICS} evaluated another operating point (point_sha256 "
                         f"{str(seen)[:12]}) than {OPERATING_POINT} ({point.point_sha256[:12]})"
                         "; run `dvc repro evaluate` before export")
    alarm_section(scores)  # figures the card could not state stop here, not after the export
    return scores


def measured(conditions: dict, point: OperatingPoint) -> dict:
    """conditions.json's figures, once they are of ``point``, as :func:`evaluated`."""
    seen = conditions.get("point_sha256")
    if seen != point.point_sha256:
        raise StageError(f"{CONDITIONS_METRICS} measured another operating point (point_sha256 "
                         f"{str(seen)[:12]}) than {OPERATING_POINT} ({point.point_sha256[:12]})"
                         "; run `dvc repro conditions` before export")
    return conditions


def with_point(scores: dict, point: OperatingPoint) -> dict:
    """``scores`` whose alarm settings are those of ``point``, the copy read back from the ONNX
    file: the card states the threshold and temperature the model answers with."""
    op = {**scores["operating_point"], "threshold": point.threshold,
          "threshold_log_odds": point.threshold_log_odds,
          "target_recall": point.target_recall, "fitted_on": point.fitted_on}
    cal = scores.get("calibration")  # without it the card says "not calibrated"
    cal = cal and {**cal, "temperature": round(point.temperature, 4)}
    return {**scores, "operating_point": op, "calibration": cal}


def table_row(meta: ModelMeta, point_sha256: str, table: Path = MODEL_TABLE) -> dict | None:
    """This model's row of the table that picks a model (benchmarks/model_table.py, run by hand
    and committed): its arch, :data:`TABLE_FORMAT`, its crop size, predict's default threads.
    None when the file or the row is absent. The recall lower bound is kept only when the row
    was measured through this very model at this operating point (its ``point_sha256``);
    speed, memory and size do not depend on the weights."""
    try:
        content = read_json(table)
        rows, machine = content["rows"], content["machine"]
    except FileNotFoundError:
        return None
    except (OSError, JsonProblem, KeyError, TypeError) as exc:
        raise StageError(f"{table}: cannot read its rows ({exc}); run `python -m "
                         "benchmarks.model_table` again, or delete the file") from None
    try:
        row = next((r for r in rows if r["arch"] == meta.arch and r["format"] == TABLE_FORMAT
                    and r["size"] == meta.image_size and r["threads"] == DEFAULT_THREADS), None)
        if row is None:
            return None
        ours = row.get("recall") and row.get("point_sha256") == point_sha256
        loaded = row.get("loaded") or {}
        return {"machine": f"{machine['cpu']}, {machine['cores']} cores",
                "date": machine["date"], "format": TABLE_FORMAT, "threads": row["threads"],
                "batch1_ms_per_image": row["quiet"]["batch1_ms_per_image"],
                "batch1_ms_per_image_loaded": loaded.get("batch1_ms_per_image"),
                "batch_size": row["quiet"]["batch_size"],
                "batch_images_per_s": row["quiet"]["batch_images_per_s"],
                "batch_images_per_s_loaded": loaded.get("batch_images_per_s"),
                "peak_rss_mb": row["peak_rss_mb"], "file_mb": row["file_mb"],
                "person_recall_lower_95":
                    row["recall"]["person_recall_lower_95"] if ours else None}
    except (KeyError, TypeError, AttributeError) as exc:
        raise StageError(f"{table}: a row of {meta.arch} lacks {exc}; run `python -m "
                         "benchmarks.model_table` again, or delete the file") from None


def table_section(row: dict | None) -> str:
    """The card's line on the table that picks a model."""
    if row is None:
        return (f"Not in `{MODEL_TABLE}`: `python -m benchmarks.model_table` measures it beside "
                "the other archs and formats, quiet and with the cores decoding video.")
    loaded = ("" if row["batch1_ms_per_image_loaded"] is None else
              f",\n{row['batch1_ms_per_image_loaded']} ms with every core decoding video")
    recall = ("not measured through this model (the row is another training's: speed only)"
              if row["person_recall_lower_95"] is None else
              f"person-recall lower bound {row['person_recall_lower_95']} through that file")
    threads = ("the runtime's default threads" if row["threads"] is None else
               f"{row['threads']} thread{'s' if row['threads'] > 1 else ''}")
    return (f"The table that picks a model, `{MODEL_TABLE}` ({row['machine']}, {row['date']};\n"
            f"{row['format']}, {threads}, one run at a time): batch 1 "
            f"{row['batch1_ms_per_image']} ms/image quiet{loaded};\npeak memory "
            f"{row['peak_rss_mb']} MB;\n{recall}.")


def data_hashes(lock: Path = LOCK_FILE) -> dict[str, str]:
    """The md5 DVC recorded for each output of the data stages (empty outside `dvc repro`)."""
    try:
        stages = yaml.safe_load(lock.read_text())["stages"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return {out["path"]: out.get("md5", "?") for name in DATA_STAGES
            for out in (stages.get(name) or {}).get("outs", [])}


RULE_WORDS = {
    "none": "recall >= the target on the calibration persons themselves (no promise for new "
            "pictures)",
    "average": "recall >= the target on new pictures on average (split-conformal)",
    "probability": "recall >= the target on new pictures with a chance of falling below it of "
                   "at most `calibrate.delta` (Neyman-Pearson order statistic)",
}


def modes_section(point: OperatingPoint | None, tested: dict | None = None) -> str:
    """The camera modes' thresholds (calibrate.modes), each with its calibration figures and,
    with ``tested`` (the fp32 file's :func:`certify_modes`), its figures on the test crops as
    the mode sees them; empty without modes, so such a card is as before modes existed."""
    if point is None or not point.modes:
        return ""
    rows = []
    for mode in point.modes:
        val = mode.val
        seen = (f"{' + '.join(mode.conditions)} at severities "
                f"{', '.join(map(str, mode.severities))}" if mode.conditions else "clean")
        test = (tested or {}).get(mode.name)
        on_test = (f" {test['persons'] - test['persons_missed']} of {test['persons']}, recall "
                   f"{test['person_recall']} (>= {test['person_recall_lower_95']}); "
                   f"{test['false_alarms_per_1000']} (<= {test['false_alarms_per_1000_upper_95']})"
                   f" false alarms / 1,000 |" if test else " not measured |")
        rows.append(f"| {mode.name} | {seen} | "
                    f"{threshold_text(mode.threshold, mode.threshold_log_odds)} | "
                    f"{val['persons'] - val['persons_missed']} of {val['persons']} "
                    f"({val['person_pictures']} pictures) | {val['person_recall_lower_95']} | "
                    f"{val['false_alarms']} of {val['non_persons']} | "
                    f"{'yes' if val['resolved'] else 'no: every person there raises it'} |"
                    + on_test)
    table = "\n".join(rows)
    return f"""
### Camera modes (one threshold each)
`calibrate.modes`: each mode's threshold is fitted by the same rule on the calibration crops as
that mode sees them (its conditions applied to them; its copies of a picture count as that one
picture), so each has its own guarantee; `python -m stages.predict --mode NAME` answers with
one, `--mode auto` with the infrared mode for a grey picture and the clean one for a colour one.
The test figures above are the clean threshold's. Here persons caught, lower bound, false alarms
and resolved are on the calibration crops; the last column is the test crops as the mode sees
them (the same corruptions, seeded per crop) through `model.onnx` at the mode's threshold, with
the one-sided 95 % bounds over test pictures.

| mode | crops | threshold | persons caught | recall lower bound (95 %) | false alarms | resolved \
| on test |
|---|---|---|---|---|---|---|---|
{table}
"""


def alarm_section(scores: dict) -> str:
    """The card's person alarm: the threshold as it can be copied, the rule, and the alarm's
    statement (stages.common.alarm.statement), the same words evaluate and the report use."""
    op, cal = scores.get("operating_point"), scores.get("calibration")
    if not op or not cal:
        return "## Person alarm\nNot calibrated: run `dvc repro` (calibrate, then evaluate)."
    try:
        said = " ".join(statement(op))
    except InconsistentFigures as exc:
        raise StageError(f"{EVAL_METRICS}: its operating point cannot be stated ({exc}); "
                         "run `dvc repro evaluate`") from None
    rule = op.get("guarantee")
    chosen = (f" by `calibrate.guarantee: {rule}`, which aims at {RULE_WORDS[rule]}"
              if rule in RULE_WORDS else "")
    shown = threshold_text(op["threshold"], op["threshold_log_odds"])
    return f"""## Person alarm (operating point)
Scores are calibrated by temperature scaling (T = {cal['temperature']}, fitted on
`{op.get('fitted_on') or VAL_SPLIT}`; test expected calibration error {cal['ece_before']}
before, {cal['ece_after']} after). A crop raises the alarm when its calibrated person probability
is >= **{shown}** (rounded down: copied into `--person-threshold`, it raises the alarm for every
picture this point does), chosen{chosen}, for person recall >= {op['target_recall']}
(`calibrate.person_recall_target`) with the fewest false alarms.

{said}

{ASSUMPTION}

On test: person recall {op['test_person_recall']}, precision {op['test_person_precision']},
{op['false_alarms_per_1000']} false alarms per 1,000 non-person crops. The ONNX file carries
this operating point; `python -m stages.predict` reports `alarm` with it. How the point is chosen
and what each rule promises: docs/stages.md, "The person alarm's operating point"."""


def conditions_section(conditions: dict) -> str:
    """Per camera condition, up to which severity the alarm keeps its target (stage
    conditions: the lower bound of test person recall >= the target at every severity up to
    it)."""
    rows = []
    for name, figures in (conditions.get("conditions") or {}).items():
        measured = sorted(int(k[1:]) for k in figures if k.startswith("s") and k[1:].isdigit())
        if not measured:
            continue
        kept = figures["kept_target_to_severity"]
        worst = figures[f"s{measured[-1]}"]
        said = (f"up to severity {kept}" if kept else f"not at severity {measured[0]}")
        name = f"{name} (trained on)" if figures.get("trained_on") else name
        rows.append(f"| {name} | {said} | {worst['person_recall']} "
                    f"(>= {worst['person_recall_lower_95']}) | {figures['ce']} |")
    if not rows:
        return ""
    clean = conditions["clean"]
    caveat = ""
    if clean.get("target_verdict") == "not shown":
        caveat = (f" The clean test crops do not show the target either ({clean['person_pictures']}"
                  f" pictures with persons; {clean.get('pictures_to_show')} with none missed would"
                  "), so no condition can.")
    elif not clean["target_met"]:
        caveat = " The clean test crops do not meet the target either, so no condition can."
    return f"""## Under camera conditions
The alarm on the test crops under simulated camera conditions, severities 1-5
(`conditions.measure`, after ImageNet-C; docs/conditions.md): up to which severity it keeps its
target {conditions.get('target_recall')}, i.e. the 95 % lower bound of person recall reaches it
(clean: recall {clean['person_recall']}, >= {clean['person_recall_lower_95']}).{caveat} CE:
ImageNet-C's corruption error, mean error over the severities / clean error (None when the clean
error is 0).

| condition | keeps the target | recall at the highest severity | CE |
|---|---|---|---|
{chr(10).join(rows)}
"""


def card_recipe(cfg: params.Params) -> dict:
    """The values of CARD_PARAMS, nested as params.yaml holds them."""
    recipe: dict = {}
    for name in CARD_PARAMS:
        *sections, key = name.split(".")
        node, value = recipe, cfg
        for section in sections:
            node, value = node.setdefault(section, {}), getattr(value, section)
        value = getattr(value, key)
        node[key] = value.model_dump(mode="json") if isinstance(value, params.Section) else value
    return recipe


def model_card(cfg: params.Params, meta: ModelMeta, scores: dict, split: dict, hashes: dict,
               export_figures: dict, speed: dict, conditions: dict | None = None,
               formats: dict | None = None, row: dict | None = None,
               point: OperatingPoint | None = None, mode_tests: dict | None = None) -> str:
    """data/export/MODEL_CARD.md: what a reviewer reads before the model is deployed.
    ``export_figures``: metrics/export.json's; ``speed``: metrics/speed/export.json's;
    ``point``: the one the model file carries (its camera modes, when it has any), and
    ``mode_tests`` the model file's figures under each of them on test."""
    classes = meta.classes
    counts = split.get("crops", {})
    rows = "\n".join(f"| {part} | " + " | ".join(str(counts[part].get(c, 0)) for c in classes)
                     + f" | {counts[part].get('total', 0)} |"
                     for part in ("train", "val", "calibration", "test") if part in counts)
    per_class = "\n".join(
        f"| {c} | {scores['per_class'][c]['precision']:.4f} | {scores['per_class'][c]['recall']:.4f}"
        f" | {scores['per_class'][c]['f1']:.4f} | {scores['per_class'][c]['support']} |"
        for c in classes if c in scores.get("per_class", {}))
    provenance = "\n".join(f"| `{path}` | `{md5}` |" for path, md5 in hashes.items()) \
        or "| (not recorded: run the pipeline with `dvc repro`) | |"
    recipe = card_recipe(cfg)
    e, o = speed["pytorch_eager"], speed["onnxruntime"]
    beyond_onnx = formats_section(formats) + "\n" if formats else ""
    return f"""# Model card: {meta.arch} person / animal / object classifier

## Intended use
Classifies a **crop** of a camera picture (one object, centred, padded to a square as
`python -m stages.predict` does) into one of {len(classes)} labels: {', '.join(classes)}. Built
for perimeter-surveillance operators who must know whether what a camera caught is a person.

## Not for
- Whole frames: it is not a detector and does not find or count objects; give it crops.
- Any label but these {len(classes)}: everything else is forced into one of them.
- Identifying or recognising individuals, or any decision about a person beyond "a person is there".
- Pictures unlike its data (source `{cfg.data.source}`; {meta.image_size} px crops): check its
  figures on your own cameras first.

## Data
Source: `{cfg.data.source}`, seed {cfg.seed}; labels from Open Images classes
({'; '.join(f'{k}: {len(v)} classes' for k, v in cfg.data.labels.items())}, listed under Recipe). Crops per split (a source
picture's crops are all in one split; test was never seen in training; calibration, when there
is one, only fitted the person alarm):

| split | {' | '.join(classes)} | total |
|---|{'---|' * len(classes)}---|
{rows}

Outputs of the data stages as `dvc.lock` recorded them:

| output | md5 |
|---|---|
{provenance}

## Recipe
{meta.arch}, {meta.image_size} px, the params of this run that define the data and the
model (params.yaml; worker counts and the like change no result and are not shown):

```yaml
{yaml.safe_dump(recipe, sort_keys=False).rstrip()}
```

## Test figures ({scores.get('test_crops', '?')} held-out crops)
Accuracy {scores['accuracy']:.4f}, macro F1 {scores['macro_f1']:.4f}, **person recall
{scores['person_recall']:.4f}** (the share of people the model calls person).

| label | precision | recall | F1 | support |
|---|---|---|---|---|
{per_class}

{alarm_section(scores)}
{modes_section(point, mode_tests)}
{conditions_section(conditions or {})}
{beyond_onnx}## Speed (CPU, {speed['threads']} threads, this run's machine)
Batch 1: {o['batch1_ms_per_image']} ms/image in ONNX Runtime, {e['batch1_ms_per_image']} ms in
PyTorch; batch {cfg.export.batch_size}: {o['batch_images_per_s']} images/s in ONNX Runtime.
Medians over {o['batch1_runs']} passes (ONNX Runtime's batch-1 quartiles:
{o['batch1_ms_q1']} to {o['batch1_ms_q3']} ms); they vary with the machine's load. ONNX
parity with PyTorch: max abs logit difference {export_figures['parity']['max_abs_logit_diff']}
on {export_figures['parity']['test_crops']} test crops.

{table_section(row)}

## Rebuild
`git log -S <md5 of {MODEL_DIR} in dvc.lock> -- dvc.lock` finds the commit; then
`git checkout <commit> && dvc repro` (or `dvc pull` from the team's remote for these exact bytes).
Data stages give the same bytes on every machine; training the same bytes on one machine with one
thread count (docs/reproducibility.md).
"""


@main_guard
def main() -> None:
    clean_dead_leftovers()
    everything = params.load()
    cfg = everything.export
    model, meta = load_checkpoint(CHECKPOINT)
    point = operating_point_for(CHECKPOINT, OPERATING_POINT)  # predict answers with it
    # The metrics the card needs, checked before the minutes of timing and export, not after.
    scores = evaluated(read_metrics(EVAL_METRICS), point)
    split = read_metrics(SPLIT_METRICS)
    conditions = measured(read_metrics(CONDITIONS_METRICS), point)
    calibration = calibration_set(everything, meta)  # too few crops: said before any work
    row = table_row(meta, point.point_sha256)
    images, targets, pictures = labelled_arrays(TEST_SPLIT, meta)

    n = cfg.batch_size
    one = images[:1]
    batch = np.resize(images, (n,) + images.shape[1:])  # repeats crops if the set is small
    threads = torch.get_num_threads()  # both runtimes on the same CPU threads
    speed = {"arch": meta.arch, "device": "cpu", "threads": threads}
    # PyTorch first, before ONNX Runtime's thread pool exists, so neither slows the other.
    eager = TorchClassifier(CHECKPOINT)
    reference = in_batches(eager.logits, images)
    check_logits(reference, len(images), len(meta.classes), CHECKPOINT)
    speed["pytorch_eager"] = speed_figures(eager.logits, one, batch, n, cfg.speed_runs)
    modes = mode_crops(point, meta, everything.seed, eager.logits)  # None without modes
    del eager

    person = meta.classes.index(ALARM_LABEL)  # calibrate fitted a point: there is one
    refused = []
    with atomic_dir(EXPORT_DIR) as tmp:
        export(model, meta, tmp / ONNX_FILE, cfg.opset,
               point_for=lambda graph_sha256: embedded(point, graph_sha256))
        onnx = OnnxClassifier(tmp / ONNX_FILE, threads=threads)
        answered = in_batches(onnx.logits, images)
        check_logits(answered, len(images), len(meta.classes), EXPORT_DIR / ONNX_FILE)
        check = parity(reference, answered)
        if check["max_abs_logit_diff"] > cfg.parity_atol:
            raise StageError(f"ONNX parity failed: max abs logit difference "
                             f"{check['max_abs_logit_diff']} > export.parity_atol "
                             f"{cfg.parity_atol} on {check['test_crops']} test crops; "
                             "try another export.opset or report the arch")
        speed["onnxruntime"] = speed_figures(onnx.logits, one, batch, n, cfg.speed_runs)
        speed["onnxruntime_speedup_batch1"] = round(
            speed["pytorch_eager"]["batch1_ms_per_image"]
            / speed["onnxruntime"]["batch1_ms_per_image"], 2)
        size_mb = round((tmp / ONNX_FILE).stat().st_size / 2 ** 20, 1)
        certified = {ONNX_FP32: {"file": ONNX_FILE, "mb": size_mb, "written": True,
                                 "refitted": False,
                                 **certify(reference, answered, point, onnx.operating_point,
                                           targets, pictures, person)}}
        if modes is not None:
            certified[ONNX_FP32]["modes"] = mode_parity(
                certify_modes(modes, onnx.logits, point, onnx.operating_point, person),
                cfg.parity_atol)
        for name in cfg.formats:
            if name != ONNX_FP32:
                certified[name] = other_format(name, tmp, everything, calibration, reference,
                                               images, targets, pictures, point, person,
                                               threads, refused, modes)
        figures = {"arch": meta.arch, "opset": cfg.opset, "onnx_mb": size_mb,
                   "parity": check, "formats": certified, "model_table": row}
        (tmp / CARD_FILE).write_text(model_card(
            everything, meta, with_point(scores, onnx.operating_point),
            split, data_hashes(), figures, speed, conditions,
            certified if len(certified) > 1 else None, row, onnx.operating_point,
            certified[ONNX_FP32].get("modes")))

    write_json(EXPORT_SPEED, speed)
    write_json(EXPORT_METRICS, figures)
    e, o = speed["pytorch_eager"], speed["onnxruntime"]
    print(f"{EXPORT_DIR / ONNX_FILE}: {meta.arch}, {size_mb} MB, opset {cfg.opset}, "
          f"dynamic batch\n"
          f"parity on {check['test_crops']} test crops: max abs logit diff "
          f"{check['max_abs_logit_diff']}, top-1 agreement {check['top1_agreement']}\n"
          f"CPU, {threads} threads    batch 1 ms/image   batch {n} images/s\n"
          f"  PyTorch eager      {e['batch1_ms_per_image']:>14}   {e['batch_images_per_s']:>16}\n"
          f"  ONNX Runtime       {o['batch1_ms_per_image']:>14}   {o['batch_images_per_s']:>16}")
    for name, f in certified.items():
        if name != ONNX_FP32 and f["written"]:
            print(f"{EXPORT_DIR / f['file']}: {f['mb']} MB, test top-1 agreement "
                  f"{f['top1_agreement']}, alarm agreement {f['alarm_agreement']}, "
                  f"{f['persons_lost']} persons lost, recall {f['person_recall']} (>= "
                  f"{f['person_recall_lower_95']})"
                  + (", threshold refitted" if f["refitted"] else "")
                  + "".join(f"; mode {m}: {g['persons_lost']} persons lost"
                            for m, g in f.get("modes", {}).items()))
    for line in refused:
        print(line, file=sys.stderr)


def other_format(name: str, tmp: Path, everything: params.Params, calibration, reference,
                 images, targets, pictures, point: OperatingPoint, person: int, threads: int,
                 refused: list[str], modes: ModeCrops | None = None) -> dict:
    """Build format ``name`` beside the fp32 file in ``tmp``, re-certify it on test (refit its
    threshold if asked and needed) and under each camera mode it carries (``modes``: the test
    crops as each mode sees them), and remove it when it loses more test persons than
    ``export.max_persons_lost``, clean or under a mode, the reason added to ``refused``. Its
    figures."""
    cfg = everything.export
    row = FORMATS[name]
    out = tmp / row.file
    build(name, tmp / ONNX_FILE, out, [calibration[0]] if row.calibrated else (),
          point_for=lambda graph_sha256: embedded(point, graph_sha256))
    classifier = load_classifier(out, threads)

    def answers(x: np.ndarray) -> np.ndarray:
        logits = in_batches(classifier.logits, x)
        check_logits(logits, len(x), len(classifier.meta.classes), EXPORT_DIR / row.file)
        return logits

    logits = answers(images)
    figures = certify(reference, logits, point, classifier.operating_point, targets, pictures,
                      person)
    refit = figures["persons_lost"] > cfg.max_persons_lost and cfg.refit_threshold
    if refit:
        own = refitted_point(classifier.operating_point, answers(calibration[0]),
                             calibration[1], calibration[2], person, name,
                             calibration_source(everything))
        del classifier
        reseal(name, out, lambda graph_sha256: embedded(own, graph_sha256))
        classifier = load_classifier(out, threads)
        figures = certify(reference, answers(images), point, classifier.operating_point,
                          targets, pictures, person)
    if modes is not None:
        figures["modes"] = certify_modes(modes, classifier.logits, point,
                                         classifier.operating_point, person)
    written = not lost_too_many(figures, cfg.max_persons_lost)
    files = row.paths(out)
    mb = round(sum(p.stat().st_size for p in files) / 2 ** 20, 1)
    if not written:
        for path in files:
            path.unlink(missing_ok=True)
        refused.append(refused_line(name, figures, cfg.max_persons_lost, refit))
    return {"file": row.file, "mb": mb if written else None, "written": written,
            "refitted": bool(refit), **figures}


if __name__ == "__main__":
    main()
