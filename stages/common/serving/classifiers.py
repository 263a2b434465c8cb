"""A model file that answers logits: a train-stage checkpoint in PyTorch (:class:`TorchClassifier`),
an exported ONNX model (fp32 or int8) in ONNX Runtime (:class:`OnnxClassifier`) or an OpenVINO IR
(:class:`OpenVinoClassifier`; stages.common.model.formats), each with the operating point fitted
for it; shared by predict, export and review.

Each takes uint8 RGB N x 3 x S x S pixels (``classify``, an array) and normalises them as every
crop is (stages.common.inference.batches.normalise; the exported ones without torch, the same
floats: :func:`normalise_array`). torch is imported only by :class:`TorchClassifier`: an ONNX
file answers on a box with no PyTorch installed (the edge runtime, requirements-edge.txt).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from stages.common.alarm.point import OperatingPoint, UnusablePoint, beside
from stages.common.config.paths import OPERATING_POINT
from stages.common.infra.errors import StageError
from stages.common.infra.jsonfile import JsonProblem, parse_json
from stages.common.model.checkpoint import ModelMeta
from stages.common.model.formats import verified_ir
from stages.common.model.onnx import (EXPORT_AGAIN, INPUT, META_KEYS, OUTPUT, POINT_KEY,
                                      verified_bytes)

# The CPU threads predict runs a model on unless told (its --threads). None: the runtime's own
# default, one per physical core. Their idle threads must not spin (ONNX Runtime's
# allow_spinning 0 below, OMP_WAIT_POLICY=PASSIVE in predict): then, on a box whose cores also
# decode video, they answered as fast as one thread or faster (BENCHMARKS.md section 11).
DEFAULT_THREADS = None

if TYPE_CHECKING:
    import torch


class TorchClassifier:
    """A train-stage checkpoint in PyTorch eager, on ``device`` (the CPU by default); with
    ``threads``, its passes run on that many CPU threads (PyTorch's setting is the process's:
    set for each pass and put back, so a caller in the same process keeps its own)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu",
                 threads: int | None = None):
        import torch

        from stages.common.model.build import load_checkpoint

        self.threads = threads
        self.path = Path(path)
        self.device = torch.device(device)
        self.model, meta = load_checkpoint(path)
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        self.meta = meta
        self.operating_point = beside(self.path, OPERATING_POINT)

    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised float32 N x 3 x S x S (an array, or a tensor on any device) -> logits."""
        import torch

        from stages.common.model.device import torch_threads

        with torch.inference_mode():
            if isinstance(batch, np.ndarray):
                batch = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
            x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
            with torch_threads(self.threads):
                return self.model(x).float().cpu().numpy()

    def classify(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 RGB N x 3 x S x S -> logits, normalised on the model's device."""
        import torch

        from stages.common.inference.batches import normalise

        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(pixels)
        return self.logits(normalise(pixels.to(self.device), self.meta.mean, self.meta.std))


def load_classifier(path: str | Path, threads: int | None = None,
                    device: torch.device | str = "cpu"):
    """A ``.onnx`` file runs in ONNX Runtime, an ``.xml`` (OpenVINO IR) in OpenVINO, both on
    the CPU; anything else must be a train-stage checkpoint, run by PyTorch on ``device``.
    ``threads``: the CPU threads the runtime uses (None: its own default, one per physical
    core)."""
    runtime = EXPORTED.get(Path(path).suffix.lower())
    if runtime is None:
        return TorchClassifier(path, device, threads)
    kind = getattr(device, "type", device)
    if kind != "cpu":
        raise StageError(f"{path}: an exported model runs on the CPU here (ONNX Runtime's and "
                         f"OpenVINO's CPU builds); use --device cpu, or the .pt checkpoint on "
                         f"{kind}")
    return runtime(path, threads)


