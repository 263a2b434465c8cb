"""Inference speed: ms per image at batch 1, images/s at batch 32; eager fp32, NCHW vs
channels_last.

    python -m benchmarks.bench_inference --device cpu
    python -m benchmarks.bench_inference --device cuda

Same weights and inputs for both layouts (outputs compared, must agree to 1e-3). Timings are
medians of ``--runs`` calls after warm-up, under torch.inference_mode, model in eval mode.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from stages.common.model import build_model


def median_seconds(model, x: torch.Tensor, runs: int, device: torch.device) -> float:
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@torch.inference_mode()
def measure(arch: str, size: int, runs1: int, runs32: int, device: torch.device) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 3, 0.3, "none").eval().to(device)
    x1, x32 = torch.randn(1, 3, size, size, device=device), torch.randn(32, 3, size, size,
                                                                     device=device)
    result = {}
    for layout in ("nchw", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        model = model.to(memory_format=fmt)
        a, b = x1.to(memory_format=fmt), x32.to(memory_format=fmt)
        result[layout + "_out"] = model(b).float().cpu()
        for _ in range(3):  # warm-up
            model(a), model(b)
        result[layout] = (median_seconds(model, a, runs1, device) * 1000,
                          32 / median_seconds(model, b, runs32, device))
    assert torch.allclose(result["nchw_out"], result["channels_last_out"], atol=1e-3)
    (ms_a, ips_a), (ms_b, ips_b) = result["nchw"], result["channels_last"]
    print(f"  {arch:9s} batch 1: {ms_a:6.1f} -> {ms_b:6.1f} ms/image ({ms_a / ms_b:.2f}x)   "
          f"batch 32: {ips_a:6.1f} -> {ips_b:6.1f} images/s ({ips_b / ips_a:.2f}x)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--runs1", type=int, default=30)
    ap.add_argument("--runs32", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    print(f"{args.size} px, eager fp32, NCHW -> channels_last, device {device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    for arch in args.archs:
        measure(arch, args.size, args.runs1, args.runs32, device)


if __name__ == "__main__":
    main()
