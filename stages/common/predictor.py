"""Applying a trained classifier to pictures: shared by predict, export, evaluate and review.

A picture is prepared exactly as extract_crops prepares a training crop (the same decoder,
with the EXIF orientation applied; aspect ratio kept, padded with the median corner colour) but
placed in the centre, not at a random spot, so the answer for a file never changes. A crop that
is already S x S passes through unchanged. The batch is then normalised as every crop is
(stages.common.batches.normalise), on the device the model runs on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from stages.common import pictures
from stages.common.batches import CropSet, batch_len, batches, normalise
from stages.common.calibration import beside, softmax
from stages.common.crops import letterbox
from stages.common.errors import StageError
from stages.common.inference import predict
from stages.common.model import check_logits, load_checkpoint
from stages.common.pictures import DEFAULT_MAX_IMAGE_PIXELS
from stages.common.progress import tracked

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class TorchClassifier:
    """A train-stage checkpoint in PyTorch eager, on ``device`` (the CPU by default)."""

    def __init__(self, path: str | Path, device: torch.device = torch.device("cpu")):
        self.path = Path(path)
        self.device = device
        self.model, meta = load_checkpoint(path)
        self.model = self.model.to(device, memory_format=torch.channels_last)
        self.meta = {k: meta[k] for k in ("arch", "classes", "image_size", "mean", "std")}
        self.operating_point = beside(self.path)

    @torch.inference_mode()
    def logits(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised float32 N x 3 x S x S (an array, or a tensor on any device) -> logits."""
        if isinstance(batch, np.ndarray):
            batch = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        x = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        return self.model(x).float().cpu().numpy()

    def classify(self, pixels: torch.Tensor) -> np.ndarray:
        """uint8 RGB N x 3 x S x S -> logits, normalised on the model's device."""
        return self.logits(normalise(pixels.to(self.device), self.meta["mean"], self.meta["std"]))


def load_classifier(path: str | Path, threads: int | None = None,
                    device: torch.device = torch.device("cpu")):
    """A ``.onnx`` file runs in ONNX Runtime (the CPU); anything else must be a train-stage
    checkpoint, run by PyTorch on ``device``."""
    if Path(path).suffix.lower() == ".onnx":
        from stages.common.onnx_model import OnnxClassifier

        if device.type != "cpu":
            raise StageError(f"{path}: an ONNX model runs on the CPU here (ONNX Runtime's CPU "
                             "build); use --device cpu, or the .pt checkpoint on "
                             f"{device.type}")
        return OnnxClassifier(path, threads)
    return TorchClassifier(path, device)


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """BGR uint8 pixels, EXIF orientation applied (an operator's photo as taken). The file is
    refused before any decode, as extract_crops refuses its pictures, when its header says it
    is empty, not a picture, above ``max_pixels`` or cut off."""
    if not path.is_file():
        raise ValueError("file not found")
    data = path.read_bytes()
    header, problem = pictures.examine(data, max_pixels)
    if problem:
        raise ValueError(pictures.describe(problem, header, max_pixels))
    try:
        return pictures.decode(data, 1, pictures.EXIF, pictures.BGR, checked=True)
    except pictures.Undecodable:
        raise ValueError(pictures.describe("decode_failed", header, max_pixels)) from None


def prepare(image_bgr: np.ndarray, meta: dict) -> torch.Tensor:
    """A centred letterbox of the checkpoint's size: uint8 RGB, 3 x S x S."""
    import cv2

    canvas = letterbox(image_bgr, int(meta["image_size"]), rng=None)
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    return torch.from_numpy(rgb).permute(2, 0, 1)


def expand(inputs: Iterable[str | Path]) -> list[tuple[Path, str | None]]:
    """(path, error) per input: files as given, folders walked (sorted, image suffixes only)."""
    out: list[tuple[Path, str | None]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                out.append((path, "folder holds no images (" +
                            ", ".join(sorted(IMAGE_SUFFIXES)) + ")"))
            out.extend((p, None) for p in found)
        elif path.exists():
            out.append((path, None))
        else:
            out.append((path, "file not found"))
    return out


@dataclass
class Prediction:
    path: Path
    probs: np.ndarray | None = None  # one probability per class, checkpoint order
    logits: np.ndarray | None = None
    error: str | None = None


def file_error(exc: Exception) -> str:
    """One file's failure in one line: our own reasons as they are, anything else by type."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    first = text.strip().splitlines()[0][:200] if text.strip() else ""
    if type(exc) is ValueError:  # read_image's own reasons
        return first
    return f"cannot read the file ({type(exc).__name__}{': ' + first if first else ''})"


def predict_paths(classifier, items: list[tuple[Path, str | None]], batch_size: int = 32,
                  max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Iterator[Prediction]:
    """Predictions in input order, each batch's as soon as it is classified; probabilities are
    calibrated by the classifier's operating point (``softmax(logits / temperature)``; T = 1
    without one). A file that cannot be used, for whatever reason its read
    or decode raises (OpenCV's errors, MemoryError, OSError), comes back with ``error`` set and
    the others go on."""
    point = getattr(classifier, "operating_point", None)
    temperature = point["temperature"] if point else 1.0
    pending: list[Prediction] = []
    arrays: list[torch.Tensor] = []

    def flush() -> Iterator[Prediction]:
        if arrays:
            logits = classifier.classify(torch.stack(arrays))
            check_logits(logits, len(arrays), len(classifier.meta["classes"]), classifier.path)
            probs = softmax(logits, temperature)
            k = 0
            for p in pending:
                if p.error is None:
                    p.logits, p.probs = logits[k], probs[k]
                    k += 1
        yield from pending
        pending.clear()
        arrays.clear()

    for path, error in items:
        result = Prediction(path, error=error)
        if error is None:
            try:
                arrays.append(prepare(read_image(path, max_pixels), classifier.meta))
            except Exception as exc:  # this file's answer, never the run's
                result.error = file_error(exc)
        pending.append(result)
        if len(arrays) >= batch_size:
            yield from flush()
    yield from flush()


def checked_crops(folder: Path, meta: dict, checkpoint: Path, device: torch.device,
                  workers: int = 0, keep: str | None = None) -> CropSet:
    """A labelled split (``<label>/<crop>``) decoded once, whose class names and crop size must
    be the checkpoint's."""
    crops = CropSet.load(folder, device, workers, keep=keep)
    if crops.classes != meta["classes"]:
        raise StageError(f"{checkpoint} was trained on classes {meta['classes']} but {folder} "
                         f"holds {crops.classes}; retrain or re-split")
    if crops.size != meta["image_size"]:
        raise StageError(f"{checkpoint} was trained on {meta['image_size']}x{meta['image_size']} "
                         f"crops but {crops.paths[0]} is {crops.size}x{crops.size}; retrain or "
                         "rerun extract_crops with the same crops.size")
    return crops


def labelled_logits(model: torch.nn.Module, meta: dict, folder: Path, checkpoint: Path,
                    device: torch.device, batch_size: int, what: str
                    ) -> tuple[CropSet, np.ndarray, np.ndarray]:
    """(the crops, logits, targets) of a labelled split under ``model`` (already on ``device``),
    with progress lines named ``what``; calibrate runs it on val, evaluate on test."""
    crops = checked_crops(folder, meta, checkpoint, device)
    order = torch.arange(len(crops))
    logits, targets = predict(model, tracked(batches(crops, order, batch_size, device,
                                                     meta["mean"], meta["std"]),
                                             what, len(crops), size=batch_len), device)
    check_logits(logits, len(crops), len(meta["classes"]), checkpoint)
    return crops, logits.numpy(), targets.numpy()
