"""The export formats (stages.common.model.formats): each is built from a sealed fp32 ONNX file
of a small constructed network, answers as that file does on constructed inputs (parity), carries
its metadata and the operating point bound to its own digest, and refuses damage in one line."""
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from stages import export as export_stage
from stages.common.alarm import calibration as cal, point as pt
from stages.common.config.params import parse
from stages.common.inference.batches import normalise
from stages.common.inference.corrupted import mode_jobs
from stages.common.infra.errors import ParamError, StageError
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD
from stages.common.model.checkpoint import ModelMeta
from stages.common.model.formats import CONVERTERS, FORMATS, build, sidecar
from stages.common.model.onnx import export
from stages.common.pictures.corrupt import corrupt
from stages.common.serving.classifiers import (OnnxClassifier, OpenVinoClassifier,
                                               load_classifier)
from stages.common.serving.predictor import prepare
from tests import paramfile

SIZE = 32
PERSON = 2
CLASSES = ["animal", "object", "person"]
META = ModelMeta("resnet18", CLASSES, SIZE, IMAGENET_MEAN, IMAGENET_STD)
BUILT = [name for name in FORMATS if name in CONVERTERS]


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


def point() -> pt.OperatingPoint:
    return pt.OperatingPoint.parse(pt.seal({
        "format": 1, "label": "person", "temperature": 1.5, "threshold": cal.probability(0.3),
        "threshold_log_odds": 0.3, "target_recall": 0.99,
        "val": {"persons": 29, "resolved": False}, "model_sha256": "0" * 64}))


