"""The edge runtime: ``python -m stages.predict ... --model model.onnx`` on a box with only
requirements-edge.txt installed (no PyTorch, no onnx package, no scipy, no pydantic): the same
answers, alarms, exit codes and checks as the full install (docs/using-the-model.md).

The models here are tiny graphs written with onnx.helper (a convolution, a pooling and a linear
head), sealed and carrying an operating point as export writes them: milliseconds to build, no
torch export. The virtual environment of the edge requirements is built once per machine and
reused (:func:`edge_python`).
"""
from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages.common.alarm import calibration as cal
from stages.common.alarm import point as op
from stages.common.inference.batches import normalise
from stages.common.infra.errors import StageError
from stages.common.model.onnx import INPUT, OUTPUT, POINT_KEY, graph_digest, seal, verified_bytes
from stages.common.serving import predictor
from stages.common.serving.classifiers import OnnxClassifier, normalise_array

ROOT = Path(__file__).resolve().parents[1]
EDGE = ROOT / "requirements-edge.txt"
CLASSES = ["animal", "object", "person"]
SIZE = 16
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
# What the edge path must never load: the training stack, and the heavy imports it left behind.
NEVER = {"torch", "torchvision", "onnx", "onnx_ir", "onnxscript", "scipy", "pydantic", "dvc",
         "dvclive", "fiftyone", "pandas", "sklearn", "matplotlib"}


def tiny_graph(seed: int = 0):
    """A 3-class ONNX model: conv 3x3 (4 channels), ReLU, global average pool, linear head."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 3, 3, 3)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(0, 0.1, 4).astype(np.float32), "b"),
               numpy_helper.from_array(rng.normal(0, 2.0, (4, 3)).astype(np.float32), "fc"),
               numpy_helper.from_array(np.array([0.0, 0.1, -0.2], np.float32), "fc_b"),
               numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")]
    nodes = [helper.make_node("Conv", [INPUT, "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Reshape", ["g", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fc_b"], [OUTPUT])]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 3])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)


def sealed(proto, path: Path, point: op.OperatingPoint | None) -> Path:
    """``proto`` with export's metadata and ``point`` bound to its graph, sealed, at ``path``."""
    del proto.metadata_props[:]
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": MEAN,
            "std": STD}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=json.dumps(value))
    if point is not None:
        proto.metadata_props.add(key=POINT_KEY,
                                 value=json.dumps(op.embedded(point, graph_digest(proto))))
    path.write_bytes(seal(proto))
    return path


def fitted_point() -> op.OperatingPoint:
    log_odds = -0.25
    return op.OperatingPoint.parse(op.seal({
        "format": op.FORMAT, "label": "person", "temperature": 1.5,
        "threshold": cal.probability(log_odds), "threshold_log_odds": log_odds,
        "target_recall": 0.9, "val": {}, "model": "best.pt", "model_sha256": "0" * 64}))


def int8_of(fp32: Path, out: Path, crops: np.ndarray) -> Path:
    """export's int8 artifact of ``fp32`` (stages.common.model.formats: ONNX Runtime's static
    quantization), calibrated on ``crops`` (normalised), its point bound to the int8 graph."""
    from stages.common.model.formats import build

    build("onnx_int8", fp32, out, [crops], point_for=lambda g: op.embedded(fitted_point(), g))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("edge-models")
    fp32 = sealed(tiny_graph(), d / "model.onnx", fitted_point())
    crops = np.random.default_rng(3).integers(0, 256, (8, 3, SIZE, SIZE), dtype=np.uint8)
    int8 = int8_of(fp32, d / "model.int8.onnx", normalise_array(crops, MEAN, STD))
    return {"fp32": fp32, "int8": int8}


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """A few pictures: crops of the model's size, a wide and a tall one, a bright one (the
    alarm: the person logit grows with brightness in some seeds, not asserted), a broken file."""
    folder = tmp_path_factory.mktemp("edge-pictures")
    rng = np.random.default_rng(5)
    for i in range(5):
        cv2.imwrite(str(folder / f"crop{i}.jpg"),
                    rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "wide.png"), rng.integers(0, 256, (20, 50, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "tall.jpg"), rng.integers(0, 256, (70, 24, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "bright.png"), np.full((SIZE, SIZE, 3), 250, np.uint8))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a picture")
    return folder


@pytest.fixture(autouse=True)
def no_progress_lines(monkeypatch):
    """stderr compared byte for byte: no timed progress line in it, however slow the run."""
    monkeypatch.setenv("PROGRESS_EVERY_S", "1e9")


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


def run(python: str | Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), *map(str, args)], cwd=ROOT, env=clean_env(),
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------- the requirements

