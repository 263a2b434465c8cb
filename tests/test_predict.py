"""predict, export and the mistakes gallery on a tiny random checkpoint (no pipeline run needed)."""
import io
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from stages import export as export_stage, predict
from stages.common.config.params import parse
from stages.common.inference.batches import normalise
from stages.common.inference.speed import speed_figures
from stages.common.infra.errors import ParamError, StageError
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD, build_model, load_checkpoint
from stages.common.model.checkpoint import ModelMeta, save_checkpoint
from stages.common.model.onnx import META_KEYS, export, seal
from stages.common.pictures.crops import corner_colour
from stages.common.serving.classifiers import OnnxClassifier, TorchClassifier, load_classifier
from stages.common.serving.predictor import prepare
from stages.evaluate import figures
from stages.evaluate.stage import most_confident_mistakes
from tests import paramfile
from tests.tiny_project import write_noise_test_split

ROOT = Path(__file__).resolve().parents[1]
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
    save_checkpoint(d / "best.pt", model, ModelMeta(**meta))
    give_point(d / "best.pt", d)
    export(model, ModelMeta(**meta), d / "model.onnx", 18)
    return d / "best.pt", d / "model.onnx"


def give_point(checkpoint: Path, *folders: Path) -> None:
    """An operating point fitted for ``checkpoint``, as calibrate writes it, in each folder."""
    from stages.common.alarm.calibration import log_odds
    from stages.common.alarm.point import seal
    from stages.common.infra.digest import file_sha256

    point = seal({"format": 1, "label": "person", "temperature": 1.0, "threshold": 0.5,
                  "threshold_log_odds": log_odds(0.5), "target_recall": 0.99, "val": {},
                  "model_sha256": file_sha256(checkpoint)})
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "operating_point.json").write_text(json.dumps(point))


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
def run_predict(predict_in_process):
    return predict_in_process


