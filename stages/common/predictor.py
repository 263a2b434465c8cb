"""Applying a trained classifier to pictures: shared by predict, export, evaluate and review.

A picture is prepared exactly as extract_crops prepares a training crop (OpenCV decode, aspect
ratio kept, padded with the median corner colour) but placed in the centre, not at a random spot,
so the answer for a file never changes. A crop that is already S x S passes through unchanged.
Then the checkpoint's own normalisation (stages.common.transforms.eval_transform).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from stages.common.crops import letterbox
from stages.common.model import check_logits, load_checkpoint
from stages.common.errors import StageError
from stages.common.pictures import (DEFAULT_MAX_IMAGE_PIXELS, describe, image_problem,
                                    read_header, square_side)
from stages.common.transforms import eval_transform

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class TorchClassifier:
    """A train-stage checkpoint in PyTorch eager on the CPU."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.model, meta = load_checkpoint(path)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.meta = {k: meta[k] for k in ("arch", "classes", "image_size", "mean", "std")}

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(batch, np.float32))
        return self.model(x.contiguous(memory_format=torch.channels_last)).float().numpy()


def load_classifier(path: str | Path, threads: int | None = None):
    """A ``.onnx`` file runs in ONNX Runtime; anything else must be a train-stage checkpoint."""
    if Path(path).suffix.lower() == ".onnx":
        from stages.common.onnx_model import OnnxClassifier

        return OnnxClassifier(path, threads)
    return TorchClassifier(path)


def read_image(path: Path, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """BGR uint8 pixels (OpenCV's decode, EXIF orientation applied: an operator's photo as
    taken). The file is refused before any decode, as extract_crops refuses its pictures, when
    its header says it is empty, not a picture, above ``max_pixels`` or cut off."""
    import cv2

    if not path.is_file():
        raise ValueError("file not found")
    data = path.read_bytes()
    header = read_header(data) if data else None
    problem = image_problem(data, header, max_pixels)
    if problem:
        raise ValueError(describe(problem, header, max_pixels))
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        raise ValueError(describe("decode_failed", header, max_pixels))
    return image


def prepare(image_bgr: np.ndarray, meta: dict) -> np.ndarray:
    """A centred letterbox of the checkpoint's size, RGB, normalised: float32 C x S x S."""
    import cv2

    canvas = letterbox(image_bgr, int(meta["image_size"]), rng=None)
    rgb = cv2.cvtColor(canvas, cv2.COLOR_BGR2RGB)
    return eval_transform(meta["mean"], meta["std"])(rgb).numpy()


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


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
    """Predictions in input order, each batch's as soon as it is classified. A file that cannot
    be used, for whatever reason its read or decode raises (OpenCV's errors, MemoryError,
    OSError), comes back with ``error`` set and the others go on."""
    pending: list[Prediction] = []
    arrays: list[np.ndarray] = []

    def flush() -> Iterator[Prediction]:
        if arrays:
            logits = classifier.logits(np.stack(arrays))
            check_logits(logits, len(arrays), len(classifier.meta["classes"]), classifier.path)
            probs = softmax(logits)
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


def labelled_folder(folder: Path, meta: dict, checkpoint: Path, transform=True):
    """An ImageFolder (``<label>/<file>``) whose class names must be the checkpoint's."""
    from torchvision.datasets import ImageFolder

    if not folder.is_dir():
        raise StageError(f"{folder}: not found; run the split stage first")
    ds = ImageFolder(str(folder),
                     transform=eval_transform(meta["mean"], meta["std"]) if transform else None)
    if ds.classes != meta["classes"]:
        raise StageError(f"{checkpoint} was trained on classes {meta['classes']} but {folder} "
                         f"holds {ds.classes}; retrain or re-split")
    if len(ds) == 0:
        raise StageError(f"{folder}: no images")
    first = ds.samples[0][0]
    side = square_side(first)
    if side != meta["image_size"]:
        raise StageError(f"{checkpoint} was trained on {meta['image_size']}x{meta['image_size']} "
                         f"crops but {first} is {side}x{side}; retrain or rerun "
                         "extract_crops with the same crops.size")
    return ds