def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line)
            assert match, f"{path.name}: {line!r} is not NAME==VERSION"
            out[re.sub(r"[-_.]+", "-", match[1]).lower()] = match[2]
    return out


def test_edge_pins_are_the_full_installs():
    """A name requirements.txt pins has its pin; any other (ONNX Runtime's own dependencies) is
    the version installed beside the full install's, so both answer with the same libraries."""
    edge, full = pins(EDGE), pins(ROOT / "requirements.txt")
    assert {"onnxruntime", "numpy", "opencv-python-headless"} <= set(edge)
    for name, version in edge.items():
        assert version == full.get(name, metadata.version(name)), name


# ------------------------------------------------------------- what the edge path imports

def test_the_onnx_path_imports_no_torch_and_only_edge_requirements(models, crops):
    """predict with an .onnx file, in a subprocess of the full install (where torch is there to
    be imported): no module of NEVER is loaded, and every third-party module that is belongs
    to a distribution requirements-edge.txt names."""
    script = ("import json, runpy, sys\n"
              "sys.argv = ['stages.predict', *sys.argv[1:]]\n"
              "try:\n    runpy.run_module('stages.predict', run_name='__main__')\n"
              "except SystemExit as exc:\n    code = exc.code\n"
              "print(json.dumps({'code': code, 'modules': sorted(sys.modules)}), "
              "file=sys.stderr)\n")
    proc = run(sys.executable, "-c", script, crops, "--model", models["fp32"], "--format",
               "csv")
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    assert report["code"] == 1, proc.stderr  # broken.jpg
    tops = {m.split(".")[0] for m in report["modules"]}
    assert not tops & NEVER, sorted(tops & NEVER)
    third_party = {t for t in tops - set(sys.stdlib_module_names) - {"stages"}
                   if not t.startswith("_")}
    dists = metadata.packages_distributions()
    needed = {re.sub(r"[-_.]+", "-", d).lower() for t in third_party for d in dists.get(t, [])}
    assert third_party and needed <= set(pins(EDGE)), sorted(needed - set(pins(EDGE)))


# -------------------------------------------------------- the torch-free code, the same floats

@pytest.mark.parametrize("mean, std", [(MEAN, STD), ([0, 0, 0], [1, 1, 1]),
                                       ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
                                       ([0.1234567, 0.9, 0.3], [0.7777, 0.05, 1.3])])
def test_normalise_array_is_batches_normalise_bit_for_bit(mean, std):
    """Every level of every channel: a pixel's float depends on nothing else."""
    levels = np.broadcast_to(np.arange(256, dtype=np.uint8), (1, 3, 1, 256)).copy()
    expected = normalise(torch.from_numpy(levels), mean, std).numpy()
    got = normalise_array(levels, mean, std)
    assert got.dtype == np.float32 and got.shape == levels.shape
    np.testing.assert_array_equal(got, expected)


def test_probability_is_scipys_expit():
    from scipy.special import expit

    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 5, 20_000), rng.uniform(-800, 800, 2_000),
                             [0.0, -0.0, -745.2, -746.0, 709.8, 710.0, -710.0, 40.0, 36.7,
                              np.inf, -np.inf]])
    for x in values:
        assert cal.probability(float(x)) == float(expit(x)), x
    assert np.isnan(cal.probability(np.nan))