def test_a_crop_of_the_right_size_passes_through_unchanged():
    meta = ModelMeta("resnet18", CLASSES, SIZE, IMAGENET_MEAN, IMAGENET_STD)
    crop = np.random.default_rng(2).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    pixels = prepare(crop, meta)
    np.testing.assert_array_equal(pixels.transpose(1, 2, 0), crop[..., ::-1])  # RGB
    x = normalise(torch.from_numpy(pixels[None]), meta.mean, meta.std)[0].numpy()
    rgb = crop[..., ::-1].astype(np.float32) / 255
    expected = (rgb - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
    np.testing.assert_array_equal(x, expected.transpose(2, 0, 1))  # torchvision's, bit for bit


def test_a_wide_picture_is_centred_on_its_corner_colour():
    meta = ModelMeta("resnet18", CLASSES, SIZE, [0, 0, 0], [1, 1, 1])
    picture = np.full((20, 80, 3), (10, 200, 60), np.uint8)  # BGR; scales to 32 x 8
    picture[:, :, 0] = np.arange(80, dtype=np.uint8)[None, :]
    x = prepare(picture, meta)
    canvas = x.transpose(1, 2, 0).astype(int)[..., ::-1]  # back to BGR
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
    assert csv_out.stdout.splitlines()[0] == \
        "path,label,probability,alarm,animal,object,person,error"


def test_predict_bad_option_or_model_is_one_line_exit_2(run_predict, models, pictures, tmp_path):
    bad_k = run_predict(pictures, "--model", models[0], "--top-k", "0")
    assert bad_k.returncode == 2 and bad_k.stderr.strip().startswith("error: --top-k=0")
    missing = run_predict(pictures, "--model", tmp_path / "none.pt")
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    assert "checkpoint not found" in missing.stderr


def test_onnx_matches_pytorch_with_a_dynamic_batch(models):
    pt, onnx_file = models
    eager, onnx = TorchClassifier(pt), OnnxClassifier(onnx_file)
    assert all(getattr(onnx.meta, key) == getattr(eager.meta, key) for key in META_KEYS)
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
    import onnx

    bare = tmp_path / "bare.onnx"
    torch.onnx.export(torch.nn.Linear(2, 2).eval(), (torch.zeros(1, 2),), str(bare), dynamo=True,
                      verbose=False)
    with pytest.raises(StageError, match="has no weights digest"):
        load_classifier(bare)
    bare.write_bytes(seal(onnx.load(str(bare))))
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
        parse(params)


def test_speed_figures_shape():
    calls = []
    s = speed_figures(calls.append, "one", "batch", 8, runs=5)
    assert set(s) == {"batch1_ms_per_image", "batch1_ms_q1", "batch1_ms_q3", "batch1_runs",
                      "batch1_images_per_s", "batch_size", "batch_images_per_s",
                      "batch_images_per_s_q1", "batch_images_per_s_q3", "batch_runs"}
    assert s["batch_size"] == 8 and s["batch1_runs"] == 5 and s["batch_runs"] == 3
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
    from stages.common.model.build import load_checkpoint
    from stages.common.inference.logits import checked_crops

    for label in classes:
        (tmp_path / label).mkdir()
        cv2.imwrite(str(tmp_path / label / "a.jpg"), np.zeros((side, side, 3), np.uint8))
    _, meta = load_checkpoint(models[0])
    with pytest.raises(StageError) as exc:
        checked_crops(tmp_path, meta, models[0], torch.device("cpu"))
    message = str(exc.value)
    assert needle in message and "\n" not in message
    shown = str(classes) if classes != CLASSES else f"{side}x{side}"
    assert shown in message  # both sides are named


# ---------------------------------------------------------------------------------------------
# Hostile input: pixel bombs, files that blow up, names that lie, outputs that
# fail. Exit codes: 0 all classified, 1 some inputs failed, 2 no more answers possible.

def rows_of(stdout: str) -> list[str]:
    return stdout.splitlines()[1:]  # below the table's header


def test_pixel_bomb_is_refused_from_its_header_and_the_others_answered(run_predict, models,
                                                                       pictures, tmp_path):
    """40,000 x 40,000 pixels announced by a 100-byte PNG: OpenCV raised cv2.error and the
    run died with a traceback, losing the good pictures' answers."""
    from tests.test_bad_input import png_header_only

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(40_000, 40_000))
    good = [pictures / "crop.jpg", pictures / "wide.jpg"]
    proc = run_predict(good[0], bomb, good[1], "--model", models[0], "--format", "json")
    assert proc.returncode == 1
    got = {Path(p["path"]).name: p for p in json.loads(proc.stdout)["predictions"]}
    assert got["bomb.png"]["error"].startswith("40000 x 40000 pixels, more than the limit of "
                                               "100,000,000; not decoded")
    assert "label" in got["crop.jpg"] and "label" in got["wide.jpg"]
    # the limit is an option: a 90 x 40 picture is refused under 3,000 pixels
    small = run_predict(good[1], "--model", models[0], "--max-image-pixels", "3000")
    assert small.returncode == 1 and "90 x 40 pixels, more than the limit of 3,000" in small.stdout


def test_pixel_limit_default_is_crops_max_image_pixels():
    from stages.common.pictures import decode as pics

    assert paramfile.params()["crops"]["max_image_pixels"] == pics.DEFAULT_MAX_IMAGE_PIXELS
    assert predict.parse_args(["x.jpg"]).max_image_pixels == pics.DEFAULT_MAX_IMAGE_PIXELS


def test_anything_a_decode_raises_is_that_files_error_line(run_predict, models, pictures,
                                                           monkeypatch):
    """cv2.error, MemoryError, OSError: one file's problem, never the run's."""
    real = cv2.imdecode
    failures = {b"tall": cv2.error("OpenCV(4.14.0) error: (-4:Insufficient memory) Failed "
                                   "to allocate"),
                b"wide": MemoryError()}

    def imdecode(buf, flags):
        image = real(buf, flags)
        for marker, exc in failures.items():
            if image is not None and image.shape[:2] == {b"tall": (70, 30),
                                                         b"wide": (40, 90)}[marker]:
                raise exc
        return image

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    proc = run_predict(pictures, "--model", models[0])
    assert proc.returncode == 1
    rows = {Path(r.split()[0]).name: r for r in rows_of(proc.stdout)}
    assert "error: cannot read the file (error: OpenCV(4.14.0) error:" in rows["tall.png"]
    assert "error: cannot read the file (MemoryError)" in rows["wide.jpg"]
    assert "error" not in rows["crop.jpg"]


