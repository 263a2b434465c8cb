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

Reading a sealed file needs neither torch nor the onnx package (whose import alone is most of a
second): :func:`verified_bytes` walks the protobuf wire format of the file's top level, which a
file written by :func:`seal` holds in the very order its deterministic serialisation writes, so
the digests read there are :func:`model_digest` and :func:`graph_digest` (tested). The edge
runtime (requirements-edge.txt) answers from a .onnx file with this module and ONNX Runtime.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stages.common.infra.errors import StageError
from stages.common.model.checkpoint import DIGEST_KEY, ModelMeta

if TYPE_CHECKING:
    from torch import nn

# torch, onnx and onnx_ir are imported where used, not here: seconds of start-up that predict
# never needs (the edge runtime has none of them installed).

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
    import torch

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
    data = path.read_bytes()
    try:
        fields = _top_fields(data)
        entries = [(_entry(data[start:end]), start, end) for number, start, end in fields
                   if number == METADATA_FIELD]
    except ValueError:
        raise StageError(f"{path}: not a loadable ONNX model (not an ONNX protobuf); "
                         f"{EXPORT_AGAIN}") from None
    stored = [value for (key, value), _, _ in entries if key == DIGEST_KEY]
    if len(stored) != 1:
        raise StageError(f"{path}: has no weights digest (exported before models carried one, "
                         f"or not by this project), so its integrity cannot be checked; "
                         f"{EXPORT_AGAIN}")
    metadata = {key: value for (key, value), _, _ in entries if key != DIGEST_KEY}
    # The file less the digest entry is the model seal() hashed; less every entry, the bare
    # graph_digest hashes: a removed field's bytes are all it changes in either serialisation.
    # Both share the bytes before the first entry (the graph: nearly all of them), hashed once.
    head = entries[0][1]
    unsealed = hashlib.sha256(memoryview(data)[:head])
    bare = unsealed.copy()
    for digest, cut in ((unsealed, [(s, e) for (key, _), s, e in entries if key == DIGEST_KEY]),
                        (bare, [(s, e) for _, s, e in entries])):
        for start, end in _kept(head, len(data), cut):
            digest.update(memoryview(data)[start:end])
    if unsealed.hexdigest() != stored[0]:
        raise StageError(f"{path}: its content does not match its weights digest: the file is "
                         f"damaged (a flipped bit, a bad copy) or was altered; restore it, or "
                         f"{EXPORT_AGAIN}")
    return data, metadata, bare.hexdigest()


METADATA_FIELD = 14  # ModelProto.metadata_props: repeated StringStringEntryProto (key 1, value 2)
VARINT, FIXED64, LENGTH, FIXED32 = 0, 1, 2, 5  # protobuf wire types (3, 4: groups, unused)


def _varint(data: bytes, at: int) -> tuple[int, int]:
    """(value, position after it) of the varint at ``at``."""
    value = shift = 0
    while True:
        if at >= len(data) or shift > 63:
            raise ValueError("cut-off or overlong varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(number, wire type, start, payload start, end) of each field of one message."""
    out, at = [], 0
    while at < len(data):
        start = at
        tag, at = _varint(data, at)
        number, kind = tag >> 3, tag & 7
        if number == 0:
            raise ValueError("field number 0")
        if kind == VARINT:
            _, end = _varint(data, at)
        elif kind == LENGTH:
            size, at = _varint(data, at)
            end = at + size
        elif kind in (FIXED64, FIXED32):
            end = at + (8 if kind == FIXED64 else 4)
        else:
            raise ValueError(f"wire type {kind}")
        if end > len(data):
            raise ValueError("cut off")
        out.append((number, kind, start, at, end))
        at = end
    return out


def _top_fields(data: bytes) -> list[tuple[int, int, int]]:
    """(number, start, end) of each top-level field of a serialised ModelProto; a metadata
    entry must be length-delimited."""
    fields = _fields(data)
    if any(number == METADATA_FIELD and kind != LENGTH for number, kind, *_ in fields):
        raise ValueError("metadata_props is not a message")
    return [(number, start, end) for number, _, start, _, end in fields]


def _entry(field: bytes) -> tuple[str, str]:
    """(key, value) of one serialised metadata_props field (its tag included); as protobuf
    reads it, a missing string is empty and the last of repeated ones counts."""
    _, at = _varint(field, 0)  # the tag
    _, at = _varint(field, at)  # the length: the rest of the field
    body = field[at:]
    text = {1: "", 2: ""}
    for number, kind, _, start, end in _fields(body):
        if number in text:
            if kind != LENGTH:
                raise ValueError("a key or value that is not a string")
            text[number] = body[start:end].decode("utf-8")  # a UnicodeDecodeError: ValueError
    return text[1], text[2]


def _kept(start: int, end: int, cut: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges of [``start``, ``end``) left once the ranges ``cut`` (in order,
    disjoint, inside it) are taken out."""
    out = []
    for a, b in cut:
        out.append((start, a))
        start = b
    return out + [(start, end)]


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