def test_the_wire_digests_are_the_protobuf_ones(models, tmp_path):
    """verified_bytes reads the file's digests from its bytes; they are model_digest and
    graph_digest of the parsed model, for an fp32 and an int8 file, with metadata in another
    order and none at all but the digest."""
    import onnx

    for path in models.values():
        data, stored, graph = verified_bytes(path)
        proto = onnx.load(str(path))
        assert graph == graph_digest(proto)
        assert stored == {p.key: p.value for p in proto.metadata_props
                          if p.key != "weights_sha256"}
    proto = onnx.load(str(models["fp32"]))
    entries = [(p.key, p.value) for p in proto.metadata_props][::-1]
    del proto.metadata_props[:]
    for key, value in entries:
        proto.metadata_props.add(key=key, value=value)
    (tmp_path / "reversed.onnx").write_bytes(seal(proto))
    assert verified_bytes(tmp_path / "reversed.onnx")[2] == graph_digest(proto)
    del proto.metadata_props[:]
    (tmp_path / "bare.onnx").write_bytes(seal(proto))
    data, stored, graph = verified_bytes(tmp_path / "bare.onnx")
    assert stored == {} and graph == graph_digest(proto)
    with pytest.raises(StageError, match="metadata lacks arch"):
        OnnxClassifier(tmp_path / "bare.onnx")


