"""Crops to model input in whole batches: decoded once, normalised, on the device that runs the model.

One data path for train (train and val crops), evaluate and export (test crops): :class:`CropSet`
reads a labelled split (ImageFolder layout, ``<label>/<crop>``) and decodes every crop ONCE into
uint8 RGB pixels, kept where they are cheapest to reach:

- in GPU memory on CUDA, when they fit in :data:`DEVICE_SHARE` of the free memory (41,000 crops
  of 224 px are 6.2 GB; an H200 holds them with room to spare), decoded there by nvJPEG;
- else in host memory (page-locked on CUDA, so each batch is copied without blocking), when they
  fit in :data:`HOST_SHARE` of the available RAM;
- else nowhere: each batch decodes its crops again (``streamed``), so any size of split trains.

:func:`normalise` turns uint8 pixels into the model's input with the same float operations as
torchvision's ``ToTensor`` + ``Normalize`` (divide by 255, subtract the mean, divide by the
std), so evaluate's scores are those of the per-image transforms, bit for bit.

Decoding on the CPU is libjpeg-turbo (simplejpeg: the same pixels as PIL, tested), in a pool of
threads; on CUDA, JPEGs are decoded in batches by nvJPEG on the GPU (torchvision.io; pixels may
differ from libjpeg's by a level here and there: another IDCT).
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import torch
from torchvision.datasets import ImageFolder

from stages.common.infra.errors import StageError
from stages.common.pictures import decode as pictures

with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; nvJPEG still works
    warnings.simplefilter("ignore", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg

# Shares of free memory a decoded split may take (the model, its activations and the optimizer
# need the rest).
DEVICE_SHARE = 0.5
HOST_SHARE = 0.5
NVJPEG_BATCH = 512  # JPEGs per batched GPU decode call


def threads_for(workers: int) -> int:
    """Threads that decode or prepare crops: ``workers`` (a param), at least one."""
    return max(1, workers)


def read_bytes(path: str) -> torch.Tensor:
    with open(path, "rb") as f:
        data = f.read()
    # torch.frombuffer refuses an empty buffer: an empty file is decode_rgb's to name.
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else \
        torch.empty(0, dtype=torch.uint8)


def decode_rgb(data: torch.Tensor) -> torch.Tensor:
    """One crop file's bytes -> uint8 RGB, 3 x H x W, on the CPU (stages.common.pictures.decode: a
    JPEG by libjpeg-turbo, PIL's pixels, tested; anything else by OpenCV). Unchecked bytes: no
    header parse per crop, and a damaged crop is refused, never papered over."""
    raw = data.numpy()
    if raw.size == 0:
        raise ValueError("empty file (0 bytes: a damaged copy)")
    try:
        rgb = pictures.decode(raw, 1, pictures.STORED, pictures.RGB, checked=False)
    except (ValueError, cv2.error) as exc:  # pictures.Undecodable is a ValueError
        raise ValueError(f"cannot decode ({str(exc).splitlines()[0][:120]})") from None
    return torch.from_numpy(rgb).permute(2, 0, 1)


def decode_files(paths: Sequence[str], device: torch.device, threads: int) -> torch.Tensor:
    """Every file decoded, N x 3 x S x S uint8 on ``device`` (nvJPEG batches on CUDA)."""
    with ThreadPoolExecutor(threads) as pool:
        datas = list(pool.map(read_bytes, paths))
        if device.type == "cuda":
            return _decode_on_gpu(datas, paths, device, pool)
        return torch.stack(list(pool.map(_decode_checked, datas, paths)))


def _decode_checked(data: torch.Tensor, path: str) -> torch.Tensor:
    try:
        return decode_rgb(data)
    except ValueError as exc:
        raise StageError(f"{path}: {exc}; rerun extract_crops and split") from None


def _decode_on_gpu(datas: list[torch.Tensor], paths: Sequence[str], device: torch.device,
                   pool: ThreadPoolExecutor) -> torch.Tensor:
    out: list[torch.Tensor | None] = [None] * len(datas)
    jpeg = [i for i, d in enumerate(datas) if bytes(d[:2].tolist()) == pictures.JPEG_MAGIC]
    for start in range(0, len(jpeg), NVJPEG_BATCH):
        part = jpeg[start:start + NVJPEG_BATCH]
        for i, image in zip(part, decode_jpeg([datas[i] for i in part], mode=ImageReadMode.RGB,
                                              device=device)):
            out[i] = image
    rest = [i for i in range(len(datas)) if out[i] is None]  # PNG and the like: on the CPU
    for i, image in zip(rest, pool.map(_decode_checked, [datas[i] for i in rest],
                                       [paths[i] for i in rest])):
        out[i] = image.to(device)
    return torch.stack(out)  # type: ignore[arg-type]


def available_ram() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def where_to_keep(nbytes: int, device: torch.device) -> str:
    """'device', 'host' or 'stream': where a decoded split of ``nbytes`` is kept."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if nbytes <= DEVICE_SHARE * free:
            return "device"
    ram = available_ram()
    if ram is None or nbytes <= HOST_SHARE * ram:
        return "host"
    return "stream"


