"""The export formats: :data:`FORMATS` is the one table of them (name -> file, runtime, builder,
whether it needs calibration crops); ``export.formats`` names rows of it, :func:`build` writes
one, stages.common.serving.classifiers.load_classifier loads each by its file's suffix.

Every format is converted from the sealed fp32 ONNX file export writes (stages.common.model.onnx)
and carries what that file carries: arch, classes, crop size, normalisation, and the operating
point (``point_for``: export passes stages.common.alarm.calibration.embedded), under its own seal
and bound to the new artifact's own graph digest (a point carried into another artifact is
refused), and the artifact's own digest, checked on load:

``onnx``           the fp32 ONNX file itself (export's, as before).
``onnx_int8``      ONNX Runtime static quantization: QDQ, int8 weights per output channel, uint8
                   activations whose ranges come from calibration crops (MinMax); metadata and
                   digest as the fp32 file's (the same reader, OnnxClassifier).
``openvino_fp16``  OpenVINO IR (``.xml`` graph + ``.bin`` weights) converted from the ONNX file
                   with ``compress_to_fp16`` (weights stored as fp16, computed in f32).
``openvino_int8``  the same IR quantized by NNCF (``nncf.quantize``) with the calibration crops.

An IR carries its metadata in a sidecar ``.json`` beside the ``.xml`` (same stem): the ONNX
file's metadata entries (JSON text each, read by the same code), ``ir_sha256`` (the SHA-256 of
the ``.xml`` and ``.bin`` bytes, :func:`ir_digest`) and ``weights_sha256`` over the sidecar's
content; the embedded point names ``ir_sha256`` as its graph. OpenVINO's own ``rt_info`` would
put the metadata inside the ``.xml``, but then the digest the point is bound to would have to
be of an XML with a part cut out; a sidecar keeps both digests over plain bytes.

Why these tools (all Apache-2.0, as ONNX Runtime): ONNX Runtime's quantizer needs nothing beyond
the runtime predict already uses; OpenVINO runs the same graph with Intel's CPU kernels (often
faster at batch 1), and NNCF is OpenVINO's own post-training quantizer (its dependencies change
no pinned package: requirements.txt).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable, Sequence

from stages.common.config.formats import FORMATS, ONNX_FP32, Format, sidecar
from stages.common.infra.errors import StageError
from stages.common.infra.jsonfile import JsonProblem, parse_json

# numpy, stages.common.model.onnx and .checkpoint and the runtimes are imported where used.
FORMAT_KEY = "export_format"  # which row of FORMATS an artifact is (ONNX metadata / sidecar)
IR_KEY = "ir_sha256"


# ----- the builders ---------------------------------------------------------------------------

def _onnx_int8(source: Path, out: Path, crops: list) -> None:
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod,
                                          QuantFormat, QuantType, quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from stages.common.model.onnx import INPUT

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.left = iter(crops)

        def get_next(self):
            x = next(self.left, None)
            return None if x is None else {INPUT: x}

    # shape inference and graph fusions first (ONNX Runtime's advice for static quantization)
    prepared = out.with_name(out.name + ".pre")
    try:
        quant_pre_process(str(source), str(prepared))
        # U8S8 (uint8 activations, int8 weights): VNNI's instruction multiplies u8 by s8;
        # per-channel weights: each output channel its own scale, so a channel of small weights
        # is not rounded to a few levels by its layer's largest one
        quantize_static(str(prepared), str(out), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    finally:
        prepared.unlink(missing_ok=True)


def _openvino(source: Path, out: Path, crops: list | None) -> None:
    import openvino as ov

    model = ov.convert_model(str(source))
    if crops is None:
        ov.save_model(model, str(out), compress_to_fp16=True)
        return
    import nncf

    nncf.set_log_level(logging.ERROR)
    # The classifier head (the last MatMul) stays f32: quantized by NNCF it moved a small
    # constructed net's logits by 15 % of their range on this project's CPU (tests/
    # test_formats.py), and it is a few thousand weights of millions, no speed to win.
    heads = [op.get_friendly_name() for op in model.get_ordered_ops()
             if op.get_type_name() == "MatMul"]
    ignored = nncf.IgnoredScope(names=heads[-1:]) if heads else None
    quantized = nncf.quantize(model, nncf.Dataset(crops), subset_size=len(crops),
                              ignored_scope=ignored)
    ov.save_model(quantized, str(out), compress_to_fp16=False)


# Each format of stages.common.config.formats.FORMATS but the fp32 ONNX file, which export writes
# itself: (fp32 ONNX file, out path, calibration crops) -> the bare artifact (no metadata yet).
CONVERTERS: dict[str, Callable[[Path, Path, list], None]] = {
    "onnx_int8": _onnx_int8,
    "openvino_fp16": lambda source, out, crops: _openvino(source, out, None),
    "openvino_int8": _openvino,
}


def fmt(name: str) -> Format:
    if name not in FORMATS:
        raise StageError(f"export format {name!r} is not one of {', '.join(FORMATS)}; "
                         "fix export.formats in params.yaml")
    return FORMATS[name]


def single_crops(batches: Sequence) -> list:
    """Calibration batches (normalised float32 N x 3 x S x S) as batches of one crop: NNCF's
    statistics want batch 1, and ONNX Runtime's MinMax gives the same ranges either way."""
    import numpy as np

    return [np.ascontiguousarray(b[i:i + 1], np.float32) for b in batches for i in range(len(b))]


