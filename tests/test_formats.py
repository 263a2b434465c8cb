"""The export formats (stages.common.model.formats): each is built from a sealed fp32 ONNX file
of a small constructed network, answers as that file does on constructed inputs (parity), carries
its metadata and the operating point bound to its own digest, and refuses damage in one line."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from stages.common.alarm import calibration as cal
from stages.common.infra.errors import StageError
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD
from stages.common.model.checkpoint import ModelMeta
from stages.common.model.formats import FORMATS, build, sidecar
from stages.common.model.onnx import export
from stages.common.serving.classifiers import (OnnxClassifier, OpenVinoClassifier,
                                               load_classifier)

SIZE = 32
CLASSES = ["animal", "object", "person"]
META = ModelMeta("resnet18", CLASSES, SIZE, IMAGENET_MEAN, IMAGENET_STD)
BUILT = [name for name, row in FORMATS.items() if row.convert is not None]


def small_net() -> nn.Module:
    """Convolutions, batch norm, ReLU, pooling and a linear head: the ops of every family's
    graph, small enough to quantize in a second. Its batch norms hold the statistics of crops
    like the inputs (as a trained model's do), and its logits spread over a few units, so a
    quantizer that lost a scale would show."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, len(CLASSES)))
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # the plain mean over the batches below
    with torch.no_grad():
        net.train()(torch.from_numpy(crops(0, 256)))
        net[-1].weight.mul_(4)
    return net.eval()


def point() -> dict:
    return cal.seal({"format": 1, "label": "person", "temperature": 1.5,
                     "threshold": cal.probability(0.3), "threshold_log_odds": 0.3,
                     "target_recall": 0.99, "val": {"persons": 29, "resolved": False},
                     "model_sha256": "0" * 64})


def crops(seed: int, n: int) -> np.ndarray:
    """Normalised crops as the pipeline gives them (pixels in [0, 1] through mean / std): a
    colour per crop with noise over it, so the pooled features, and the logits, differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.uniform(0, 1, (n, 3, 1, 1))
                     + 0.2 * rng.standard_normal((n, 3, SIZE, SIZE)), 0, 1)
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((pixels - mean) / std).astype(np.float32)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The fp32 ONNX file with its point, and every other format built from it with 32
    calibration crops (others than the inputs compared)."""
    d = tmp_path_factory.mktemp("formats")
    export(small_net(), META, d / "model.onnx", 18, point_for=lambda g: cal.embedded(point(), g))
    calibration = [crops(1, 16), crops(2, 16)]
    for name in BUILT:
        build(name, d / "model.onnx", d / FORMATS[name].file, calibration)
    return d


@pytest.mark.parametrize("name", BUILT)
def test_each_format_answers_as_the_fp32_file_on_constructed_inputs(artifacts, name):
    x = crops(3, 32)
    reference = load_classifier(artifacts / "model.onnx").logits(x)
    answered = load_classifier(artifacts / FORMATS[name].file, threads=1).logits(x)
    assert answered.shape == reference.shape
    spread = np.ptp(reference)
    # fp16 weights computed in f32: round-off only; int8: within a few per cent of the range
    bound = 1e-2 if name.endswith("fp16") else 0.06
    assert np.abs(answered - reference).max() <= bound * spread
    margin = np.sort(reference, 1)[:, -1] - np.sort(reference, 1)[:, -2]
    clear = margin > 2 * bound * spread  # inputs whose top class no drift of that size can move
    assert clear.sum() >= 8
    np.testing.assert_array_equal(answered[clear].argmax(1), reference[clear].argmax(1))


@pytest.mark.parametrize("name", BUILT)
def test_each_format_carries_the_metadata_and_the_point_bound_to_its_own_digest(artifacts, name):
    fp32 = load_classifier(artifacts / "model.onnx")
    loaded = load_classifier(artifacts / FORMATS[name].file)
    kind = OnnxClassifier if FORMATS[name].runtime == "onnxruntime" else OpenVinoClassifier
    assert isinstance(loaded, kind)
    assert loaded.meta == fp32.meta == META
    op, original = loaded.operating_point, fp32.operating_point
    for key in ("threshold", "threshold_log_odds", "temperature", "target_recall"):
        assert op[key] == original[key]
    assert op[cal.GRAPH_KEY] != original[cal.GRAPH_KEY]  # bound to this artifact, not the fp32
    assert op["source"] == f"{artifacts / FORMATS[name].file} (embedded)"


def test_a_point_carried_into_another_ir_is_refused(artifacts, tmp_path):
    """The int8 IR's sidecar with the fp16 IR's point, the sidecar digest recomputed."""
    from stages.common.model.formats import DIGEST_KEY, _content_digest

    for part in (".xml", ".bin", ".json"):
        shutil.copy(artifacts / f"model.int8{part}", tmp_path / f"model{part}")
    fp16 = json.loads(sidecar(artifacts / "model.fp16.xml").read_text())
    card = json.loads((tmp_path / "model.json").read_text())
    card["metadata"]["operating_point"] = fp16["metadata"]["operating_point"]
    content = {k: v for k, v in card.items() if k != DIGEST_KEY}
    (tmp_path / "model.json").write_text(json.dumps({**content,
                                                     DIGEST_KEY: _content_digest(content)}))
    with pytest.raises(StageError, match="the point was embedded in another model"):
        load_classifier(tmp_path / "model.xml")


@pytest.mark.parametrize("damage", ["bin", "sidecar", "missing bin"])
def test_a_damaged_ir_is_refused_in_one_line(artifacts, tmp_path, damage):
    for part in (".xml", ".bin", ".json"):
        shutil.copy(artifacts / f"model.fp16{part}", tmp_path / f"model{part}")
    if damage == "bin":
        data = bytearray((tmp_path / "model.bin").read_bytes())
        data[len(data) // 2] ^= 1
        (tmp_path / "model.bin").write_bytes(bytes(data))
        expected = "the .xml and .bin do not match model.json's ir_sha256"
    elif damage == "sidecar":
        text = (tmp_path / "model.json").read_text()
        (tmp_path / "model.json").write_text(text.replace("resnet18", "resnet50"))
        expected = "its content does not match its weights_sha256"
    else:
        (tmp_path / "model.bin").unlink()
        expected = "not found (an OpenVINO model is model.xml, model.bin, model.json together)"
    with pytest.raises(StageError) as caught:
        load_classifier(tmp_path / "model.xml")
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_quantized_format_without_calibration_crops_is_one_line(artifacts, tmp_path):
    with pytest.raises(StageError, match="onnx_int8 is quantized and needs calibration crops"):
        build("onnx_int8", artifacts / "model.onnx", tmp_path / "model.int8.onnx", [])
    assert not (tmp_path / "model.int8.onnx").exists()


def test_a_graph_that_fails_to_quantize_is_one_line_naming_it(artifacts, tmp_path,
                                                              monkeypatch):
    """ONNX Runtime's quantizer raising (an op it cannot handle) stops with its cause."""
    import onnxruntime.quantization as quantization

    def fails(*args, **kwargs):
        raise RuntimeError("Unsupported op type: Einsum\nstack...")
    monkeypatch.setattr(quantization, "quantize_static", fails)
    with pytest.raises(StageError) as caught:
        build("onnx_int8", artifacts / "model.onnx", tmp_path / "model.int8.onnx", [crops(1, 4)])
    assert str(caught.value) == (
        "export format onnx_int8: the resnet18 graph failed to quantize (RuntimeError: "
        "Unsupported op type: Einsum); leave onnx_int8 out of export.formats, or report the arch")
