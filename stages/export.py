"""Stage `export`: the best checkpoint as ONNX (dynamic batch), checked and timed against PyTorch.

Writes data/export/model.onnx (with the class names, size and normalisation in its metadata, so
`python -m stages.predict --model data/export/model.onnx` needs nothing else) and
metrics/export.json:
  * parity on the test crops: max absolute logit difference and top-1 agreement between ONNX
    Runtime and PyTorch; the stage fails when the difference exceeds ``export.parity_atol``;
  * speed on the CPU, both runtimes on the same threads and the same inputs: ms per image at
    batch 1 and images/s at ``export.batch_size`` (stages.common.speed, as evaluate measures).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stages.common import params
from stages.common.atomic import atomic_dir, write_json
from stages.common.errors import StageError, main_guard
from stages.common.model import check_logits, load_checkpoint
from stages.common.onnx_model import OnnxClassifier, export
from stages.common.batches import normalise
from stages.common.predictor import TorchClassifier, checked_crops
from stages.common.speed import speed_figures

CHECKPOINT = Path("data/model/best.pt")
TEST_DIR = Path("data/split/test")
EXPORT_DIR = Path("data/export")
ONNX_FILE = "model.onnx"
METRICS_FILE = Path("metrics/export.json")


def test_arrays(meta: dict) -> np.ndarray:
    """Every test crop, normalised as evaluate sees it: N x 3 x S x S float32."""
    crops = checked_crops(TEST_DIR, meta, CHECKPOINT, torch.device("cpu"))
    return normalise(crops.pixels, meta["mean"], meta["std"]).contiguous().numpy()


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


@main_guard
def main() -> None:
    cfg = params.load().export
    model, meta = load_checkpoint(CHECKPOINT)
    images = test_arrays(meta)

    n = cfg.batch_size
    one = images[:1]
    batch = np.resize(images, (n,) + images.shape[1:])  # repeats crops if the set is small
    threads = torch.get_num_threads()  # both runtimes on the same CPU threads
    speed = {"device": "cpu", "threads": threads}
    # PyTorch first, before ONNX Runtime's thread pool exists, so neither slows the other.
    eager = TorchClassifier(CHECKPOINT)
    reference = in_batches(eager.logits, images)
    check_logits(reference, len(images), len(meta["classes"]), CHECKPOINT)
    speed["pytorch_eager"] = speed_figures(eager.logits, one, batch, n, cfg.speed_runs)
    del eager

    with atomic_dir(EXPORT_DIR) as tmp:
        export(model, meta, tmp / ONNX_FILE, cfg.opset)
        onnx = OnnxClassifier(tmp / ONNX_FILE, threads=threads)
        answered = in_batches(onnx.logits, images)
        check_logits(answered, len(images), len(meta["classes"]), EXPORT_DIR / ONNX_FILE)
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

    write_json(METRICS_FILE, {"arch": meta["arch"], "opset": cfg.opset, "onnx_mb": size_mb,
                              "parity": check, "speed": speed})
    e, o = speed["pytorch_eager"], speed["onnxruntime"]
    print(f"{EXPORT_DIR / ONNX_FILE}: {meta['arch']}, {size_mb} MB, opset {cfg.opset}, "
          f"dynamic batch\n"
          f"parity on {check['test_crops']} test crops: max abs logit diff "
          f"{check['max_abs_logit_diff']}, top-1 agreement {check['top1_agreement']}\n"
          f"CPU, {threads} threads    batch 1 ms/image   batch {n} images/s\n"
          f"  PyTorch eager      {e['batch1_ms_per_image']:>14}   {e['batch_images_per_s']:>16}\n"
          f"  ONNX Runtime       {o['batch1_ms_per_image']:>14}   {o['batch_images_per_s']:>16}")


if __name__ == "__main__":
    main()