@dataclass
class CropSet:
    """The crops of one labelled split, their labels, and their pixels where they are kept.

    ``pixels``: N x 3 x S x S uint8 on ``device`` ('device'), or on the CPU ('host'; pinned on
    CUDA), or None ('stream': :meth:`take` decodes the batch's files).
    """
    paths: list[str]
    targets: torch.Tensor  # int64, beside the pixels (on the CPU when streamed)
    classes: list[str]
    size: int
    pixels: torch.Tensor | None
    kept: str
    threads: int

    @classmethod
    def load(cls, folder: Path, device: torch.device, workers: int = 0,
             keep: str | None = None, pin: bool = True) -> "CropSet":
        """Decode the split at ``folder`` (its class folders, ImageFolder's order) once.
        ``keep`` forces where ('device', 'host', 'stream'); by default, by size. ``pin``: on
        CUDA, a host copy is page-locked (copied to the GPU without blocking)."""
        if not folder.is_dir():
            raise StageError(f"{folder}: not found; run the split stage first")
        try:
            listing = ImageFolder(str(folder))
        except (FileNotFoundError, RuntimeError) as exc:
            raise StageError(f"{folder}: no usable images ({exc})") from None
        paths = [p for p, _ in listing.samples]
        size = pictures.square_side(paths[0])
        threads = threads_for(workers)
        kept = keep or where_to_keep(len(paths) * 3 * size * size, device)
        pixels = None
        if kept != "stream":
            pixels = decode_files(paths, device if kept == "device" else torch.device("cpu"),
                                  threads)
            if pixels.shape[1:] != (3, size, size):
                raise StageError(f"{folder}: crops of more than one size "
                                 f"({tuple(pixels.shape[2:])} and {size}); rerun extract_crops")
            if kept == "host" and device.type == "cuda" and pin:
                pixels = pixels.pin_memory()
        targets = torch.tensor([t for _, t in listing.samples], dtype=torch.long)
        if kept == "device":
            targets = targets.to(device)
        return cls(paths, targets, listing.classes, size, pixels, kept, threads)

    def __len__(self) -> int:
        return len(self.paths)

    def take(self, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The uint8 pixels of ``indices`` (B x 3 x S x S) on ``device``."""
        if self.pixels is None:
            pixels = decode_files([self.paths[i] for i in indices.tolist()],
                                  torch.device("cpu"), self.threads)
        else:
            pixels = self.pixels[indices.to(self.pixels.device)]
        return pixels.to(device, non_blocking=True)


def normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (or float in [0, 1]) B x 3 x S x S -> the model's input, channels_last.

    The operations of torchvision's ToTensor + Normalize, in their order and precision: x / 255,
    then (x - mean) / std in float32, so the values are theirs bit for bit."""
    x = pixels.float().div(255) if pixels.dtype == torch.uint8 else pixels.float()
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return x.sub_(m).div_(s).contiguous(memory_format=torch.channels_last)


def batches(crops: CropSet, order: torch.Tensor, batch_size: int, device: torch.device,
            mean: Sequence[float], std: Sequence[float],
            transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(model input, targets) for ``order`` (crop indices) in batches, on ``device``.

    ``transform(pixels, indices)`` (the train augmentation) gets each batch's uint8 pixels on
    the device and their crop indices, and returns the model's input (it normalises); without
    one, the pixels are normalised with ``mean`` and ``std``."""
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        pixels = crops.take(idx, device)
        x = transform(pixels, idx) if transform is not None else normalise(pixels, mean, std)
        targets = crops.targets[idx.to(crops.targets.device)]
        yield x, targets.to(device, non_blocking=True)


def batch_len(batch: tuple[torch.Tensor, torch.Tensor]) -> int:
    """Crops in one (input, targets) batch: a shape, read without waiting for the device."""
    return len(batch[1])