def build(name: str, onnx_fp32_path: Path, out_path: Path, calibration_batches: Sequence = (),
          point_for: Callable[[str], dict] | None = None) -> None:
    """Write format ``name`` at ``out_path`` from the sealed fp32 ONNX file ``onnx_fp32_path``,
    with its metadata; ``calibration_batches``: normalised float32 N x 3 x S x S crops (never
    test's) for a quantized format. ``point_for(digest)``: the operating point to embed, bound
    to the artifact's own digest (stages.common.alarm.calibration.embedded, as
    stages.common.model.onnx.export takes it; this room does not import the alarm's); None:
    none. A graph that fails to convert or quantize: one line naming it."""
    from stages.common.model.onnx import META_KEYS, verified_bytes

    row = fmt(name)
    onnx_fp32_path, out_path = Path(onnx_fp32_path), Path(out_path)
    if name not in CONVERTERS:
        raise StageError(f"export format {name!r} is the fp32 ONNX file export writes itself; "
                         "build converts from it")
    _, stored, _ = verified_bytes(onnx_fp32_path)
    crops = single_crops(calibration_batches) if row.calibrated else []
    if row.calibrated and not crops:
        raise StageError(f"export format {name} is quantized and needs calibration crops; "
                         "none were given")
    arch = parse_json(stored["arch"]) if "arch" in stored else "?"
    try:
        CONVERTERS[name](onnx_fp32_path, out_path, crops)
    except StageError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise StageError(f"export format {name}: the {arch} graph failed to "
                         f"{'quantize' if row.calibrated else 'convert'} ({type(exc).__name__}: "
                         f"{first}); leave {name} out of export.formats, or report the arch") \
            from None
    metadata = {k: stored[k] for k in META_KEYS}
    metadata[FORMAT_KEY] = json.dumps(name)
    _write_metadata(row, out_path, metadata, point_for)


def reseal(name: str, path: Path, point_for: Callable[[str], dict]) -> None:
    """Embed ``point_for(digest)`` (an operating point fitted for this very artifact) in the
    artifact of format ``name`` at ``path``, in place of the one it carries."""
    from stages.common.model.onnx import POINT_KEY, verified_bytes

    row = fmt(name)
    if row.runtime == "onnxruntime":
        _, stored, _ = verified_bytes(Path(path))
    else:
        _, _, stored, _ = verified_ir(Path(path))
    _write_metadata(row, Path(path), {k: v for k, v in stored.items() if k != POINT_KEY},
                    point_for)


