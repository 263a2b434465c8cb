"""The benchmark scripts that BENCHMARKS.md tells a reader to run, run at a tiny size so they
cannot break unnoticed. Their figures are measurements of the machine: printed, never asserted."""
from __future__ import annotations

import dataclasses
import json
import re

import pytest

from benchmarks import bench_inference
from stages.common.infra.errors import StageError


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


def test_the_load_generator_starts_its_processes_and_stops_them():
    """benchmarks/load.py: each worker decodes frames while it runs, and none is left after."""
    from benchmarks.load import Load

    with Load(cores=1) as load:
        assert [w.is_alive() for w in load.workers] == [True]
        assert all(c.value > 0 for c in load.counters)  # start() returns once each decodes
    assert [w.is_alive() for w in load.workers] == [False]
    assert len(load.frames_per_s()) == 1


def test_the_load_generators_bad_options_are_one_line_exit_2(capsys):
    from benchmarks import load

    with pytest.raises(SystemExit) as exit_:
        load.main(["--cores", "0", "--seconds", "1"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_model_table_writes_every_key_of_a_row(tmp_path, capsys):
    """One tiny arch x one format x one thread count, quiet and loaded, no trained checkpoint:
    the JSON holds the figures export and the report read, the Markdown the row. Its time is
    the row's child process starting (it imports torch: each row's peak memory is its own)."""
    from benchmarks import model_table

    out = tmp_path / "table.json"
    model_table.main(["--archs", "mobilenet_v3_small", "--formats", "pytorch", "--threads", "1",
                      "--size", "32", "--batch", "2", "--runs", "1", "--budget-s", "0.01",
                      "--load-cores", "1", "--checkpoint", str(tmp_path / "none.pt"),
                      "--out", str(out)])
    table = json.loads(out.read_text())
    assert {"cpu", "cores", "date", "torch", "onnxruntime"} <= set(table["machine"])
    assert table["environment"]["OMP_WAIT_POLICY"]
    [row] = table["rows"]
    assert (row["arch"], row["format"], row["threads"], row["size"], row["trained"]) == (
        "mobilenet_v3_small", "pytorch", 1, 32, False)
    for when in ("quiet", "loaded"):
        assert row[when]["batch1_ms_per_image"] > 0 and row[when]["batch_size"] == 2
    assert len(row["loaded"]["load_frames_per_s"]) == 1
    assert row["peak_rss_mb"] > 0 and row["file_mb"] > 0 and "recall" not in row
    assert re.search(r"\| mobilenet_v3_small \| pytorch \| 1 \| .* \| not trained \|",
                     out.with_suffix(".md").read_text())


@pytest.mark.parametrize("args,needle", [
    (["--archs", "resnet51"], "--archs resnet51: not an arch of the family table"),
    (["--formats", "tflite"], "--formats tflite: unknown"),
    (["--threads", "0", "--size", "32"], "must be >= 1"),
])
def test_the_model_tables_bad_options_are_one_line_exit_2(args, needle, capsys):
    from benchmarks import model_table

    with pytest.raises(SystemExit) as exit_:
        model_table.main(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and needle in err


ROW = {"arch": "resnet18", "format": "onnx", "threads": None, "size": 64, "file_mb": 42.7,
       "peak_rss_mb": 900.0, "point_sha256": "a" * 64,
       "quiet": {"batch1_ms_per_image": 2.5, "batch_size": 32, "batch_images_per_s": 700.0},
       "loaded": {"batch1_ms_per_image": 9.0, "batch_size": 32, "batch_images_per_s": 200.0},
       "recall": {"person_recall_lower_95": 0.926}}
MACHINE = {"cpu": "AMD EPYC", "cores": 2, "date": "2026-12-07 16:00 UTC"}


def test_export_takes_its_models_row_and_its_recall_only_for_its_own_point(tmp_path):
    from stages import export
    from stages.common.model.checkpoint import ModelMeta

    table = tmp_path / "model_table.json"
    other = {**ROW, "threads": 2, "quiet": {**ROW["quiet"], "batch1_ms_per_image": 1.0}}
    table.write_text(json.dumps({"machine": MACHINE, "rows": [other, ROW]}))
    meta = ModelMeta(arch="resnet18", classes=["animal", "object", "person"], image_size=64,
                     mean=[0.5] * 3, std=[0.5] * 3, dropout=0.3)
    row = export.table_row(meta, "a" * 64, table)
    assert (row["threads"], row["batch1_ms_per_image"], row["batch1_ms_per_image_loaded"],
            row["person_recall_lower_95"]) == (None, 2.5, 9.0, 0.926)  # predict's default
    assert "0.926" in export.table_section(row) and "AMD EPYC" in export.table_section(row)
    assert export.table_row(meta, "b" * 64, table)[
        "person_recall_lower_95"] is None  # another training's recall is not this model's
    assert export.table_row(dataclasses.replace(meta, image_size=224),
                            "a" * 64, table) is None  # no row at that size
    assert export.table_row(meta, "a" * 64, tmp_path / "absent.json") is None
    assert "python -m benchmarks.model_table" in export.table_section(None)
    table.write_text(json.dumps({"machine": MACHINE, "rows": [{"arch": "resnet18"}]}))
    with pytest.raises(StageError, match="model_table.json"):
        export.table_row(meta, "a" * 64, table)


def test_the_report_plots_the_rows_with_a_recall_and_draws_their_pareto_front(tmp_path):
    from stages import report

    assert [p["row"] for p in report.pareto([
        {"ms": 1.0, "recall": 0.8, "row": "fast"}, {"ms": 2.0, "recall": 0.7, "row": "worse"},
        {"ms": 3.0, "recall": 0.9, "row": "slow"}])] == ["fast", "slow"]
    failed: list[str] = []
    assert report.model_table_html(tmp_path, failed) == ""  # no table, no section
    (tmp_path / "benchmarks").mkdir()
    untrained = {k: v for k, v in ROW.items() if k != "recall"}
    (tmp_path / "benchmarks" / "model_table.json").write_text(
        json.dumps({"machine": MACHINE, "load_cores": 2, "rows": [ROW, untrained]}))
    page = report.model_table_html(tmp_path, failed)
    assert not failed and page.count('<figure class="plot"') == 1
    assert "1 rows without a trained checkpoint" in page
    assert "with 2 cores decoding video" in page  # the loaded column, where an edge box runs


def test_the_load_can_pause_and_resume_without_losing_a_worker():
    """Quiet and loaded rounds alternate by stopping the decoders (SIGSTOP) and continuing
    them; stop() ends paused workers too."""
    from benchmarks.load import Load

    load = Load(cores=1).start()
    try:
        load.pause()
        load.resume()
        load.pause()
    finally:
        load.stop()
    assert [w.is_alive() for w in load.workers] == [False]


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


def test_the_precision_benchmark_measures_the_stages_own_crops_in_both_arithmetics():
    """BENCHMARKS.md section 8's bf16 figures: the crops are the stage's (clean, then each
    condition x severity in order, each the pure corruption of its crop), fp32 is the model's
    own forward pass, and bf16 answers the same crops in lower precision."""
    import numpy as np
    import torch
    from types import SimpleNamespace

    from benchmarks import bench_conditions_precision as B
    from stages.common.inference.batches import normalise
    from stages.common.pictures.corrupt import corrupt

    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    keys = ["a.png", "b.png", "c.png"]
    suite = B.suite_pixels(pixels, keys, {"night": [1, 3], "fog": [2]}, 42)
    assert suite.shape == (12, 32, 32, 3)
    assert np.array_equal(suite[:3], pixels)
    for block, (condition, severity) in enumerate([("night", 1), ("night", 3), ("fog", 2)], 1):
        for i, key in enumerate(keys):
            assert np.array_equal(suite[3 * block + i], corrupt(pixels[i], condition, severity,
                                                                42, key))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 3)).eval()
    meta = SimpleNamespace(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    fp32 = B.forward(model, meta, suite, False, 5)
    with torch.inference_mode():
        direct = model(normalise(torch.from_numpy(suite).permute(0, 3, 1, 2), meta.mean,
                                 meta.std)).numpy()
    assert np.allclose(fp32, direct, rtol=1e-5, atol=1e-6)  # batches of 5: sums may reorder
    bf16 = B.forward(model, meta, suite, True, 5)
    assert not np.array_equal(bf16, fp32) and np.allclose(bf16, fp32, atol=0.1)