@pytest.mark.parametrize("damage", ["cut", "digest", "key"])
def test_a_damaged_onnx_file_is_refused_in_one_line(models, tmp_path, damage):
    data = models["fp32"].read_bytes()
    at = data.index(b"weights_sha256")
    if damage == "cut":
        data = data[:len(data) // 2]
    elif damage == "digest":  # one hex digit of the stored digest
        data = data[:at + 18] + bytes([data[at + 18] ^ 1]) + data[at + 19:]
    else:  # the digest entry's key: no digest
        data = data[:at] + b"W" + data[at + 1:]
    (tmp_path / "damaged.onnx").write_bytes(data)
    expected = {"cut": "not a loadable ONNX model", "key": "has no weights digest",
                "digest": "its content does not match its weights digest"}[damage]
    with pytest.raises(StageError, match=expected):
        OnnxClassifier(tmp_path / "damaged.onnx")


def test_pictures_are_prepared_a_bounded_number_ahead(models, crops, monkeypatch):
    """Memory follows the batch, not the number of files: when the first answer comes out, at
    most batch + 2 x workers pictures have been prepared; the answers are in input order."""
    items = [(path, None) for path in sorted(crops.glob("crop*.jpg"))] * 40
    calls = []
    real = predictor.prepared
    monkeypatch.setattr(predictor, "prepared", lambda *a: calls.append(1) or real(*a))
    classifier = OnnxClassifier(models["fp32"])
    answers = predictor.predict_paths(classifier, items, batch_size=4)
    first = next(answers)
    assert len(calls) <= 2 * 4 + 2 * predictor.workers()
    rest = list(answers)
    assert [first.path] + [p.path for p in rest] == [path for path, _ in items]
    assert len(calls) == len(items)
    one_by_one = [p.logits for path in sorted(crops.glob("crop*.jpg"))
                  for p in predictor.predict_paths(classifier, [(path, None)], batch_size=1)]
    for k, p in enumerate([first] + rest):
        np.testing.assert_allclose(p.logits, one_by_one[k % 5], rtol=1e-5, atol=1e-5)


# ------------------------------------------------- a clean virtual environment of the edge

def edge_cache() -> Path:
    """Where the edge virtual environment is kept, per machine and user: a folder named by the
    requirements' and the interpreter's digest, so a change of either builds a new one."""
    key = hashlib.sha256(EDGE.read_bytes() + sys.version.encode()).hexdigest()[:16]
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "person-classifier" / f"edge-venv-{key}"


@pytest.fixture(scope="module")
def edge_python() -> Path:
    """The python of a virtual environment holding requirements-edge.txt and nothing else (no
    system site-packages), built once per machine (about 90 s, mostly downloads; pip's own
    cache and find-links wheels serve it offline after) and reused."""
    venv = edge_cache()
    python = venv / "bin" / "python"
    if not (venv / ".complete").is_file():
        venv.parent.mkdir(parents=True, exist_ok=True)
        building = Path(tempfile.mkdtemp(prefix=".building-", dir=venv.parent))
        try:
            subprocess.run([sys.executable, "-m", "venv", str(building)], check=True)
            pip = subprocess.run([str(building / "bin" / "python"), "-m", "pip", "install",
                                  "--disable-pip-version-check", "-q", "-r", str(EDGE)],
                                 capture_output=True, text=True, timeout=900)
            if pip.returncode:
                last = (pip.stderr.strip().splitlines() or ["no output"])[-1]
                if os.environ.get("CI"):
                    pytest.fail(f"pip could not install requirements-edge.txt: {last}")
                pytest.skip(f"no package registry or wheels for requirements-edge.txt: {last}")
            (building / ".complete").write_text("")
            try:  # a venv runs from where it lies: the folder may be renamed
                building.rename(venv)
            except OSError:  # another run built it meanwhile
                pass
            for old in venv.parent.glob("edge-venv-*"):  # of requirements no longer here
                if old != venv:
                    shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return python


@pytest.mark.edge
def test_the_edge_venv_holds_no_torch(edge_python):
    proc = run(edge_python, "-c", "import importlib.util as u; print([m for m in "
               f"{sorted(NEVER)!r} if u.find_spec(m)])")
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


@pytest.mark.edge
@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_the_edge_venv_answers_as_the_full_install(edge_python, models, crops, fmt,
                                                   predict_in_process):
    """fp32 and int8: the same bytes on stdout and stderr, the same exit code (1: broken.jpg),
    as predict in the full install, alarms with the sealed operating point included."""
    for model in models.values():
        args = [crops, "--model", model, "--format", fmt, "--batch-size", "4"]
        full = predict_in_process(*args)
        edge = run(edge_python, "-m", "stages.predict", *args)
        assert (edge.returncode, edge.stdout, edge.stderr) == \
            (full.returncode, full.stdout, full.stderr)
        assert full.returncode == 1
    document = json.loads(predict_in_process(crops, "--model", models["int8"], "--format",
                                             "json").stdout)
    assert document["operating_point"]["source"] == f"{models['int8']} (embedded)"
    assert {type(p.get("alarm")) for p in document["predictions"]} == {bool, type(None)}


@pytest.mark.edge
def test_the_edge_venv_refuses_what_the_full_install_refuses(edge_python, models, crops,
                                                             tmp_path, predict_in_process):
    """A flipped bit in the weights, a point bound to another graph, --require-point without a
    point: the same one line and exit code 2 in both."""
    data = bytearray(models["fp32"].read_bytes())
    data[len(data) // 3] ^= 0x10
    (tmp_path / "flipped.onnx").write_bytes(bytes(data))
    moved = sealed(tiny_graph(seed=1), tmp_path / "moved.onnx", None)
    import onnx

    proto = onnx.load(str(moved))  # the fp32 model's point, put into another graph
    proto.metadata_props.add(key=POINT_KEY, value=verified_bytes(models["fp32"])[1][POINT_KEY])
    moved.write_bytes(seal(proto))
    plain = sealed(tiny_graph(), tmp_path / "plain.onnx", None)
    cases = [["--model", tmp_path / "flipped.onnx"], ["--model", moved],
             ["--model", plain, "--require-point"], ["--model", models["fp32"], "--device",
                                                     "cuda"]]
    for extra in cases:
        full = predict_in_process(crops, *extra)
        edge = run(edge_python, "-m", "stages.predict", crops, *extra)
        assert full.returncode == 2 and len(full.stderr.strip().splitlines()) == 1, extra
        assert (edge.returncode, edge.stdout, edge.stderr) == \
            (full.returncode, full.stdout, full.stderr), extra


@pytest.mark.edge
def test_a_checkpoint_on_the_edge_is_one_line(edge_python, crops, tmp_path):
    """No torch there: a .pt model (the default one too) is refused before any answer, exit 2."""
    (tmp_path / "best.pt").write_bytes(b"any")
    proc = run(edge_python, "-m", "stages.predict", crops, "--model", tmp_path / "best.pt")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (f"error: {tmp_path / 'best.pt'}: a PyTorch checkpoint, and torch is "
                           "not installed here (the edge runtime answers from an exported .onnx "
                           "file); give --model model.onnx, or install requirements.txt\n")
