"""ONNX: export a checkpoint with a dynamic batch axis, seal the file, verify a sealed file.

The exported file carries the checkpoint's arch, class names, image size and normalisation in its
metadata, and calibrate's temperature and person threshold (``operating_point``, under its own
seal and bound to the SHA-256 of the file's graph and weights, checked on load:
stages.common.alarm.point), so
``stages.predict --model model.onnx`` needs nothing but that one file. It also
carries ``weights_sha256``: the SHA-256 of the file's model (deterministic protobuf
serialisation) without that entry, written by :func:`export` and checked by
:func:`verified_bytes` (for stages.common.serving.classifiers.OnnxClassifier) before ONNX
Runtime sees the bytes (one flipped bit in a weight answered
"object 1.000000"). A file without it, or whose content does not match it, is refused in one line.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stages.common.infra.errors import StageError
from stages.common.model.checkpoint import DIGEST_KEY, ModelMeta

# onnx and onnx_ir are imported where used, not here: over a second of start-up that predict
# with a .pt checkpoint (which imports this module through its classifiers) never needs.

INPUT, OUTPUT = "images", "logits"
META_KEYS = ("arch", "classes", "image_size", "mean", "std")  # values stored as JSON text
POINT_KEY = "operating_point"  # calibrate's temperature and person threshold, as JSON text
EXPORT_AGAIN = "export it again with `dvc repro export` (or python -m stages.export)"


def export(model: nn.Module, meta: ModelMeta, path: Path, opset: int,
           point_for: Callable[[str], dict] | None = None) -> None:
    """Write ``model`` (eval mode) to ``path`` as one self-contained ONNX file, batch axis dynamic.

    ``point_for(graph_sha256)``: the operating point to embed, bound to the file's graph and
    weights (:func:`graph_digest`; stages.common.alarm.point.embedded), so a point carried
    into another model file is refused even when that file's own digest is recomputed around
    it. A callable: that digest exists only once the graph is written.

    torch's export-based exporter (``dynamo=True``, torch's default; the TorchScript one is
    deprecated). Same model and opset give the same bytes wherever the project and its
    virtual environment live: no paths or times in the file (see :func:`strip_paths`).
    """
    size = meta.image_size
    example = torch.zeros(2, 3, size, size)  # 2, not 1: a batch of 1 would be specialised away
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the exporter prints its progress; keep it quiet
            program = torch.onnx.export(
                model.eval(), (example,), dynamo=True, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as exc:
        raise StageError(f"ONNX export of {meta.arch} at opset {opset} failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "try another export.opset") from None
    for key in META_KEYS:
        program.model.metadata_props[key] = json.dumps(getattr(meta, key))
    strip_paths(program.model)
    program.save(str(path), external_data=False)
    import onnx

    proto = onnx.load(str(path))
    if point_for is not None:
        proto.metadata_props.add(key=POINT_KEY, value=json.dumps(point_for(graph_digest(proto))))
    path.write_bytes(seal(proto))


def model_digest(proto) -> str:
    """SHA-256 of ``proto`` (an onnx.ModelProto without a digest entry), serialised
    deterministically."""
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def graph_digest(proto) -> str:
    """SHA-256 of ``proto`` without any metadata: its graph and weights alone, what the
    embedded operating point is bound to (stages.common.alarm.point.GRAPH_KEY)."""
    bare = type(proto)()
    bare.CopyFrom(proto)
    del bare.metadata_props[:]
    return model_digest(bare)


def _take_digests(proto) -> list[str]:
    """Remove the digest entries from ``proto``'s metadata, the others kept in order; return
    the removed values."""
    entries = [(p.key, p.value) for p in proto.metadata_props]
    del proto.metadata_props[:]
    for key, value in entries:
        if key != DIGEST_KEY:
            proto.metadata_props.add(key=key, value=value)
    return [value for key, value in entries if key == DIGEST_KEY]


def seal(proto) -> bytes:
    """The bytes of ``proto`` with its digest entry (replacing any) appended to its metadata."""
    _take_digests(proto)
    proto.metadata_props.add(key=DIGEST_KEY, value=model_digest(proto))
    return proto.SerializeToString(deterministic=True)


def verified_bytes(path: Path) -> tuple[bytes, dict[str, str], str]:
    """The file's bytes, metadata and :func:`graph_digest`, once its content matches its
    digest; else one line."""
    import onnx
    from google.protobuf.message import DecodeError

    data = path.read_bytes()
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError):
        raise StageError(f"{path}: not a loadable ONNX model (not an ONNX protobuf); "
                         f"{EXPORT_AGAIN}") from None
    stored = _take_digests(proto)
    if len(stored) != 1:
        raise StageError(f"{path}: has no weights digest (exported before models carried one, "
                         f"or not by this project), so its integrity cannot be checked; "
                         f"{EXPORT_AGAIN}")
    metadata = {p.key: p.value for p in proto.metadata_props}
    if model_digest(proto) != stored[0]:
        raise StageError(f"{path}: its content does not match its weights digest: the file is "
                         f"damaged (a flipped bit, a bad copy) or was altered; restore it, or "
                         f"{EXPORT_AGAIN}")
    return data, metadata, graph_digest(proto)


# Debug metadata torch's exporter puts on each node: the Python stack that produced it, with the
# absolute paths of torch and torchvision in the exporting machine's virtual environment. It
# made the file's bytes (and DVC's hash of data/export) differ between two clones, and would
# carry a user's home folder into a model file handed to others. The rest (module names, FX
# node text) holds no paths and stays.
STACK_TRACE = "pkg.torch.onnx.stack_trace"


def strip_paths(model) -> None:
    """Remove the stack traces from every node of ``model`` (an onnx_ir Model), subgraphs and
    functions included."""
    from onnx_ir.traversal import RecursiveGraphIterator

    for graph in [model.graph, *model.functions.values()]:
        for node in RecursiveGraphIterator(graph):
            node.metadata_props.pop(STACK_TRACE, None)