def _write_metadata(row: Format, path: Path, metadata: dict[str, str],
                    point_for: Callable[[str], dict] | None) -> None:
    """The artifact at ``path`` with ``metadata`` (JSON text per key) and the point
    ``point_for`` gives for its graph's digest, sealed: ONNX metadata_props and digest, or an
    IR's sidecar."""
    from stages.common.model.checkpoint import DIGEST_KEY
    from stages.common.model.onnx import POINT_KEY, graph_digest, seal

    metadata = {k: v for k, v in metadata.items() if k != POINT_KEY}
    if row.runtime == "onnxruntime":
        import onnx

        proto = onnx.load(str(path))
        del proto.metadata_props[:]
        for key, value in metadata.items():
            proto.metadata_props.add(key=key, value=value)
        if point_for is not None:
            proto.metadata_props.add(key=POINT_KEY,
                                     value=json.dumps(point_for(graph_digest(proto))))
        path.write_bytes(seal(proto))
        return
    graph = ir_digest(path.read_bytes(), path.with_suffix(".bin").read_bytes())
    if point_for is not None:
        metadata[POINT_KEY] = json.dumps(point_for(graph))
    content = {"metadata": metadata, IR_KEY: graph}
    sidecar(path).write_text(json.dumps({**content, DIGEST_KEY: _content_digest(content)},
                                        indent=1) + "\n")


# ----- reading an IR back ---------------------------------------------------------------------

def ir_digest(xml: bytes, weights: bytes) -> str:
    """SHA-256 of an IR's graph and weights: of the two files' own SHA-256s."""
    return hashlib.sha256((hashlib.sha256(xml).hexdigest() + "\n"
                           + hashlib.sha256(weights).hexdigest()).encode()).hexdigest()


def _content_digest(content: dict) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def verified_ir(xml: Path) -> tuple[bytes, bytes, dict[str, str], str]:
    """The IR's ``.xml`` and ``.bin`` bytes, its metadata (JSON text per key, as an ONNX file's)
    and :func:`ir_digest`, once the sidecar matches its digest and the files match the
    sidecar; else one line."""
    from stages.common.model.checkpoint import DIGEST_KEY
    from stages.common.model.onnx import EXPORT_AGAIN

    xml = Path(xml)
    files = [xml, xml.with_suffix(".bin"), sidecar(xml)]
    for path in files:
        if not path.is_file():
            names = ", ".join(p.name for p in files)
            raise StageError(f"{path}: not found (an OpenVINO model is {names} together); "
                             f"{EXPORT_AGAIN}")
    try:
        card = parse_json(sidecar(xml).read_text())
    except (JsonProblem, UnicodeDecodeError) as exc:
        raise StageError(f"{sidecar(xml)}: cannot read it ({exc}); {EXPORT_AGAIN}") from None
    if not (isinstance(card, dict) and isinstance(card.get("metadata"), dict)
            and isinstance(card.get(DIGEST_KEY), str)):
        raise StageError(f"{sidecar(xml)}: not this project's sidecar (no metadata or "
                         f"{DIGEST_KEY}); {EXPORT_AGAIN}")
    content = {k: v for k, v in card.items() if k != DIGEST_KEY}
    if _content_digest(content) != card[DIGEST_KEY]:
        raise StageError(f"{sidecar(xml)}: its content does not match its {DIGEST_KEY}: damaged "
                         f"or edited; restore it, or {EXPORT_AGAIN}")
    graph, weights = xml.read_bytes(), xml.with_suffix(".bin").read_bytes()
    digest = ir_digest(graph, weights)
    if content.get(IR_KEY) != digest:
        raise StageError(f"{xml}: the .xml and .bin do not match {sidecar(xml).name}'s {IR_KEY}: "
                         f"damaged, altered or from another export; restore them, or "
                         f"{EXPORT_AGAIN}")
    metadata = content["metadata"]
    if not all(isinstance(v, str) for v in metadata.values()):
        raise StageError(f"{sidecar(xml)}: its metadata holds a value that is not JSON text; "
                         f"{EXPORT_AGAIN}")
    return graph, weights, metadata, digest
