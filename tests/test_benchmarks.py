"""The benchmark scripts that BENCHMARKS.md tells a reader to run, run at a tiny size so they
cannot break unnoticed. Their figures are measurements of the machine: printed, never asserted."""
from __future__ import annotations

import re

from benchmarks import bench_inference


def test_bench_inference_runs_every_runtime_through_the_stages_checks(capsys):
    """BENCHMARKS.md section 4's command, at 32 px and one timed pass: the checkpoint and the
    ONNX file pass the metadata checks evaluate, export and predict apply (an arch name they
    refuse crashed it), and the three runtimes agree (the script asserts it)."""
    bench_inference.main(["--device", "cpu", "--archs", "resnet18", "--size", "32",
                          "--runs", "1"])
    out = capsys.readouterr().out
    for runtime in ("eager NCHW", "eager channels_last", "ONNX Runtime"):
        assert re.search(rf"resnet18\s+{runtime}\s+batch 1:\s+\d+\.\d+ ms/image .*"
                         rf"batch 32:\s+\d+\.\d+ images/s", out), (runtime, out)
