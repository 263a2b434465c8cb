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
    (stages.common.inference.speed, as evaluate measures).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import yaml

from stages.common.alarm.calibration import embedded, operating_point_for
from stages.common.alarm.statement import (ASSUMPTION, InconsistentFigures, statement,
                                           threshold_text)
from stages.common.config import params
from stages.common.config.paths import (CHECKPOINT, CONDITIONS_METRICS, EVAL_METRICS,
                                        EXPORT_DIR, EXPORT_METRICS, EXPORT_SPEED, MODEL_DIR,
                                        MODEL_TABLE, OPERATING_POINT, SPLIT_METRICS,
                                        TEST_SPLIT, VAL_SPLIT)
from stages.common.inference.batches import normalise
from stages.common.inference.logits import checked_crops
from stages.common.inference.speed import speed_figures
from stages.common.infra.atomic import atomic_dir, write_json
from stages.common.infra.errors import StageError, main_guard
from stages.common.infra.jsonfile import JsonProblem, read_json
from stages.common.model.build import load_checkpoint
from stages.common.model.checkpoint import ModelMeta, check_logits
from stages.common.model.onnx import export
from stages.common.serving.classifiers import DEFAULT_THREADS, OnnxClassifier, TorchClassifier

ONNX_FILE = "model.onnx"
TABLE_FORMAT = "onnx_fp32"  # benchmarks/model_table.py's name for the file this stage writes
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
    "train.amp", "train.compile",
)
PARAMS = CARD_PARAMS + ("export",)


def test_arrays(meta: ModelMeta) -> np.ndarray:
    """Every test crop, normalised as evaluate sees it: N x 3 x S x S float32."""
    crops = checked_crops(TEST_SPLIT, meta, CHECKPOINT, torch.device("cpu"))
    return normalise(crops.pixels, meta.mean, meta.std).contiguous().numpy()


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


def evaluated(scores: dict, point: dict) -> dict:
    """eval.json's figures, once they are of ``point`` (the operating point export embeds):
    a card must never describe another alarm than the one the model file carries."""
    seen = (scores.get("operating_point") or {}).get("point_sha256")
    if seen != point["point_sha256"]:
        raise StageError(f"{EVAL_METRICS} evaluated another operating point (point_sha256 "
                         f"{str(seen)[:12]}) than {OPERATING_POINT} ({point['point_sha256'][:12]})"
                         "; run `dvc repro evaluate` before export")
    alarm_section(scores)  # figures the card could not state stop here, not after the export
    return scores


def measured(conditions: dict, point: dict) -> dict:
    """conditions.json's figures, once they are of ``point``, as :func:`evaluated`."""
    seen = conditions.get("point_sha256")
    if seen != point["point_sha256"]:
        raise StageError(f"{CONDITIONS_METRICS} measured another operating point (point_sha256 "
                         f"{str(seen)[:12]}) than {OPERATING_POINT} ({point['point_sha256'][:12]})"
                         "; run `dvc repro conditions` before export")
    return conditions


def with_point(scores: dict, point: dict) -> dict:
    """``scores`` whose alarm settings are those of ``point``, the copy read back from the ONNX
    file: the card states the threshold and temperature the model answers with."""
    op = {**scores["operating_point"], "threshold": point["threshold"],
          "threshold_log_odds": point["threshold_log_odds"],
          "target_recall": point["target_recall"], "fitted_on": point.get("fitted_on")}
    cal = scores.get("calibration")  # without it the card says "not calibrated"
    cal = cal and {**cal, "temperature": round(point["temperature"], 4)}
    return {**scores, "operating_point": op, "calibration": cal}


def table_row(meta: ModelMeta, point: dict, table: Path = MODEL_TABLE) -> dict | None:
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
        ours = row.get("recall") and row.get("point_sha256") == point["point_sha256"]
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
              f", {row['batch1_ms_per_image_loaded']} ms with every core decoding video")
    recall = ("not measured through this model (the row is another training's: speed only)"
              if row["person_recall_lower_95"] is None else
              f"person-recall lower bound {row['person_recall_lower_95']} through that file")
    threads = ("the runtime's default threads" if row["threads"] is None else
               f"{row['threads']} thread{'s' if row['threads'] > 1 else ''}")
    return (f"In `{MODEL_TABLE}` ({row['machine']}, {row['date']}; {row['format']}, "
            f"{threads}, as predict runs it): "
            f"batch 1 {row['batch1_ms_per_image']} ms/image quiet{loaded}; peak memory "
            f"{row['peak_rss_mb']} MB; {recall}.")


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
               row: dict | None = None) -> str:
    """data/export/MODEL_CARD.md: what a reviewer reads before the model is deployed.
    ``export_figures``: metrics/export.json's; ``speed``: metrics/speed/export.json's."""
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

{conditions_section(conditions or {})}
## Speed (CPU, {speed['threads']} threads, this run's machine)
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
    everything = params.load()
    cfg = everything.export
    model, meta = load_checkpoint(CHECKPOINT)
    point = operating_point_for(CHECKPOINT, OPERATING_POINT)  # predict answers with it
    # The metrics the card needs, checked before the minutes of timing and export, not after.
    scores = evaluated(read_metrics(EVAL_METRICS), point)
    split = read_metrics(SPLIT_METRICS)
    conditions = measured(read_metrics(CONDITIONS_METRICS), point)
    row = table_row(meta, point)
    images = test_arrays(meta)

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
    del eager

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
        figures = {"arch": meta.arch, "opset": cfg.opset, "onnx_mb": size_mb,
                   "parity": check, "model_table": row}
        (tmp / CARD_FILE).write_text(model_card(
            everything, meta, with_point(scores, onnx.operating_point),
            split, data_hashes(), figures, speed, conditions, row))

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


if __name__ == "__main__":
    main()
