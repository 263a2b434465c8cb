"""Readers that keep the one-line promise, and answers that say what they are (issue 24, part 4):
the bounded JSON reader, params.yaml read as DVC reads it, predict without an operating point,
with stderr closed and with odd paths, the point bound to its ONNX model, export's order of
checks, report's revisions and extract_crops' large pictures."""
from __future__ import annotations

import io
import json
import os
import shlex
import subprocess
import sys
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages import predict
from stages.common.alarm import point as pt
from stages.common.config import params
from stages.common.infra.errors import ParamError, StageError
from stages.common.infra.jsonfile import MAX_DEPTH, JsonProblem, parse_json, read_json
from stages.common.model.build import build_model
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.serving import predictor
from tests import paramfile

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["animal", "object", "person"]
SIZE = 32
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def in_thread(fn, *args):
    """``fn(*args)``'s result or exception; a read that blocks for ever fails the test instead
    of hanging the suite (a daemon thread is left behind)."""
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "the read blocked"
    return box


# ----- the one JSON reader ---------------------------------------------------------------------

def test_a_fifo_is_refused_before_it_is_opened(tmp_path):
    fifo = tmp_path / "operating_point.json"
    os.mkfifo(fifo)
    box = in_thread(read_json, fifo)
    assert isinstance(box.get("error"), JsonProblem)
    assert str(box["error"]) == "not a regular file (a FIFO)"
    box = in_thread(pt.read_operating_point, fifo)  # what evaluate and export call
    assert isinstance(box.get("error"), StageError)
    assert str(box["error"]).startswith(f"{fifo}: cannot read it (not a regular file (a FIFO))")


def test_a_link_to_dev_zero_is_refused_not_read(tmp_path):
    link = tmp_path / "eval.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(JsonProblem, match=r"^not a regular file \(a character device\)$"):
        read_json(link)


def test_a_file_larger_than_the_bound_is_not_read_whole(tmp_path):
    big = tmp_path / "big.json"
    big.write_text(json.dumps({"x": "a" * 5000}))
    with pytest.raises(JsonProblem, match="larger than 1,000 bytes"):
        read_json(big, max_bytes=1000)
    assert read_json(big)["x"] == "a" * 5000


@pytest.mark.parametrize("text,why", [
    ("[" * 100_000 + "]" * 100_000, f"nested 100000 deep, more than {MAX_DEPTH}"),
    ('{"a": ' * 100_000 + "1" + "}" * 100_000, f"nested 100000 deep, more than {MAX_DEPTH}"),
    ('{"n": ' + "9" * 400 + "}", "is beyond +-2^53"),
    ('{"n": 1e999}', "1e999 is beyond the range of a float"),
    ('{"n": NaN}', "NaN is not a finite number"),
    ('{"n": -Infinity}', "-Infinity is not a finite number"),
    ('{"a": 1, "a": 2}', "key 'a' is given twice in one object"),
    ('{"a": 1', "not valid JSON"),
])
def test_each_bad_json_is_one_line(text, why):
    with pytest.raises(JsonProblem) as caught:
        parse_json(text)
    assert why in str(caught.value) and "\n" not in str(caught.value)


def test_brackets_inside_strings_are_not_nesting():
    value = {"name": "[" * 500 + "{" * 500, "n": 2**53, "x": -1.5e300}
    assert parse_json(json.dumps(value)) == value


def test_a_point_with_a_key_given_twice_is_refused(tmp_path):
    point = tmp_path / "operating_point.json"
    point.write_text('{"threshold": 0.1, "threshold": 0.9}')
    with pytest.raises(StageError) as caught:
        pt.read_operating_point(point)
    assert str(caught.value) == (f"{point}: cannot read it (key 'threshold' is given twice in one "
                                 "object); run `dvc repro calibrate` again")


# ----- params.yaml as DVC reads it (YAML 1.2) ----------------------------------------------------

def load_with(tmp_path: Path, seed_text: str):
    paramfile.write(tmp_path)
    path = tmp_path / "params.yaml"
    lines = path.read_text().splitlines()
    at = lines.index(f"seed: {paramfile.params()['seed']}")
    lines[at] = f"seed: {seed_text}"
    path.write_text("\n".join(lines) + "\n")
    return params.load(path)


def dvc_reads(path: Path):
    from stages.common.infra.dvc_internals import params_as_dvc_reads

    return params_as_dvc_reads(path.read_text())


