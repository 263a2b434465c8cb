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


def test_bench_formats_builds_loads_and_times_every_format(tmp_path, capsys):
    """BENCHMARKS.md section 9's command on a small constructed net at 32 px, one pass: every
    format is built as export builds it and loaded as predict loads it (digest and metadata
    checks), and each prints its row."""
    from benchmarks import bench_formats
    from stages.common.model.formats import FORMATS
    from stages.common.model.onnx import export
    from tests.test_formats import CLASSES, META, SIZE, small_net
    from tests.tiny_project import write_noise_test_split

    export(small_net(), META, tmp_path / "model.onnx", 18)
    write_noise_test_split(tmp_path, CLASSES, SIZE, per_label=2)
    bench_formats.main(["--model", str(tmp_path / "model.onnx"), "--calibration",
                        str(tmp_path / "data/split/test"), "--rounds", "1", "--runs", "1"])
    out = capsys.readouterr().out
    for name in FORMATS:
        assert re.search(rf"^{name}\s+\d+\.\d\s+\d\.\d{{4}}\s+\d+\.\d+ \(", out, re.M), (name, out)
