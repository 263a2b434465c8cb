"""ONNX: export a checkpoint with a dynamic batch axis, and run an exported model in ONNX Runtime.

The exported file carries the checkpoint's arch, class names, image size and normalisation in its
metadata, so ``stages.predict --model model.onnx`` needs nothing but that one file.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stages.common.params import StageError

INPUT, OUTPUT = "images", "logits"
META_KEYS = ("arch", "classes", "image_size", "mean", "std")  # values stored as JSON text


def export(model: nn.Module, meta: dict, path: Path, opset: int) -> None:
    """Write ``model`` (eval mode) to ``path`` as one self-contained ONNX file, batch axis dynamic.

    torch's export-based exporter (``dynamo=True``, torch's default; the TorchScript one is
    deprecated). Same model and opset give the same bytes wherever the project and its
    virtual environment live: no paths or times in the file (see :func:`strip_paths`).
    """
    size = int(meta["image_size"])
    example = torch.zeros(2, 3, size, size)  # 2, not 1: a batch of 1 would be specialised away
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # the exporter prints its progress; keep it quiet
            program = torch.onnx.export(
                model.eval(), (example,), dynamo=True, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    except Exception as exc:
        raise StageError(f"ONNX export of {meta['arch']} at opset {opset} failed "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                         "try another export.opset") from None
    for key in META_KEYS:
        program.model.metadata_props[key] = json.dumps(meta[key])
    strip_paths(program.model)
    program.save(str(path), external_data=False)


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


class OnnxClassifier:
    """An exported model in ONNX Runtime on the CPU: ``logits(batch NCHW float32) -> ndarray``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = path = Path(path)
        if not path.is_file():
            raise StageError(f"{path}: ONNX model not found; run `dvc repro export` first")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        # ORT's idle threads otherwise busy-wait after each run and steal the CPU from whatever
        # runs next (PyTorch, in export's side-by-side timing: 30x slower there).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise StageError(f"{path}: not a loadable ONNX model ({type(exc).__name__}); "
                             "export it again with `python -m stages.export`") from None
        stored = self.session.get_modelmeta().custom_metadata_map
        missing = [k for k in META_KEYS if k not in stored]
        if missing:
            raise StageError(f"{path}: ONNX metadata lacks {', '.join(missing)}; "
                             "export it with `python -m stages.export`")
        self.meta = {k: json.loads(stored[k]) for k in META_KEYS}

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, np.float32)})[0]