def test_answers_are_out_before_a_later_failure(run_predict, models, pictures, monkeypatch):
    """The model fails on the third batch: the first two answers are already written, the run
    stops with one line naming the model file, exit code 2 (answers used to be printed only
    at the end, and a NaN was printed as 'animal nan' with exit code 0)."""
    calls = []
    real = TorchClassifier.logits

    def logits(self, batch):
        calls.append(len(batch))
        out = real(self, batch)
        return out * np.nan if len(calls) == 3 else out

    monkeypatch.setattr(TorchClassifier, "logits", logits)
    proc = run_predict(pictures / "crop.jpg", pictures / "wide.jpg", pictures / "sub",
                       "--model", models[0], "--batch-size", "1")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: {models[0]}: the model answers NaN or infinite logits; its weights are "
        "damaged or diverged: retrain (dvc repro) or export it again"]
    rows = rows_of(proc.stdout)
    assert [Path(r.split()[0]).name for r in rows] == ["crop.jpg", "wide.jpg"]
    calls.clear()
    as_json = run_predict(pictures / "crop.jpg", pictures / "wide.jpg", pictures / "sub",
                          "--model", models[0], "--batch-size", "1", "--format", "json")
    assert as_json.returncode == 2  # what was answered is still one whole JSON document
    assert len(json.loads(as_json.stdout)["predictions"]) == 2


def test_table_escapes_names_so_one_picture_is_one_row(run_predict, models, pictures):
    """A newline in a name faked a second row; an ANSI escape could erase one on a terminal."""
    crop = (pictures / "crop.jpg").read_bytes()
    fake = pictures / "a\nb.jpg   person   0.9999  person 0.9999.jpg"
    fake.write_bytes(crop)
    ansi = pictures / "c\x1b[2K\x1b[1Ad.jpg"
    ansi.write_bytes(crop)
    odd = Path(os.fsdecode(bytes(pictures) + b"/e\xff.jpg"))  # not UTF-8: a name from elsewhere
    odd.write_bytes(crop)
    table = run_predict(fake, ansi, odd, "--model", models[0])
    assert table.returncode == 0
    rows = rows_of(table.stdout)
    assert len(rows) == 3 and "\x1b" not in table.stdout
    assert rows[0].startswith(str(pictures / "a\\nb.jpg   person"))
    assert rows[1].startswith(str(pictures / "c\\x1b[2K\\x1b[1Ad.jpg"))
    assert rows[2].startswith(str(pictures / "e\\xff.jpg"))
    for fmt in ("csv", "json"):  # JSON quotes: the name comes back whole (bytes not UTF-8 as
        out = run_predict(fake, odd, "--model", models[0], "--format", fmt)  # \xff); the CSV
        assert out.returncode == 0  # escapes control characters as the table does
        names = ([r["path"] for r in json.loads(out.stdout)["predictions"]] if fmt == "json"
                 else [r[0] for r in list(__import__("csv").reader(io.StringIO(out.stdout)))[1:]])
        first = str(fake) if fmt == "json" else predict.printable(str(fake))
        assert names == [first, str(pictures / "e\\xff.jpg")]


def csv_rows(stdout: str) -> list[list[str]]:
    """The rows as a CSV reader sees them (one that splits at a bare CR, as spreadsheets and
    pandas do, would see more)."""
    import csv

    rows = list(csv.reader(io.StringIO(stdout, newline="")))
    assert len(rows) == len(stdout.split("\n")) - 1 - sum(  # no row breaks inside a field...
        field.count("\n") for row in rows for field in row)
    assert all("\r" not in line or line.count('"') for line in stdout.split("\n"))  # ...nor CR
    return rows