def read_metadata(path: Path, stored: dict[str, str], graph_sha256: str,
                  what: str = "ONNX metadata") -> tuple[ModelMeta, OperatingPoint | None]:
    """An exported model's record and operating point from its metadata entries (JSON text
    each: ONNX metadata_props, or an IR's sidecar, ``what`` names which); the point must name
    ``graph_sha256``."""
    missing = [k for k in META_KEYS if k not in stored]
    if missing:
        raise StageError(f"{path}: {what} lacks {', '.join(missing)}; {EXPORT_AGAIN}")
    values = {}
    for key in META_KEYS:
        try:
            values[key] = parse_json(stored[key])
        except JsonProblem as exc:
            raise StageError(f"{path}: {what} {key} is not usable ({exc}); the file "
                             f"is damaged or not one this project wrote; {EXPORT_AGAIN}") \
                from None
    meta = ModelMeta.read(path, values, META_KEYS)
    if POINT_KEY not in stored:  # a file exported without one
        return meta, None
    try:
        return meta, OperatingPoint.parse(parse_json(stored[POINT_KEY]), embedded=True,
                                          graph_sha256=graph_sha256,
                                          source=f"{path} (embedded)")
    except (JsonProblem, UnusablePoint) as exc:
        raise StageError(f"{path}: {what} {POINT_KEY} is not usable ({exc}); "
                         f"{EXPORT_AGAIN}") from None


def normalise_array(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]
                    ) -> np.ndarray:
    """uint8 B x 3 x S x S -> float32, the floats of batches.normalise bit for bit (tested on
    every value of every channel): each channel's 256 results, computed once as it computes
    them (x / 255, then (x - mean) / std, in float32), looked up for every pixel."""
    levels = np.arange(256, dtype=np.float32) / np.float32(255)
    m = np.asarray(mean, np.float32)[:, None]
    s = np.asarray(std, np.float32)[:, None]
    table = (levels[None, :] - m) / s  # channel x level
    channels = np.arange(len(m), dtype=np.intp)[None, :, None, None]
    return table[channels, pixels]


class OnnxClassifier:
    """An exported model in ONNX Runtime on the CPU: ``logits(batch NCHW float32) -> ndarray``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        # here, not at the top: ONNX Runtime only for a .onnx file (predict with a .pt never
        # loads it)
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
        # ONNX Runtime gets the very bytes that were verified, not the file a second time.
        data, stored, graph_sha256 = verified_bytes(path)
        self.meta, self.operating_point = read_metadata(path, stored, graph_sha256)
        try:
            self.session = ort.InferenceSession(data, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise StageError(f"{path}: not a loadable ONNX model ({type(exc).__name__}); "
                             f"{EXPORT_AGAIN}") from None

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(batch, np.float32)})[0]

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB N x 3 x S x S -> logits, normalised as every crop is."""
        return self.logits(normalise_array(pixels, self.meta.mean, self.meta.std))


class OpenVinoClassifier:
    """An OpenVINO IR (``.xml`` + ``.bin`` + sidecar ``.json``: stages.common.model.formats) on
    the CPU, computed in f32 (fp16 weights are widened): ``logits(batch NCHW float32)``."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import openvino as ov

        self.path = path = Path(path)
        graph, weights, stored, digest = verified_ir(path)
        self.meta, self.operating_point = read_metadata(path, stored, digest,
                                                            "OpenVINO sidecar metadata")
        core = ov.Core()
        # f32, not the CPU's default hint: on a CPU with AMX it would run bf16, and the alarm
        # export certified would not be the one that runs
        config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        try:  # OpenVINO gets the very bytes that were verified, not the files a second time
            model = core.read_model(graph.decode(), ov.Tensor(np.frombuffer(weights, np.uint8)))
            self.compiled = core.compile_model(model, "CPU", config)
        except Exception as exc:
            raise StageError(f"{path}: not a loadable OpenVINO model ({type(exc).__name__}); "
                             f"{EXPORT_AGAIN}") from None

    def logits(self, batch: np.ndarray) -> np.ndarray:
        return self.compiled(np.ascontiguousarray(batch, np.float32))[0]

    def classify(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 RGB N x 3 x S x S -> logits, normalised as every crop is."""
        return self.logits(normalise_array(pixels, self.meta.mean, self.meta.std))


# Exported models by file suffix (stages.common.model.formats.FORMATS names each file).
EXPORTED = {".onnx": OnnxClassifier, ".xml": OpenVinoClassifier}