def crops(seed: int, n: int) -> np.ndarray:
    """Normalised crops as the pipeline gives them (pixels in [0, 1] through mean / std): a
    colour per crop with noise over it, so the pooled features, and the logits, differ."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.uniform(0, 1, (n, 3, 1, 1))
                     + 0.2 * rng.standard_normal((n, 3, SIZE, SIZE)), 0, 1)
    mean, std = (np.array(v, np.float32)[:, None, None] for v in (IMAGENET_MEAN, IMAGENET_STD))
    return ((pixels - mean) / std).astype(np.float32)


CALIBRATION = [crops(1, 16), crops(2, 16)]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """The fp32 ONNX file with its point, and every other format built from it with 32
    calibration crops (others than the inputs compared)."""
    d = tmp_path_factory.mktemp("formats")
    export(small_net(), META, d / "model.onnx", 18, point_for=lambda g: pt.embedded(point(), g))
    for name in BUILT:
        build(name, d / "model.onnx", d / FORMATS[name].file, CALIBRATION,
              point_for=lambda g: pt.embedded(point(), g))
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
        assert getattr(op, key) == getattr(original, key)
    assert op.graph_sha256 != original.graph_sha256  # bound to this artifact, not the fp32
    assert op.source == f"{artifacts / FORMATS[name].file} (embedded)"


def test_a_point_carried_into_another_ir_is_refused(artifacts, tmp_path):
    """The int8 IR's sidecar with the fp16 IR's point, the sidecar digest recomputed."""
    from stages.common.model.checkpoint import DIGEST_KEY
    from stages.common.model.formats import _content_digest

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


# ----- through predict ------------------------------------------------------------------------

def test_each_format_round_trips_through_predict_with_the_same_alarm(artifacts, tmp_path,
                                                                     predict_in_process):
    """Pictures whose fp32 person score is clear of the threshold (by more than int8 moves
    it) raise the same alarm, yes and no both, through predict with every format."""
    rng = np.random.default_rng(7)
    for i in range(24):
        colour = rng.integers(0, 256, 3)
        picture = np.clip(colour + rng.integers(-40, 40, (SIZE + 8 * (i % 3), SIZE, 3)), 0, 255)
        cv2.imwrite(str(tmp_path / f"{i:02}.png"), picture.astype(np.uint8))
    fp32 = OnnxClassifier(artifacts / "model.onnx")
    pixels = np.stack([prepare(cv2.imread(str(p)), META)
                          for p in sorted(tmp_path.glob("*.png"))])
    op = fp32.operating_point
    margin = np.abs(cal.person_log_odds(fp32.classify(pixels), op.temperature, PERSON)
                    - op.threshold_log_odds)
    clear = margin > 0.5

    def alarms(model: Path) -> list[bool]:
        run = predict_in_process(tmp_path, "--model", model, "--format", "json")
        assert run.returncode == 0, run.stderr
        return [r["alarm"] for r in json.loads(run.stdout)["predictions"]]

    expected = np.array(alarms(artifacts / "model.onnx"))
    assert expected[clear].any() and not expected[clear].all()  # both answers are tested
    for name in BUILT:
        answered = np.array(alarms(artifacts / FORMATS[name].file))
        np.testing.assert_array_equal(answered[clear], expected[clear], err_msg=name)


# ----- export's re-certification --------------------------------------------------------------

def stage_params(**export):
    return parse(paramfile.params({"export": export}))


def pipeline_point(log_odds: float, rule: str = "none",
                   modes: dict[str, float] | None = None) -> pt.OperatingPoint:
    """A sealed point at ``log_odds``; ``modes``: camera mode name -> its threshold's log-odds,
    each mode seeing its crops as a grey near-infrared picture, severity 2."""
    content = {
        "format": 1, "label": "person", "temperature": 1.0,
        "threshold": cal.probability(log_odds), "threshold_log_odds": log_odds,
        "target_recall": 0.99, "guarantee": rule, "delta": 0.05,
        "val": {"persons": 29, "resolved": False}, "model_sha256": "0" * 64}
    if modes:
        content[pt.MODES_KEY] = [
            {"name": name, "conditions": ["infrared"], "severities": [2],
             "threshold": cal.probability(lo), "threshold_log_odds": lo, "val": {}}
            for name, lo in modes.items()]
    return pt.OperatingPoint.parse(pt.seal(content))


@pytest.fixture(scope="module")
def losing(artifacts):
    """The fp32 ONNX file standing in for the PyTorch model, 32 test crops all persons, and a
    threshold between one crop's fp32 and int8 person scores: that crop's alarm, raised by the
    fp32 model, is lost by int8's drift (the quantization is deterministic: the int8 file export
    builds from the same file and calibration crops is :func:`artifacts`' own). The test crops
    are the calibration crops themselves, so a threshold refitted on the calibration crops sees
    every test score."""
    x = np.concatenate(CALIBRATION)
    reference = OnnxClassifier(artifacts / "model.onnx").logits(x)
    ours = cal.person_log_odds(reference, 1.0, PERSON)
    int8 = cal.person_log_odds(OnnxClassifier(artifacts / "model.int8.onnx").logits(x), 1.0,
                               PERSON)
    worst = int(np.argmax(ours - int8))
    assert ours[worst] - int8[worst] > 1e-3  # the drift the construction needs
    threshold = float((ours[worst] + int8[worst]) / 2)
    lost = int(((ours >= threshold) & (int8 < threshold)).sum())
    differ = int(((ours >= threshold) != (int8 >= threshold)).sum())
    return artifacts, x, reference, threshold, lost, np.concatenate(CALIBRATION), differ


def run_other_format(losing, tmp_path, **export):
    d, x, reference, threshold, _, calibration, _ = losing
    shutil.copy(d / "model.onnx", tmp_path / "model.onnx")
    persons = np.full(len(x), PERSON)
    pictures = [f"p{i}" for i in range(len(x))]
    refused = []
    calibration_set = (calibration, np.full(len(calibration), PERSON),
                       [f"c{i}" for i in range(len(calibration))])
    figures = export_stage.other_format(
        "onnx_int8", tmp_path, stage_params(**export), calibration_set, reference, x, persons,
        pictures, pipeline_point(threshold), PERSON, 1, refused)
    return figures, refused


def test_an_int8_artifact_that_loses_a_test_person_is_not_written(losing, tmp_path):
    figures, refused = run_other_format(losing, tmp_path)
    lost = losing[4]
    assert figures["persons_lost"] == lost >= 1
    assert not figures["written"] and not (tmp_path / "model.int8.onnx").exists()
    assert refused == [
        f"warning: onnx_int8 not written: its alarm misses {lost} test "
        f"person{'s' if lost != 1 else ''} that the PyTorch model's catches, more than "
        "export.max_persons_lost 0; set export.refit_threshold: true to fit it its own "
        "threshold, or leave onnx_int8 out of export.formats"]
    assert figures["alarm_agreement"] == round(1 - losing[6] / 32, 4)
    # a looser bound lets the same artifact through
    loose = tmp_path / "loose"
    loose.mkdir()
    figures, refused = run_other_format(losing, loose, max_persons_lost=lost)
    assert figures["written"] and not refused and (loose / "model.int8.onnx").exists()


def test_a_refitted_threshold_is_sealed_for_the_artifact_and_then_certified(losing, tmp_path):
    """The refit runs on the calibration crops, here the test crops themselves (all persons),
    so its threshold, rule none's, the lowest calibration person's int8 score, catches every
    test person by construction; the file carries it bound to its own digest."""
    calibration = losing[5]
    figures, refused = run_other_format(losing, tmp_path, refit_threshold=True)
    assert figures["refitted"] and figures["written"] and not refused
    assert figures["persons_lost"] == 0
    carried = OnnxClassifier(tmp_path / "model.int8.onnx")
    op = carried.operating_point
    lowest = cal.person_log_odds(carried.logits(calibration), 1.0, PERSON).min()
    assert op.content["refitted_for"] == "onnx_int8"
    assert op.threshold_log_odds == pytest.approx(lowest)
    assert op.threshold == cal.probability(op.threshold_log_odds)
    assert figures["threshold_log_odds"] == op.threshold_log_odds


@pytest.fixture(scope="module")
def losing_in_infrared(artifacts):
    """Test crops (uint8, all persons: a colour each with noise over it) that export sees under
    an infrared camera mode, with the fp32 ONNX file standing in for PyTorch, and an infrared
    threshold between one grey crop's fp32 and int8 person scores: under that mode int8 loses a
    person the fp32 alarm catches, while clean, at a threshold far below every score, it loses
    none."""
    rng = np.random.default_rng(5)
    pixels = np.clip(rng.uniform(0, 1, (24, 1, 1, 3))
                     + 0.2 * rng.standard_normal((24, SIZE, SIZE, 3)), 0, 1)
    pixels = (pixels * 255).round().astype(np.uint8)
    crops = export_stage.ModeCrops(pixels, [f"person/{i}.png" for i in range(len(pixels))], 42,
                                   META, np.full(len(pixels), PERSON),
                                   [f"p{i}" for i in range(len(pixels))], {})
    mode = pipeline_point(0.0, modes={"infrared": 0.0}).mode("infrared")
    fp32 = OnnxClassifier(artifacts / "model.onnx").logits
    reference = crops.logits(mode, fp32)
    crops.reference["infrared"] = reference
    ours = cal.person_log_odds(reference, 1.0, PERSON)
    int8 = cal.person_log_odds(crops.logits(mode, OnnxClassifier(
        artifacts / "model.int8.onnx").logits), 1.0, PERSON)
    worst = int(np.argmax(ours - int8))
    assert ours[worst] - int8[worst] > 1e-3  # the drift the construction needs
    clean = OnnxClassifier(artifacts / "model.onnx").logits(np.concatenate(CALIBRATION))
    return crops, float((ours[worst] + int8[worst]) / 2), clean


def run_with_modes(artifacts, losing_in_infrared, tmp_path, infrared: float):
    crops, _, clean = losing_in_infrared
    shutil.copy(artifacts / "model.onnx", tmp_path / "model.onnx")
    x = np.concatenate(CALIBRATION)
    refused = []
    figures = export_stage.other_format(
        "onnx_int8", tmp_path, stage_params(), (x, np.full(len(x), PERSON),
                                                [f"c{i}" for i in range(len(x))]),
        clean, x, np.full(len(x), PERSON), [f"p{i}" for i in range(len(x))],
        pipeline_point(-50.0, modes={"infrared": infrared}), PERSON, 1, refused, crops)
    return figures, refused


def test_a_format_that_loses_a_person_under_a_camera_mode_only_is_not_written(
        artifacts, losing_in_infrared, tmp_path):
    """Clean, the int8 file loses nobody; in infrared, at the mode's own threshold it carries,
    it misses a person the fp32 alarm catches: not written, and the line names the mode."""
    _, infrared, _ = losing_in_infrared
    figures, refused = run_with_modes(artifacts, losing_in_infrared, tmp_path, infrared)
    assert figures["persons_lost"] == 0
    lost = figures["modes"]["infrared"]["persons_lost"]
    assert lost >= 1 and figures["modes"]["infrared"]["persons"] == 24
    assert not figures["written"] and not (tmp_path / "model.int8.onnx").exists()
    assert refused == [
        f"warning: onnx_int8 not written: under camera mode 'infrared' its alarm misses {lost} "
        f"test person{'s' if lost != 1 else ''} (crops as the mode sees them) that the PyTorch "
        "model's catches at that mode's threshold, more than export.max_persons_lost 0; "
        "export.refit_threshold refits the clean threshold only: leave onnx_int8 out of "
        "export.formats, or infrared out of calibrate.modes"]
    assert f"- onnx_int8: infrared {lost} of 24 (recall" in export_stage.modes_lost(
        {"onnx_int8": figures})
    # the same file with an infrared threshold below every score loses nobody and is written
    low = tmp_path / "low"
    low.mkdir()
    figures, refused = run_with_modes(artifacts, losing_in_infrared, low, -50.0)
    assert figures["written"] and not refused
    assert figures["modes"]["infrared"]["persons_lost"] == 0
    assert (low / "model.int8.onnx").exists()


def test_the_mode_crops_are_those_calibrate_and_conditions_corrupt(losing_in_infrared):
    """A mode's crops are each test crop under each of its conditions x severities, seeded by
    the crop's key as the conditions stage seeds it; labels and pictures repeat per job."""
    crops, _, _ = losing_in_infrared
    seen = []
    mode = pt.ModeThreshold("n", ("night", "fog"), (1, 3), 0.5, 0.0)
    crops.logits(mode, lambda x: seen.append(x) or np.zeros((len(x), 3)), batch_size=1000)
    expected = np.stack([corrupt(p, c, s, 42, k) for c, s in mode_jobs(mode)
                         for p, k in zip(crops.pixels, crops.keys)])
    x = torch.from_numpy(expected).permute(0, 3, 1, 2)
    np.testing.assert_array_equal(np.concatenate(seen),
                                  normalise(x, META.mean, META.std).numpy())
    targets, pictures = crops.labels(mode)
    assert len(targets) == len(pictures) == 4 * len(crops.pixels)
    assert pictures[:3] == pictures[len(crops.pixels):len(crops.pixels) + 3]