def test_a_leading_zero_is_decimal_as_dvc_reads_it(tmp_path):
    assert load_with(tmp_path, "052").seed == 52 == dvc_reads(tmp_path / "params.yaml")["seed"]


def test_a_colon_number_is_text_as_dvc_reads_it(tmp_path):
    with pytest.raises(ParamError) as caught:
        load_with(tmp_path, "1:10")
    assert str(caught.value).startswith("params.yaml: seed='1:10' is not allowed; expected an "
                                        "integer")
    assert dvc_reads(tmp_path / "params.yaml")["seed"] == "1:10"


def test_an_exponent_without_a_dot_is_a_number(tmp_path):
    paramfile.write(tmp_path)
    path = tmp_path / "params.yaml"
    lines = path.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("lr:"))
    lines[at] = lines[at].split("lr:")[0] + "lr: 1e-3"
    path.write_text("\n".join(lines) + "\n")
    assert params.load(path).train.lr == 0.001 == dvc_reads(path)["train"]["lr"]


@pytest.mark.parametrize("text,line", [
    ("seed: [1, 2\n", "params.yaml: not valid YAML at line 2; fix the file's syntax"),
    ("seed: 1\nseed: 2\n", "key 'seed' is given twice (lines 1 and 2)"),
    ("seed: !!python/object:os.system 1\n", "params.yaml: DVC cannot read it at line 1 ("),
])
def test_the_loaders_errors_are_one_line(tmp_path, text, line):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamError) as caught:
        params.load(path)
    assert line in str(caught.value) and "\n" not in str(caught.value)


# ----- predict without an operating point --------------------------------------------------------

@pytest.fixture(scope="module")
def bare_model(tmp_path_factory) -> Path:
    """A random checkpoint with no operating point anywhere near it."""
    d = tmp_path_factory.mktemp("bare")
    torch.manual_seed(0)
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": MEAN,
            "std": STD, "dropout": 0.3}
    save_checkpoint(d / "best.pt", build_model("resnet18", 3, 0.3).eval(), ModelMeta(**meta))
    cv2.imwrite(str(d / "pic.jpg"), np.random.default_rng(1).integers(0, 255, (40, 50, 3),
                                                                       dtype=np.uint8))
    return d / "best.pt"


@pytest.fixture
def run_predict(predict_in_process, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/calibration/operating_point.json here
    return predict_in_process


def test_a_threshold_without_a_point_is_warned_of(run_predict, bare_model):
    pic = bare_model.parent / "pic.jpg"
    out = run_predict(pic, "--model", bare_model, "--person-threshold", "0.5")
    assert out.returncode == 0
    warning, = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert "has no operating point" in warning and "uncalibrated (temperature 1)" in warning
    assert "--person-threshold 0.5" in warning and "--require-point" in warning


def test_without_a_point_the_warning_says_the_alarm_is_not_the_points(run_predict, bare_model):
    out = run_predict(bare_model.parent / "pic.jpg", "--model", bare_model)
    assert out.returncode == 0
    warning, = [line for line in out.stderr.splitlines() if line.startswith("warning:")]
    assert "the alarm is NOT the operating point's" in warning


@pytest.mark.parametrize("extra", [[], ["--person-threshold", "0.5"]])
def test_require_point_refuses_without_one(run_predict, bare_model, extra):
    out = run_predict(bare_model.parent / "pic.jpg", "--model", bare_model, "--require-point",
                      *extra)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"error: {bare_model} has no operating point (")
    assert out.stderr.rstrip().endswith("--require-point answers only with one")
    assert out.stderr.count("\n") == 1


