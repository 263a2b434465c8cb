"""predict, export and the mistakes gallery on a tiny random checkpoint (no pipeline run needed)."""
import json
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

from stages import export as export_stage
from stages import predict
from stages.common import figures
from stages.common.crops import corner_colour
from stages.common.model import (IMAGENET_MEAN, IMAGENET_STD, build_model, load_checkpoint,
                                 save_checkpoint)
from stages.common.onnx_model import OnnxClassifier, export
from stages.common.params import ParamError, StageError
from stages.common.predictor import TorchClassifier, load_classifier, prepare
from stages.common.speed import speed_figures
from stages.evaluate import most_confident_mistakes
from tests import paramfile

SIZE = 32
CLASSES = ["animal", "object", "person"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A random resnet18 checkpoint at 32 px and its ONNX export."""
    d = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 0.3).eval()
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    save_checkpoint(d / "best.pt", model, meta)
    export(model, meta, d / "model.onnx", 18)
    return d / "best.pt", d / "model.onnx"


@pytest.fixture
def pictures(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "pics"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "wide.jpg"), rng.integers(0, 255, (40, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "sub" / "tall.png"), rng.integers(0, 255, (70, 30, 3), dtype=np.uint8))
    cv2.imwrite(str(folder / "crop.jpg"), rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    (folder / "broken.jpg").write_bytes(b"not a picture")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


@pytest.fixture
def run_predict(capsys):
    """`python -m stages.predict ARGS` in this process: (exit code, stdout, stderr)."""
    def run(*args):
        try:
            code = predict.main([str(a) for a in args])
        except SystemExit as exc:
            code = exc.code
        out = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)
    return run


def test_a_crop_of_the_right_size_passes_through_unchanged():
    meta = {"image_size": SIZE, "mean": IMAGENET_MEAN, "std": IMAGENET_STD}
    crop = np.random.default_rng(2).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    x = prepare(crop, meta)
    rgb = crop[..., ::-1].astype(np.float32) / 255
    expected = (rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_allclose(x, expected.transpose(2, 0, 1), atol=1e-6)


def test_a_wide_picture_is_centred_on_its_corner_colour():
    meta = {"image_size": SIZE, "mean": [0, 0, 0], "std": [1, 1, 1]}
    picture = np.full((20, 80, 3), (10, 200, 60), np.uint8)  # BGR; scales to 32 x 8
    picture[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :]
    x = prepare(picture, meta)
    canvas = np.round(x.transpose(1, 2, 0) * 255).astype(int)[..., ::-1]  # back to BGR
    pad = np.array(corner_colour(cv2.resize(picture, (32, 8))))
    assert (canvas[:12] == pad).all() and (canvas[20:] == pad).all()  # 12 rows above, 12 below
    assert not (canvas[12:20] == pad).all()
    np.testing.assert_array_equal(x, prepare(picture, meta))  # centred: no randomness


def test_predict_reports_bad_files_and_goes_on(run_predict, models, pictures, tmp_path):
    pt, _ = models
    proc = run_predict(pictures, tmp_path / "missing.jpg", "--model", pt, "--format", "json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    by_name = {Path(p["path"]).name: p for p in out["predictions"]}
    assert list(by_name) == ["broken.jpg", "crop.jpg", "tall.png", "wide.jpg", "missing.jpg"]
    assert "cannot decode" in by_name["broken.jpg"]["error"]
    assert by_name["missing.jpg"]["error"] == "file not found"
    for name in ["crop.jpg", "tall.png", "wide.jpg"]:
        p = by_name[name]
        assert set(p["probabilities"]) == set(CLASSES)
        assert sum(p["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert p["label"] == max(p["probabilities"], key=p["probabilities"].get)
    assert "2 of 5 inputs failed" in proc.stderr
    again = run_predict(pictures, tmp_path / "missing.jpg", "--model", pt, "--format", "json")
    assert again.stdout == proc.stdout  # centred letterbox: the same answer every time


def test_predict_table_and_csv(run_predict, models, pictures):
    pt, _ = models
    good = pictures / "crop.jpg"
    table = run_predict(good, pictures / "broken.jpg", "--model", pt, "--top-k", "2")
    lines = table.stdout.splitlines()
    assert table.returncode == 1 and lines[0].split()[:3] == ["file", "label", "prob"]
    assert lines[1].startswith(str(good)) and lines[1].count(",") == 1  # top-2: two classes
    assert "error: cannot decode" in lines[2]
    csv_out = run_predict(good, "--model", pt, "--format", "csv")
    assert csv_out.returncode == 0
    assert csv_out.stdout.splitlines()[0] == "path,label,probability,animal,object,person,error"


def test_predict_bad_option_or_model_is_one_line_exit_2(run_predict, models, pictures, tmp_path):
    bad_k = run_predict(pictures, "--model", models[0], "--top-k", "0")
    assert bad_k.returncode == 2 and bad_k.stderr.strip().startswith("error: --top-k=0")
    missing = run_predict(pictures, "--model", tmp_path / "none.pt")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "checkpoint not found" in missing.stderr


def test_onnx_matches_pytorch_with_a_dynamic_batch(models):
    pt, onnx_file = models
    eager, onnx = TorchClassifier(pt), OnnxClassifier(onnx_file)
    assert onnx.meta == eager.meta
    x = np.random.default_rng(3).standard_normal((5, 3, SIZE, SIZE)).astype(np.float32)
    for batch in (x[:1], x):
        np.testing.assert_allclose(onnx.logits(batch), eager.logits(batch), atol=1e-4)


def test_onnx_export_holds_no_paths_and_is_byte_identical(models, tmp_path):
    """The exporter's per-node stack traces name the virtual environment's folder: stripped, so
    two clones in different folders export the same bytes (DVC hashes data/export)."""
    import onnx

    checkpoint, onnx_file = models
    data = onnx_file.read_bytes()
    venv = str(Path(torch.__file__).resolve().parents[1])
    assert venv.encode() not in data and b"site-packages" not in data
    assert str(Path.cwd()).encode() not in data and str(tmp_path.parent).encode() not in data
    model = onnx.load(str(onnx_file))
    assert all(p.key != "pkg.torch.onnx.stack_trace" for n in model.graph.node
               for p in n.metadata_props)
    assert any(p.key == "namespace" for n in model.graph.node for p in n.metadata_props)
    again = tmp_path / "again.onnx"
    model, meta = load_checkpoint(checkpoint)    # as the export stage does
    export(model, meta, again, 18)
    assert again.read_bytes() == data


def test_predict_runs_the_onnx_model(run_predict, models, pictures):
    pt, onnx_file = models
    a = json.loads(run_predict(pictures, "--model", pt, "--format", "json").stdout)
    b = json.loads(run_predict(pictures, "--model", onnx_file, "--format", "json").stdout)
    for p, q in zip(a["predictions"], b["predictions"]):
        assert p.get("label") == q.get("label")
        for c in CLASSES if "error" not in p else []:
            assert p["probabilities"][c] == pytest.approx(q["probabilities"][c], abs=1e-4)


def test_onnx_without_our_metadata_is_refused(tmp_path):
    bare = tmp_path / "bare.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2).eval(), (torch.zeros(1, 2),), str(bare), dynamo=True,
                      verbose=False)
    with pytest.raises(StageError, match="metadata lacks arch"):
        load_classifier(bare)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(StageError, match="not a loadable ONNX model"):
        load_classifier(tmp_path / "junk.onnx")


def test_parity_figures():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    got = np.array([[1.0, 2.0005, 0.0], [0.0, 0.0, 3.5]])
    assert export_stage.parity(ref, got) == {"test_crops": 2, "max_abs_logit_diff": 3.5,
                                             "top1_agreement": 0.5}
    with pytest.raises(StageError, match="shape"):
        export_stage.parity(ref, got[:1])


def test_export_params_are_checked():
    params = paramfile.params({"export": {"opset": 9}})
    with pytest.raises(ParamError, match="export.opset=9"):
        export_stage.read_config(params)


def test_speed_figures_shape():
    calls = []
    s = speed_figures(calls.append, "one", "batch", 8, runs=5)
    assert set(s) == {"batch1_ms_per_image", "batch1_images_per_s", "batch_size",
                      "batch_images_per_s"} and s["batch_size"] == 8
    assert calls.count("one") == 3 + 5 and calls.count("batch") == 3 + 3  # warm-up + timed


def test_most_confident_mistakes_order():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.05, 0.9, 0.05],
                      [0.2, 0.7, 0.1]])
    targets = np.array([0, 2, 0, 0, 2])  # mistakes: 1 (0.7), 2 (0.8), 3 (0.9), 4 (0.7)
    assert most_confident_mistakes(probs, targets, 3) == [3, 2, 1]
    assert most_confident_mistakes(probs, np.array([0, 1, 2, 1, 1]), 5) == []


def test_mistakes_png_is_deterministic_and_handles_none(tmp_path):
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    items = [{"image": img, "true": "person", "pred": "object", "confidence": 0.97,
              "name": "a.jpg"}] * 5
    for name in ["a.png", "b.png"]:
        figures.mistakes_png(items, tmp_path / name, "t", total=10)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    figures.mistakes_png([], tmp_path / "none.png", "t", total=10)
    assert (tmp_path / "none.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("classes,side,needle", [
    (["cat", "dog", "person"], SIZE, "trained on classes ['animal', 'object', 'person'] but "),
    (CLASSES, SIZE + 16, f"trained on {SIZE}x{SIZE} crops but "),
])
def test_checkpoint_that_disagrees_with_the_data_is_refused(tmp_path, models, classes, side,
                                                           needle):
    from stages.common.model import load_checkpoint
    from stages.common.predictor import labelled_folder

    for label in classes:
        (tmp_path / label).mkdir()
        cv2.imwrite(str(tmp_path / label / "a.jpg"), np.zeros((side, side, 3), np.uint8))
    _, meta = load_checkpoint(models[0])
    with pytest.raises(StageError) as exc:
        labelled_folder(tmp_path, meta, models[0])
    message = str(exc.value)
    assert needle in message and "\n" not in message
    shown = str(classes) if classes != CLASSES else f"{side}x{side}"
    assert shown in message  # both sides are named