def unescaped(name: str) -> bytes:
    """A name as predict writes it, back to the file name's bytes (docs/using-the-model.md)."""
    import re

    return re.sub(rb"\\(\\|x[0-9a-f]{2})",
                  lambda m: b"\\" if m[1] == b"\\" else bytes([int(m[1][1:], 16)]),
                  name.encode())


def test_a_carriage_return_in_a_name_stays_inside_its_csv_row(run_predict, models, pictures):
    """csv.writer with "\\n" left a lone CR unquoted: a reader split the row there and the
    alarm landed on a file named `cam1.jpg`. The CSV now writes it escaped, as the table does."""
    crop = (pictures / "crop.jpg").read_bytes()
    odd = pictures / "x\rcam1.jpg"
    odd.write_bytes(crop)
    out = run_predict(odd, pictures / "wide.jpg", "--model", models[0], "--format", "csv")
    assert out.returncode == 0
    rows = csv_rows(out.stdout)
    assert [r[0] for r in rows] == ["path", str(pictures / "x\\rcam1.jpg"),
                                    str(pictures / "wide.jpg")]
    assert "\r" not in out.stdout  # escaped, so a reader that splits at CR does not


def test_names_are_escaped_one_way_so_no_two_files_share_a_name(run_predict, models, pictures):
    """A byte that is not UTF-8 was written \\xff, as was a name holding those four characters:
    two files, one name in the answers."""
    crop = (pictures / "crop.jpg").read_bytes()
    byte = Path(os.fsdecode(bytes(pictures) + b"/e\xff.jpg"))
    text = pictures / "e\\xff.jpg"
    for path in (byte, text):
        path.write_bytes(crop)
    for fmt in ("csv", "json"):
        out = run_predict(byte, text, "--model", models[0], "--format", fmt)
        assert out.returncode == 0
        names = ([r["path"] for r in json.loads(out.stdout)["predictions"]] if fmt == "json"
                 else [r[0] for r in csv_rows(out.stdout)[1:]])
        assert names == [f"{pictures}/e\\xff.jpg", f"{pictures}/e\\\\xff.jpg"]
        assert [unescaped(n) for n in names] == [os.fsencode(byte), os.fsencode(text)]
    table = run_predict(byte, text, "--model", models[0])
    assert [r.split()[0] for r in rows_of(table.stdout)] == names


FORMULAS = ["=HYPERLINK(\"evil\").jpg", "+1.jpg", "-2.jpg", "@SUM(1).jpg", "\tx.jpg",
            "\rcam.jpg", "'quoted.jpg"]


def test_a_name_a_spreadsheet_would_run_is_written_as_text(run_predict, models, pictures,
                                                            monkeypatch):
    """`predict . --format csv`: a file named =HYPERLINK(...) became a live formula (OWASP CSV
    injection). The CSV puts one ' before it; JSON keeps the exact name."""
    crop = (pictures / "crop.jpg").read_bytes()
    for name in FORMULAS:
        (pictures / name).write_bytes(crop)
    monkeypatch.chdir(pictures)
    as_csv = run_predict("--model", models[0], "--format", "csv", "--", *FORMULAS, "plain.jpg")
    rows = csv_rows(as_csv.stdout)[1:]
    # a tab or CR is escaped (\t, \r) as in the table, so those names no longer need the '
    assert [r[0] for r in rows] == [predict.csv_cell(predict.printable(n)) for n in FORMULAS] + [
        "plain.jpg"]
    assert [r[0] for r in rows][4:6] == ["\\tx.jpg", "\\rcam.jpg"]
    assert rows[-1][-1] == "file not found"
    as_json = run_predict("--model", models[0], "--format", "json", "--", *FORMULAS)
    assert [r["path"] for r in json.loads(as_json.stdout)["predictions"]] == FORMULAS
    walked = run_predict(".", "--model", models[0], "--format", "csv")  # names from a folder
    assert {predict.csv_cell(predict.printable(n)) for n in FORMULAS} <= {
        r[0] for r in csv_rows(walked.stdout)[1:]}