def test_require_point_is_in_the_help(capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    assert "--require-point" in capsys.readouterr().out


def test_stderr_closed_keeps_stdout_json(bare_model, tmp_path):
    """`2>&-`: the warning went into stdout and the JSON no longer parsed."""
    command = (f"exec {shlex.quote(sys.executable)} -m stages.predict "
               f"{shlex.quote(str(bare_model.parent / 'pic.jpg'))} --model "
               f"{shlex.quote(str(bare_model))} --format json 2>&-")
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0
    document = json.loads(proc.stdout)
    assert [p["path"] for p in document["predictions"]] == [str(bare_model.parent / "pic.jpg")]


# ----- predict's paths -------------------------------------------------------------------------

def test_an_empty_path_is_refused(run_predict, bare_model):
    out = run_predict("", "--model", bare_model)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: PATH '' is empty") and out.stderr.count("\n") == 1


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_a_link_to_proc_is_not_walked(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"x")
    (folder / "proc").symlink_to("/proc")
    skipped: list = []
    found = predictor.expand([folder], skipped)
    assert [p for p, _ in found] == [folder / "a.jpg"]
    assert [(s.path, s.pseudo) for s in skipped] == [(folder / "proc", True)]
    assert predictor.expand(["/proc"]) == [(Path("/proc"), "a folder of a pseudo-filesystem "
                                            "(/proc, /sys, /dev), not pictures; not walked")]


def test_a_device_given_by_name_is_named_as_such(tmp_path):
    (tmp_path / "fifo.jpg").parent.mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "fifo.jpg")
    assert predictor.expand(["/dev/zero", tmp_path / "fifo.jpg", tmp_path / "gone.jpg"]) == [
        (Path("/dev/zero"), "not a regular file (a character device)"),
        (tmp_path / "fifo.jpg", "not a regular file (a FIFO)"),
        (tmp_path / "gone.jpg", "file not found")]


def test_the_csv_escapes_control_characters_as_the_table_does():
    out = io.StringIO()
    writer = predict.CsvWriter(out, CLASSES, 3, [], predict.Alarm(CLASSES, None, None, None))
    writer.write(predictor.Prediction(Path("x\x1b[2K\x1b[1Ay\r\nz.jpg"), error="bad\x1b"))
    assert out.getvalue() == "x\\x1b[2K\\x1b[1Ay\\r\\nz.jpg,,,,,,,bad\\x1b\n"


# ----- the point inside an ONNX file names its model -------------------------------------------

@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    from stages.common.model.onnx import export

    d = tmp_path_factory.mktemp("onnx")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 0.3).eval()
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": MEAN,
            "std": STD, "dropout": 0.3}
    save_checkpoint(d / "best.pt", model, ModelMeta(**meta))
    point = pt.seal({"format": pt.FORMAT, "label": "person", "temperature": 1.5,
                      "threshold": 0.5, "threshold_log_odds": 0.0, "target_recall": 0.9,
                      "val": {}, "model": "best.pt", "model_sha256": "0" * 64})
    export(model, ModelMeta(**meta), d / "model.onnx", 18,
           point_for=lambda g: pt.embedded(pt.OperatingPoint.parse(point), g))
    return d / "model.onnx"


def rewritten(path: Path, out: Path, change) -> Path:
    """``path`` with ``change(proto)`` applied and the file's own digest recomputed around it,
    as a tool that rewrites metadata (or a forger) would."""
    import onnx

    from stages.common.model.onnx import seal

    proto = onnx.load(str(path))
    change(proto)
    out.write_bytes(seal(proto))
    return out


def test_the_embedded_point_names_the_models_graph(onnx_model):
    from stages.common.serving.classifiers import OnnxClassifier

    point = OnnxClassifier(onnx_model).operating_point
    assert len(point.graph_sha256) == 64 and point.temperature == 1.5


def test_a_point_kept_with_other_weights_is_refused(onnx_model, tmp_path):
    import onnx.numpy_helper as nh

    from stages.common.serving.classifiers import OnnxClassifier

    def other_weights(proto):
        weights = proto.graph.initializer[0]
        values = nh.to_array(weights).copy()
        values.flat[0] += 1.0
        weights.CopyFrom(nh.from_array(values, weights.name))

    moved = rewritten(onnx_model, tmp_path / "model.onnx", other_weights)
    with pytest.raises(StageError) as caught:
        OnnxClassifier(moved)
    assert "ONNX metadata operating_point is not usable (onnx_graph_sha256" in str(caught.value)
    assert "the point was embedded in another model" in str(caught.value)


def test_deep_json_in_onnx_metadata_is_one_line(onnx_model, tmp_path):
    from stages.common.serving.classifiers import OnnxClassifier

    def deep(proto):
        for prop in proto.metadata_props:
            if prop.key == "classes":
                prop.value = "[" * 100_000 + "]" * 100_000

    with pytest.raises(StageError) as caught:
        OnnxClassifier(rewritten(onnx_model, tmp_path / "model.onnx", deep))
    assert "ONNX metadata classes is not usable (nested 100000 deep" in str(caught.value)


