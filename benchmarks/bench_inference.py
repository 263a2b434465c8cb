"""Inference speed: ms per image at batch 1, images/s at batch 32, for resnet18 and resnet50:
PyTorch eager fp32 NCHW, eager channels_last (what evaluate and predict use), and ONNX Runtime
(the runtime of the export stage and `predict --model model.onnx`, CPU only).

    python -m benchmarks.bench_inference --device cpu
    python -m benchmarks.bench_inference --device cuda      # eager only: ORT here is CPU-only

Same weights and inputs for every runtime (outputs compared, must agree to 1e-3). Timings are
medians after warm-up (stages.common.inference.speed, the timer of evaluate and export), models in
eval mode under torch.inference_mode. Untrained weights: speed does not depend on their values.
The model takes the stages' own path: a checkpoint saved as train saves one, loaded as export
loads it, exported and opened as export and predict do, so every metadata check runs here too
(tests/test_benchmarks.py runs this script at a tiny size).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from stages.common.inference.speed import speed_figures
from stages.common.model.build import build_model, load_checkpoint, normalisation
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.model.onnx import export
from stages.common.serving.classifiers import OnnxClassifier

CLASSES = ["animal", "object", "person"]
OPSET = 18  # params.yaml's export.opset
DROPOUT = 0.3


def checkpoint(arch: str, size: int, tmp: Path) -> tuple[torch.nn.Module, ModelMeta]:
    """An untrained ``arch`` saved with the metadata train writes and loaded back as export
    loads it: (model in eval mode, metadata)."""
    torch.manual_seed(0)
    path = tmp / "best.pt"
    mean, std = normalisation(arch)
    save_checkpoint(path, build_model(arch, len(CLASSES), DROPOUT, "none"), ModelMeta(
        arch=arch, classes=CLASSES, image_size=size, mean=mean, std=std, dropout=DROPOUT))
    return load_checkpoint(path)


def runtimes(model, meta: ModelMeta, device: torch.device, tmp: Path):
    """(name, forward(NCHW float tensor) -> logits as ndarray) for each runtime measured."""
    def eager(fmt):
        m = model.to(device, memory_format=fmt)
        return lambda x: m(x.to(device, memory_format=fmt)).float().cpu().numpy()

    yield "eager NCHW", eager(torch.contiguous_format)
    yield "eager channels_last", eager(torch.channels_last)
    if device.type == "cpu":
        path = tmp / "model.onnx"
        export(model.cpu(), meta, path, OPSET)
        ort = OnnxClassifier(path, threads=torch.get_num_threads())
        yield "ONNX Runtime", lambda x: ort.logits(x.numpy())


@torch.inference_mode()
def measure(arch: str, size: int, runs: int, device: torch.device) -> None:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows, reference = [], None
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        model, meta = checkpoint(arch, size, Path(tmp))
        one, batch = torch.randn(1, 3, size, size), torch.randn(32, 3, size, size)
        for name, forward in runtimes(model, meta, device, Path(tmp)):
            out = forward(batch)
            reference = out if reference is None else reference
            assert np.allclose(out, reference, atol=1e-3), f"{name} disagrees with eager NCHW"
            rows.append((name, speed_figures(forward, one, batch, 32, runs, sync)))
    base = rows[0][1]
    for name, fig in rows:
        print(f"  {arch:9s} {name:20s} batch 1: {fig['batch1_ms_per_image']:7.2f} ms/image "
              f"({base['batch1_ms_per_image'] / fig['batch1_ms_per_image']:.2f}x)   batch 32: "
              f"{fig['batch_images_per_s']:7.1f} images/s "
              f"({fig['batch_images_per_s'] / base['batch_images_per_s']:.2f}x)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs", type=int, default=30, help="timed batch-1 passes (batch 32: / 5)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"{args.size} px, fp32, device {device}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}; ratios against eager NCHW")
    for arch in args.archs:
        measure(arch, args.size, args.runs, device)


if __name__ == "__main__":
    main()