@pytest.mark.parametrize("args,needle", [
    (["--top-k", "abc"], "argument --top-k: invalid int value: 'abc'"),
    (["--batch-size", "100000"], "--batch-size=100000 is not allowed; expected 1 to 4096"),
    (["--max-image-pixels", "0"], "--max-image-pixels=0 is not allowed"),
    (["--format", "xml"], "argument --format: invalid choice: 'xml'"),
])
def test_bad_options_are_one_line_exit_2(run_predict, models, pictures, args, needle):
    proc = run_predict(pictures, "--model", models[0], *args)
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and needle in proc.stderr


def test_device_cuda_without_a_gpu_is_one_line_exit_2(run_predict, models, pictures, monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = run_predict(pictures / "crop.jpg", "--model", models[0], "--device", "cuda")
    assert proc.returncode == 2 and proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and "no CUDA device is visible" in proc.stderr
    on_cpu = run_predict(pictures / "crop.jpg", "--model", models[0], "--device", "cpu",
                         "--format", "json")
    assert on_cpu.returncode == 0 and '"label"' in on_cpu.stdout


def test_predict_shows_progress_on_stderr_when_its_answers_go_elsewhere(run_predict, models,
                                                                       pictures, monkeypatch):
    monkeypatch.setenv("PROGRESS_EVERY_S", "0")
    proc = run_predict(pictures, "--model", models[0], "--batch-size", "1", "--format", "csv")
    lines = [l for l in proc.stderr.splitlines() if l.startswith("predict: ")]
    # 4 pictures (notes.txt is not one): a line after each answer but the last
    assert [l.split()[1] for l in lines] == ["1/4", "2/4", "3/4"], proc.stderr
    assert all("pictures/s" in l for l in lines)
    assert len(proc.stdout.splitlines()) == 5  # the header and four answers, untouched


def predict_command(*args, shell_suffix: str = "") -> subprocess.CompletedProcess:
    command = " ".join(shlex.quote(str(a)) for a in
                       [sys.executable, "-m", "stages.predict", *args]) + shell_suffix
    return subprocess.run(["sh", "-c", command], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("redirect,needle", [
    (" >/dev/full", "error: cannot write stdout (No space left on device); free space and rerun"),
    (" >&-", "error: stdout is closed, so no answer could be written; run with stdout open or "
             "redirected to a file"),
])
def test_an_output_that_cannot_be_written_is_one_line_exit_2(models, pictures, redirect, needle):
    proc = predict_command(pictures / "crop.jpg", "--model", models[0], shell_suffix=redirect)
    assert (proc.returncode, proc.stderr.splitlines()) == (2, [needle])


def test_exit_codes_0_1_2(run_predict, models, pictures, tmp_path):
    assert run_predict(pictures / "crop.jpg", "--model", models[0]).returncode == 0
    assert run_predict(pictures / "crop.jpg", pictures / "broken.jpg",
                       "--model", models[0]).returncode == 1
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    assert run_predict(pictures / "crop.jpg", "--model", junk).returncode == 2


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_an_internal_error_is_one_line_exit_3_not_1(run_predict, models, pictures, monkeypatch,
                                                     fmt):
    """A bug inside the model call (not a bad input, not an unusable model) exited 1, which
    says "some inputs failed, the rest answered", with a traceback: now one line, exit code 3,
    also when an input has failed before it; the answers already given stay whole."""
    calls = []
    real = TorchClassifier.logits

    def logits(self, batch):
        calls.append(len(batch))
        if len(calls) == 2:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied\n(1x512 and 256x3)")
        return real(self, batch)

    monkeypatch.setattr(TorchClassifier, "logits", logits)
    proc = run_predict(pictures / "broken.jpg", pictures / "crop.jpg", pictures / "wide.jpg",
                       "--model", models[0], "--batch-size", "1", "--format", fmt)
    assert proc.returncode == predict.INTERNAL_ERROR == 3
    assert proc.stderr.splitlines() == [
        "error: internal error (RuntimeError: mat1 and mat2 shapes cannot be multiplied "
        "(1x512 and 256x3)); not caused by the inputs: please report it with the command that "
        "was run"]
    if fmt == "json":
        answers = json.loads(proc.stdout)["predictions"]
    else:
        answers = [{"path": r.split()[0]} for r in rows_of(proc.stdout)]
    assert [Path(a["path"]).name for a in answers] == ["broken.jpg", "crop.jpg"]


def test_predict_help_states_every_exit_code(capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Exit code: 0 every input classified; 1 some failed" in text
    assert "2 an unusable model" in text and "3 an internal error" in text


# ---------------------------------------------------------------------------------------------
# The ONNX file's integrity, and NaN / infinite logits in every user of a model

def test_a_flipped_bit_in_the_onnx_file_is_refused(models, tmp_path):
    """One flipped bit in model.onnx answered 'object 1.000000'."""
    _, onnx_file = models
    damaged = tmp_path / "model.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # the file is almost all weights: this is inside one
    damaged.write_bytes(bytes(data))
    with pytest.raises(StageError) as err:
        OnnxClassifier(damaged)
    assert str(err.value).startswith(f"{damaged}: its content does not match its weights digest")
    OnnxClassifier(onnx_file)  # the intact file loads


def test_onnx_metadata_that_is_not_json_is_one_line(models, tmp_path):
    import onnx

    proto = onnx.load(str(models[1]))
    for prop in proto.metadata_props:
        if prop.key == "classes":
            prop.value = '["animal", "object", "person"'  # cut short
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(seal(proto))  # a valid digest: the file was written so
    with pytest.raises(StageError) as err:
        OnnxClassifier(broken)
    assert str(err.value) == (f"{broken}: ONNX metadata classes is not usable (not valid JSON "
                              "(Expecting ',' delimiter: line 1 column 30 (char 29))); the file "
                              "is damaged or not one this project wrote; export it again with "
                              "`dvc repro export` (or python -m stages.export)")


def overflowing_checkpoint(folder: Path) -> Path:
    """A checkpoint with a valid digest and finite weights whose logits overflow to infinity."""
    torch.manual_seed(0)
    model = build_model("resnet18", 3, 0.3).eval()
    with torch.no_grad():
        model.fc[1].weight.fill_(3e38)
    meta = {"arch": "resnet18", "classes": CLASSES, "image_size": SIZE, "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD, "dropout": 0.3}
    path = folder / "data/model/best.pt"
    path.parent.mkdir(parents=True)
    save_checkpoint(path, model, ModelMeta(**meta))
    give_point(path, path.parent, folder / "data/calibration")  # predict's, and evaluate's
    return path


def test_infinite_logits_stop_predict_evaluate_and_export_in_one_line(tmp_path, monkeypatch,
                                                                      capsys, run_predict,
                                                                      pictures):
    from stages.evaluate import stage as evaluate

    checkpoint = overflowing_checkpoint(tmp_path)
    proc = run_predict(pictures / "crop.jpg", "--model", checkpoint)
    assert proc.returncode == 2 and "NaN" not in proc.stdout
    assert proc.stderr.splitlines() == [f"error: {checkpoint}: the model answers NaN or "
                                        "infinite logits; its weights are damaged or diverged: "
                                        "retrain (dvc repro) or export it again"]
    write_noise_test_split(tmp_path, CLASSES, SIZE)
    paramfile.write(tmp_path, {"evaluate": {"device": "cpu", "speed_runs": 1},
                               "export": {"speed_runs": 1, "batch_size": 2}})
    monkeypatch.chdir(tmp_path)
    for stage in (evaluate, export_stage):  # both stopped before writing anything
        if stage is export_stage:  # export checks the metrics it needs first: give it them
            point = json.loads(Path("data/calibration/operating_point.json").read_text())
            Path("metrics").mkdir()
            Path("metrics/eval.json").write_text(json.dumps(
                {"operating_point": {"point_sha256": point["point_sha256"]}}))
            Path("metrics/split.json").write_text("{}")
            Path("metrics/conditions.json").write_text(json.dumps(
                {"point_sha256": point["point_sha256"]}))
        with pytest.raises(SystemExit) as exc:
            stage.main()
        assert exc.value.code == 2
        assert capsys.readouterr().err.splitlines() == [
            "error: data/model/best.pt: the model answers NaN or infinite logits; its weights "
            "are damaged or diverged: retrain (dvc repro) or export it again"]
        if stage is evaluate:
            assert not (tmp_path / "metrics").exists()
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == [
        "conditions.json", "eval.json", "split.json"]
    assert not (tmp_path / "data/export").exists()


def test_the_model_card_outside_dvc_repro_and_without_metrics(tmp_path):
    from stages import export as E
    from stages.common.infra.errors import StageError

    assert E.data_hashes(tmp_path / "dvc.lock") == {}
    (tmp_path / "dvc.lock").write_text("stages:\n  download:\n    outs:\n    - path: data/raw\n"
                                       "      md5: abc.dir\n")
    assert E.data_hashes(tmp_path / "dvc.lock") == {"data/raw": "abc.dir"}
    with pytest.raises(StageError, match="eval.json: cannot read it .*run `dvc repro`"):
        E.read_metrics(tmp_path / "metrics/eval.json")


# ---------------------------------------------------------------------------------------------
# What a folder holds: every picture answered, everything else named

def answered(stdout: str) -> dict[str, dict]:
    return {p["path"]: p for p in json.loads(stdout)["predictions"]}


def test_a_linked_sub_folder_is_walked_and_loops_end(run_predict, models, pictures, tmp_path):
    """A symlinked sub-folder was passed over in silence (exit 0, its pictures unanswered)."""
    elsewhere = tmp_path / "camera3"
    elsewhere.mkdir()
    (elsewhere / "person.jpg").write_bytes((pictures / "crop.jpg").read_bytes())
    (pictures / "cam3").symlink_to(elsewhere)
    (pictures / "sub" / "up").symlink_to("..")  # a loop
    (pictures / "again").symlink_to("sub")  # a second name for a folder
    proc = run_predict(pictures, "--model", models[0], "--format", "json")
    assert proc.returncode == 1  # broken.jpg
    got = answered(proc.stdout)
    assert "label" in got[f"{pictures}/cam3/person.jpg"]
    assert sorted(Path(p).relative_to(pictures).as_posix() for p in got) == [
        "broken.jpg", "cam3/person.jpg", "crop.jpg", "sub/tall.png", "wide.jpg"]
    assert proc.stderr.splitlines()[1:] == [  # a folder's own name wins over a link's
        f"note: {pictures}/again leads to the folder {pictures}/sub, already walked; its "
        "pictures are answered once, under that name",
        f"note: {pictures}/sub/up leads to the folder {pictures}, already walked; its pictures "
        "are answered once, under that name",
        "1 of 5 inputs failed"]


def test_links_that_fan_out_cost_one_walk_per_folder(run_predict, models, pictures, tmp_path):
    """Two links per level to the next, 24 levels: 2**24 paths to a walk that follows every
    link, one visit per folder here (the timeout only guards against a hang)."""
    levels = [tmp_path / f"level{i}" for i in range(24)]
    for folder in levels:
        folder.mkdir()
    for upper, lower in zip(levels, levels[1:]):
        (upper / "left").symlink_to(lower)
        (upper / "right").symlink_to(lower)
    (levels[-1] / "deep.jpg").write_bytes((pictures / "crop.jpg").read_bytes())
    proc = predict_command(levels[0], "--model", models[0], "--format", "json")
    assert proc.returncode == 0
    assert list(answered(proc.stdout)) == [str(levels[0] / ("left/" * 23) / "deep.jpg")]
    assert len(proc.stderr.splitlines()) == 23  # each level's second link, named


def test_a_picture_is_known_by_its_content_whatever_its_name(run_predict, models, pictures):
    """.jfif, .jpe and names without a suffix were passed over in silence."""
    jpeg = (pictures / "crop.jpg").read_bytes()
    png = cv2.imencode(".png", np.zeros((20, 20, 3), np.uint8))[1].tobytes()
    for name, data in [("photo.jfif", jpeg), ("photo.jpe", jpeg), ("IMG_0001", jpeg),
                       ("snapshot.dat", png), ("readme", b"BMW 320d, 2019: not a bitmap")]:
        (pictures / name).write_bytes(data)
    (pictures / "gone.jpg").symlink_to(pictures / "nowhere.jpg")
    proc = run_predict(pictures, "--model", models[0], "--format", "json")
    got = answered(proc.stdout)
    for name in ["photo.jfif", "photo.jpe", "IMG_0001", "snapshot.dat"]:
        assert "label" in got[f"{pictures}/{name}"], name
    assert got[f"{pictures}/gone.jpg"]["error"] == "a link to nothing"
    assert proc.returncode == 1
    assert proc.stderr.splitlines()[0] == (
        f"note: 2 files are not a picture by name or content, not classified: "
        f"{pictures}/notes.txt, {pictures}/readme")


def test_predict_help_says_which_files_of_a_folder_are_pictures(capsys):
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "links followed" in text and ".jfif" in text and "first bytes" in text


def test_predict_help_explains_every_option_and_offers_every_device(capsys):
    import argparse
    import typing

    from stages.common.config.params import Evaluate

    seen: list[argparse.Action] = []
    real = argparse.ArgumentParser.add_argument

    def spy(self, *args, **kwargs):
        seen.append(real(self, *args, **kwargs))
        return seen[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(argparse.ArgumentParser, "add_argument", spy)
        with pytest.raises(SystemExit):
            predict.parse_args(["--help"])
    options = [a for a in seen if a.option_strings and a.dest != "help"]
    assert options, "no option was declared"
    silent = [a.option_strings[0] for a in options if not a.help]
    assert not silent, f"options without help text: {silent}"
    device = next(a for a in options if a.dest == "device")
    # the stages' device param and predict's option offer the same choices
    assert list(device.choices) == list(typing.get_args(Evaluate.model_fields["device"].annotation))
    text = " ".join(capsys.readouterr().out.split())
    assert "mps" in text and "the CSV always holds every class" in text


def test_predict_runs_the_model_on_threads_predict_chooses(run_predict, models, pictures,
                                                          monkeypatch):
    """--threads reaches the runtime; by default an ONNX model runs on one thread a run (a run
    per CPU at once) and a checkpoint on the serving room's DEFAULT_THREADS; out of range is one
    line, exit 2, before the model is loaded."""
    from stages.common.serving.classifiers import DEFAULT_THREADS

    asked = []

    def loader(path, threads=None, device=None):
        asked.append(threads)
        raise StageError("stop here")
    monkeypatch.setattr(predict, "load_classifier", loader)
    assert run_predict(pictures, "--model", models[1], "--threads", "3").returncode == 2
    assert run_predict(pictures, "--model", models[1]).returncode == 2
    assert run_predict(pictures, "--model", models[0]).returncode == 2
    assert asked == [3, 1, DEFAULT_THREADS]
    proc = run_predict(pictures, "--model", models[1], "--threads", "0")
    assert proc.returncode == 2 and "--threads=0 is not allowed" in proc.stderr
    assert asked == [3, 1, DEFAULT_THREADS]
    assert predict.RUNTIME_ENV == {"OMP_WAIT_POLICY": "PASSIVE"}


def test_each_runtime_runs_on_the_threads_it_is_given(models):
    """ONNX Runtime: intra-op threads set, idle threads not spinning; PyTorch: its passes on
    the threads given, the process's own setting put back after each."""
    onnx = load_classifier(models[1], threads=1)
    options = onnx.session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    before = torch.get_num_threads()
    eager = load_classifier(models[0], threads=1)
    seen = []
    eager.model.register_forward_hook(lambda *_: seen.append(torch.get_num_threads()))
    eager.logits(np.zeros((1, 3, SIZE, SIZE), np.float32))
    assert seen == [1] and torch.get_num_threads() == before