# ----- params and calibration crops -----------------------------------------------------------

@pytest.mark.parametrize("formats, expected", [
    (["onnx", "tflite"], "export.formats: 'tflite' is not a format; expected a list of distinct "
                         "formats from onnx, onnx_int8, openvino_fp16, openvino_int8, holding "
                         "onnx (every other one is converted from it)"),
    (["onnx_int8"], "export.formats=['onnx_int8'] lacks onnx; expected"),
    (["onnx", "onnx"], "export.formats=['onnx', 'onnx'] is not allowed; expected"),
    ("onnx", "export.formats='onnx' is not allowed; expected"),
])
def test_bad_formats_are_one_line(formats, expected):
    with pytest.raises(ParamError) as caught:
        stage_params(formats=formats)
    assert f"params.yaml: {expected}" in str(caught.value) and "\n" not in str(caught.value)


def test_too_few_calibration_crops_stop_before_any_work(tmp_path, monkeypatch):
    from tests.tiny_project import write_noise_test_split

    write_noise_test_split(tmp_path, CLASSES, SIZE, per_label=3)
    (tmp_path / "data/split/test").rename(tmp_path / "data/split/calibration")
    monkeypatch.chdir(tmp_path)
    cfg = parse(paramfile.params({"split": {"calibration": 0.1},
                                  "export": {"formats": ["onnx", "openvino_int8"],
                                             "calibration_min_crops": 10}}))
    with pytest.raises(StageError) as caught:
        export_stage.calibration_set(cfg, META)
    assert str(caught.value) == (
        "data/split/calibration holds 9 crops, fewer than export.calibration_min_crops 10 that "
        "quantization needs to see the range of each activation; raise split.calibration (or "
        "split.val), or leave the int8 formats out of export.formats")
    enough = parse(paramfile.params({"split": {"calibration": 0.1},
                                     "export": {"formats": ["onnx", "openvino_int8"],
                                                "calibration_min_crops": 9}}))
    arrays, targets, _ = export_stage.calibration_set(enough, META)
    assert arrays.shape == (9, 3, SIZE, SIZE) and sorted(set(targets.tolist())) == [0, 1, 2]
    assert export_stage.calibration_set(stage_params(formats=["onnx", "openvino_fp16"]),
                                        META) is None  # no quantized format: none needed