# ----- export, checkpoints, report, extract_crops, make repro -----------------------------------

def test_export_checks_eval_json_before_any_timing(tmp_path, monkeypatch, capsys):
    from stages import export as export_stage

    monkeypatch.chdir(tmp_path)
    paramfile.write(tmp_path)
    monkeypatch.setattr(export_stage, "load_checkpoint", lambda path: (None, {}))
    monkeypatch.setattr(export_stage, "operating_point_for",
                        lambda *a: {"point_sha256": "a" * 64})

    def timed(*args, **kwargs):
        raise AssertionError("timed before eval.json was checked")
    monkeypatch.setattr(export_stage, "TorchClassifier", timed)
    monkeypatch.setattr(export_stage, "test_arrays", timed)
    with pytest.raises(SystemExit) as caught:
        export_stage.main()
    assert caught.value.code == 2
    assert capsys.readouterr().err.startswith("error: metrics/eval.json: cannot read it (")


def test_out_of_memory_loading_a_checkpoint_is_said_so(tmp_path, monkeypatch):
    from stages.common.model import build

    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes(b"x" * 10)

    def short(*args, **kwargs):
        raise MemoryError()
    monkeypatch.setattr(build.torch, "load", short)
    with pytest.raises(StageError) as caught:
        build.load_checkpoint(ckpt)
    assert str(caught.value) == (f"{ckpt}: out of memory while loading it (10 bytes); free "
                                 "memory (or use a machine with more) and rerun")


def test_a_revision_that_is_not_a_commit_is_one_line(tmp_path):
    from stages import report

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    (tmp_path / "f").write_text("x")
    subprocess.run(git + ["add", "f"], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    report.check_revisions(tmp_path, ["HEAD"])
    with pytest.raises(StageError) as caught:
        report.check_revisions(tmp_path, ["HEAD^{tree}"])
    assert str(caught.value).startswith("--rev HEAD^{tree}: 'HEAD^{tree}' names a git object "
                                        "that is not a commit (")


def test_a_picture_too_large_by_its_header_is_not_read_whole(tmp_path, monkeypatch):
    from stages.extract_crops import stage

    big = tmp_path / "big.png"
    ok, png = cv2.imencode(".png", np.zeros((300, 400, 3), np.uint8))
    big.write_bytes(png.tobytes() + b"\0" * (3 * stage.HEAD_BYTES))  # trailing bytes
    read: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def read(self, n=-1):
            data = self.f.read(n)
            read.append(len(data))
            return data

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(stage, "open", lambda *a, **k: Counting(real_open(*a, **k)),
                        raising=False)
    task = stage.ImageTask("big", str(big), str(tmp_path), 0, 32, 8, False, 100_000, ())
    image, problem, header, _ = stage.read_for_crops(task)
    assert (image, problem, header.width, header.height) == (None, "too_many_pixels", 400, 300)
    assert sum(read) == stage.HEAD_BYTES


def test_make_repro_removes_dead_runs_temporaries_first(tmp_path):
    """A stage restored from DVC's cache never runs its own start-up cleanup."""
    recipe = (ROOT / "Makefile").read_text().split("\nrepro:", 1)[1].splitlines()[1:]
    first = recipe[0].strip()
    assert "clean_dead_leftovers" in first and "dvc repro" in recipe[1]
    (tmp_path / "dvc.yaml").write_text("stages:\n  export:\n    cmd: x\n    outs: [data/export]\n")
    (tmp_path / "data").mkdir()
    dead = tmp_path / "data" / ".export.tmp-999999999"
    dead.mkdir()
    command = first.replace("$(RUN) ", "").replace("python", shlex.quote(sys.executable), 1)
    subprocess.run(["sh", "-c", command], cwd=tmp_path, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert not dead.exists()


def test_evaluate_refuses_a_fifo_as_train_metrics(tmp_path, monkeypatch):
    from stages.evaluate import stage as evaluate_stage

    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics").mkdir()
    os.mkfifo(tmp_path / "metrics" / "train.json")
    box = in_thread(evaluate_stage.best_epoch)
    assert isinstance(box.get("error"), StageError)
    assert str(box["error"]) == ("metrics/train.json: cannot read it (not a regular file (a "
                                 "FIFO)); run `dvc repro train`")
