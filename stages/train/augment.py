"""The report's train augmentation on whole batches: RandomHorizontalFlip, then
ColorJitter(0.2, 0.2, 0.2, 0.1), hue included, drawn per crop.

The draws are torchvision's (``RandomHorizontalFlip.forward``, ``ColorJitter.get_params``): a
flip with probability 0.5; brightness, contrast and saturation factors uniform in [0.8, 1.2];
a hue shift uniform in [-0.1, 0.1]; the four adjustments in a uniformly random order. They are
drawn for every crop of the split at once from a generator seeded by (seed, epoch), so a crop's
augmentation is a function of (seed, epoch, crop) alone: not of the batch it falls in, the
number of processes or threads, or what ran before, and a resumed run draws what an
uninterrupted one would (state.py).

The adjustments are torchvision's tensor ones (``transforms.v2.functional.adjust_*`` on float
images in [0, 1], clamped after each), in two implementations with the same results (tested
against torchvision's per-image functions for the same draws):

- :func:`jitter_torch`: torch operations on the whole batch, on the device that trains (CUDA,
  MPS): one kernel per operation for the batch, no per-image Python;
- :func:`jitter_opencv`: OpenCV per crop in a pool of threads, on the CPU, where per-pixel torch
  operations over a batch run 3x slower than OpenCV's colour conversions (BENCHMARKS.md).

``train.augment`` adds a step on the uint8 crops before them (``report``, the default, adds none:
the report's recipe, the same bytes as before the param existed):

- ``augmix``: torchvision.transforms.v2.AugMix with its defaults (Hendrycks et al., ICLR 2020;
  without the paper's Jensen-Shannon loss) on every crop, torch's generator seeded per crop
  from (seed, epoch, crop) (:func:`augmix`);
- ``conditions``: each epoch, half the crops (:data:`CONDITIONED_SHARE`) under one camera condition
  of ``train.augment_conditions`` at a severity 1-5, both uniform, drawn per epoch as the jitter
  is, and applied by stages/common/pictures/corrupt.py's own :func:`corrupt` with a seed of (seed,
  epoch) and the crop's index as its key (:func:`draw_conditions`).

Either is a function of (seed, epoch, crop) alone, as the jitter is.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch
from torchvision.transforms.v2 import AugMix

from stages.common.inference.batches import normalise
from stages.common.model.device import torch_threads
from stages.common.pictures.corrupt import corrupt
from stages.train.data import derived_seed

JITTER = 0.2      # brightness, contrast, saturation: factors in [1 - 0.2, 1 + 0.2]
HUE = 0.1         # hue shift in [-0.1, 0.1] of the colour circle
BRIGHTNESS, CONTRAST, SATURATION, HUE_SHIFT = range(4)
GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
GRAY_MATRIX = np.array([GRAY], dtype=np.float32)
# augment: conditions: the share of crops under a condition each epoch; the rest stay clean, so
# the model still sees the daylight crops its operating point is fitted on
CONDITIONED_SHARE = 0.5
# the train.augment draws' own streams, apart from the jitter's derived_seed(seed, epoch)
AUGMIX_STREAM, CONDITIONS_STREAM = 1, 2


@dataclass(frozen=True)
class Draws:
    """One epoch's augmentation of every crop of the split, indexed by crop."""
    flip: torch.Tensor     # bool, N
    factors: torch.Tensor  # float32, N x 3: brightness, contrast, saturation
    hue: torch.Tensor      # float32, N
    order: torch.Tensor    # int64, N x 4: the adjustments in the order they apply

    def __len__(self) -> int:
        return len(self.flip)


def draw(seed: int, epoch: int, n: int) -> Draws:
    """The draws of epoch ``epoch`` for crops 0 .. n - 1: a function of (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(derived_seed(seed, epoch))
    flip = torch.rand(n, generator=gen) < 0.5
    factors = torch.empty(n, 3).uniform_(1 - JITTER, 1 + JITTER, generator=gen)
    hue = torch.empty(n).uniform_(-HUE, HUE, generator=gen)
    order = torch.argsort(torch.rand(n, 4, generator=gen), dim=1)  # a uniform permutation each
    return Draws(flip, factors, hue, order)


# ----- torch, whole batch ----------------------------------------------------------------------

def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(dim=-3)
    return r.mul(GRAY[0]).add_(g, alpha=GRAY[1]).add_(b, alpha=GRAY[2]).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, ratio: torch.Tensor) -> torch.Tensor:
    return x.mul(ratio).add_(other * (1.0 - ratio)).clamp_(0.0, 1.0)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_hsv (Pillow's algorithm), on a batch."""
    r, g, _ = x.unbind(dim=-3)
    minc, maxc = torch.aminmax(x, dim=-3)
    eqc = maxc == minc
    span = maxc - minc
    ones = torch.ones_like(maxc)
    s = span / torch.where(eqc, ones, maxc)
    divisor = torch.where(eqc, ones, span).unsqueeze(-3)
    rc, gc, bc = ((maxc.unsqueeze(-3) - x) / divisor).unbind(dim=-3)
    not_r = maxc != r
    is_g = maxc == g
    hg = rc.add(2.0).sub_(bc).mul_(is_g & not_r)
    hr = bc.sub(gc).mul_(~not_r)
    hb = gc.add(4.0).sub_(rc).mul_(not_r & ~is_g)
    h = hr.add_(hg).add_(hb).mul_(1.0 / 6.0).add_(1.0).fmod_(1.0)
    return torch.stack((h, s, maxc), dim=-3)


_SELECT = torch.tensor([[0, 2, 1, 1, 3, 0], [3, 0, 0, 2, 1, 1], [1, 1, 3, 0, 0, 2]])


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv_to_rgb, on a batch."""
    h, s, v = x.unbind(dim=-3)
    h6 = h.mul(6)
    i = torch.floor(h6)
    f = h6.sub_(i)
    i = i.to(torch.long).remainder_(6)
    sxf = s * f
    one_minus_s = 1.0 - s
    q = (1.0 - sxf).mul_(v).clamp_(0.0, 1.0)
    t = sxf.add_(one_minus_s).mul_(v).clamp_(0.0, 1.0)
    p = one_minus_s.mul_(v).clamp_(0.0, 1.0)
    vpqt = torch.stack((v, p, q, t), dim=-3)
    select = _SELECT.to(x.device)[:, i].moveaxis(0, -3)
    return vpqt.gather(-3, select)


def _hue_torch(x: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    hsv = _rgb_to_hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = h.add(hue.view(-1, 1, 1)).remainder_(1.0)
    return _hsv_to_rgb(torch.stack((h, s, v), dim=-3))


def jitter_torch(pixels: torch.Tensor, draws: Draws, idx: torch.Tensor) -> torch.Tensor:
    """uint8 B x 3 x S x S (any device) -> float in [0, 1], flipped and jittered per crop.

    No host sync: at each of the four steps every adjustment runs on the whole batch, with the
    factor 1 (exactly the identity for brightness, contrast and saturation) for the crops whose
    step it is not, and the hue result is taken only where it is the step's adjustment."""
    x = pixels.float().div_(255)
    idx = idx.to(draws.flip.device)
    flip = draws.flip[idx].to(x.device).view(-1, 1, 1, 1)
    x = torch.where(flip, x.flip(-1), x)
    factors, hue, order = (draws.factors[idx].to(x.device), draws.hue[idx].to(x.device),
                           draws.order[idx].to(x.device))
    one = torch.ones((), device=x.device)
    for step in range(4):
        op = order[:, step]

        def factor(kind: int) -> torch.Tensor:
            return torch.where(op == kind, factors[:, kind], one).view(-1, 1, 1, 1)

        x = x.mul(factor(BRIGHTNESS)).clamp_(0.0, 1.0)
        x = _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), factor(CONTRAST))
        x = _blend(x, _gray(x), factor(SATURATION))
        x = torch.where((op == HUE_SHIFT).view(-1, 1, 1, 1), _hue_torch(x, hue), x)
    return x


# ----- OpenCV, one crop per thread ------------------------------------------------------------

def _clip01(x: np.ndarray) -> np.ndarray:
    """Clamp to [0, 1] in place (OpenCV's thresholds: a third of NumPy's time)."""
    cv2.threshold(x, 1.0, 1.0, cv2.THRESH_TRUNC, dst=x)
    cv2.threshold(x, 0.0, 0.0, cv2.THRESH_TOZERO, dst=x)
    return x


class _Scratch(threading.local):
    """One thread's work buffers, reused crop after crop: allocating and freeing a few hundred
    KB per step made glibc hand the memory back and fault it in again, which cost 10x the
    arithmetic (1.1 ms of a 224 px crop's saturation step, measured)."""

    def buffers(self, shape: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
        if getattr(self, "shape", None) != shape:
            self.shape = shape
            self.rgb = np.empty(shape, np.uint8)
            self.flipped = np.empty(shape, np.uint8)
            self.gray = np.empty(shape[:2], np.float32)
            self.gray3 = np.empty(shape, np.float32)
            self.hsv = np.empty(shape, np.float32)
        return self.rgb, self.flipped, self.gray, self.gray3, self.hsv


_SCRATCH = _Scratch()


def _jitter_one(chw: np.ndarray, flip: bool, factors: np.ndarray, hue: float,
                order: np.ndarray, out: np.ndarray) -> np.ndarray:
    """3 x H x W uint8 -> H x W x 3 float32 in [0, 1] in ``out`` (contiguous), as
    :func:`jitter_torch` does to one crop. Every step writes in place."""
    rgb, flipped, gray, gray3, hsv = _SCRATCH.buffers(out.shape)
    cv2.merge(list(chw), dst=rgb)  # planes to pixels: 10x NumPy's strided copy
    if flip:  # a flip is a permutation: done on the bytes, before the floats
        rgb = cv2.flip(rgb, 1, dst=flipped)
    x = out
    np.copyto(x, rgb)
    x /= np.float32(255)
    for op in order:
        if op == BRIGHTNESS:
            x *= factors[0]
            _clip01(x)
        elif op == CONTRAST:
            mean = cv2.mean(cv2.transform(x, GRAY_MATRIX, dst=gray))[0]
            x *= factors[1]
            x += np.float32(mean * (1.0 - float(factors[1])))
            _clip01(x)
        elif op == SATURATION:
            cv2.transform(x, GRAY_MATRIX, dst=gray)
            cv2.merge([gray, gray, gray], dst=gray3)
            cv2.addWeighted(x, float(factors[2]), gray3, 1.0 - float(factors[2]), 0.0, dst=x)
            _clip01(x)
        else:
            cv2.cvtColor(x, cv2.COLOR_RGB2HSV, dst=hsv)  # float: H in degrees, [0, 360)
            # the shift taken into [0, 360): OpenCV's HSV2RGB wraps a hue above 360 itself
            shift = float(np.float32(hue * 360) % np.float32(360))
            cv2.add(hsv, (shift, 0.0, 0.0, 0.0), dst=hsv)
            cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)
            _clip01(x)
    return x


def jitter_opencv(pixels: torch.Tensor, draws: Draws, idx: torch.Tensor,
                  pool: ThreadPoolExecutor, mean: Sequence[float] | None = None,
                  std: Sequence[float] | None = None) -> torch.Tensor:
    """uint8 B x 3 x S x S on the CPU -> float in [0, 1] (channels_last), per crop in ``pool``;
    with ``mean`` and ``std``, normalised in the same thread: (x - mean) / std in float32, the
    operations of :func:`stages.common.inference.batches.normalise`, so the same bits, but in
    parallel and while the crop is still in the core's cache."""
    planes = pixels.contiguous().numpy()
    b, _, h, w = planes.shape
    flip, factors = draws.flip[idx].numpy(), draws.factors[idx].numpy()
    hue, order = draws.hue[idx].numpy(), draws.order[idx].numpy()
    out = np.empty((b, h, w, 3), dtype=np.float32)
    # OpenCV's scalar arithmetic on float32 pixels: the scalar taken to float32 first, then one
    # float32 subtraction and one division per value, as torch does (4x NumPy's broadcasting
    # over a 3-long last axis; the same bits, tested)
    m = None if mean is None else tuple(float(np.float32(v)) for v in mean) + (0.0,)
    s = None if std is None else tuple(float(np.float32(v)) for v in std) + (1.0,)

    def one(k: int) -> None:
        x = _jitter_one(planes[k], bool(flip[k]), factors[k], float(hue[k]), order[k], out[k])
        if m is not None:
            cv2.subtract(x, m, dst=x)
            cv2.divide(x, s, dst=x)

    list(pool.map(one, range(b)))
    return torch.from_numpy(out).permute(0, 3, 1, 2)


# ----- train.augment: before the flip and jitter, on the uint8 crops ----------------------------

AUGMIX = AugMix()  # torchvision's defaults: severity 3, 3 chains of depth 1-3, alpha 1, all ops


def augmix(image: torch.Tensor, seed: int) -> torch.Tensor:
    """torchvision's AugMix on one uint8 3 x H x W crop, its draws from torch's global CPU
    generator seeded with ``seed`` for this crop, then given back its state: the crop's result
    is a function of ``seed`` alone, and the training's own draws (dropout) are the ones it
    would make without AugMix. That generator is the whole process's, so only the training
    thread may call this (Augment.ahead)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the CPU's alone: not a GPU's dropout
        return AUGMIX(image)


@dataclass(frozen=True)
class Conditioned:
    """One epoch's camera conditions of every crop of the split (augment: conditions)."""
    condition: torch.Tensor  # int64 N: index into train.augment_conditions; -1: left clean
    severity: torch.Tensor   # int64 N: 1-5


def draw_conditions(seed: int, epoch: int, n: int, count: int) -> Conditioned:
    """Which of ``count`` conditions, at which severity, each crop of epoch ``epoch`` is seen
    under: a function of (seed, epoch) alone."""
    gen = torch.Generator().manual_seed(derived_seed(seed, epoch, CONDITIONS_STREAM))
    under = torch.rand(n, generator=gen) < CONDITIONED_SHARE
    which = torch.randint(count, (n,), generator=gen)
    severity = torch.randint(1, 6, (n,), generator=gen)
    return Conditioned(torch.where(under, which, -1), severity)


def before_jitter(pixels: torch.Tensor, idx: torch.Tensor, augment: str, seed: int, epoch: int,
                  pool: ThreadPoolExecutor, conditions: Sequence[str] = (),
                  drawn: Conditioned | None = None) -> torch.Tensor:
    """``train.augment``'s step on uint8 B x 3 x S x S crops (``idx``: their indices in the
    split), uint8 again, on the CPU: AugMix crop by crop in this thread, the conditions a crop
    per thread of ``pool``. ``drawn``: the epoch's :func:`draw_conditions` (augment:
    conditions)."""
    planes = pixels.cpu()
    crops = idx.tolist()
    if augment == "augmix":
        # One crop's AugMix operations are too small to share out: torch's intra-op threads only
        # wait on each other (30x the time on 2 busy cores, BENCHMARKS.md section 10). Nothing
        # else runs torch on the CPU meanwhile (AugMix's batches are made in the training
        # thread), and the count changes no result.
        with torch_threads(1):
            mixed = [augmix(planes[k], derived_seed(seed, epoch, AUGMIX_STREAM, crop))
                     for k, crop in enumerate(crops)]
        return torch.stack(mixed).to(pixels.device)

    def conditioned(k: int) -> torch.Tensor:
        which = int(drawn.condition[crops[k]])
        if which < 0:
            return planes[k]
        hwc = np.ascontiguousarray(planes[k].permute(1, 2, 0).numpy())
        out = corrupt(hwc, conditions[which], int(drawn.severity[crops[k]]),
                      derived_seed(seed, epoch), str(crops[k]))
        return torch.from_numpy(out).permute(2, 0, 1)

    return torch.stack(list(pool.map(conditioned, range(len(crops))))).to(pixels.device)


class Augment:
    """The batch transform train gives :func:`stages.common.inference.batches.batches`: this epoch's
    draws, applied by torch on an accelerator and by OpenCV threads on the CPU, then
    normalised with ``mean`` and ``std``: uint8 crops in, the model's input out."""

    def __init__(self, seed: int, n: int, device: torch.device, threads: int,
                 mean: Sequence[float], std: Sequence[float],
                 backend: str | None = None, augment: str = "report",
                 conditions: Sequence[str] = ()) -> None:
        self.seed, self.n, self.device = seed, n, device
        self.mean, self.std = mean, std
        self.augment, self.conditions = augment, tuple(conditions)
        # AugMix draws from the process's generator: its batches are made in the training
        # thread, not ahead of the step in another (stages/train/stage.py, Splits)
        self.ahead = augment != "augmix"
        self.backend = backend or ("opencv" if device.type == "cpu" else "torch")
        pooled = self.backend == "opencv" or augment != "report"
        self.pool = ThreadPoolExecutor(max(1, threads)) if pooled else None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.drawn = (draw_conditions(self.seed, epoch, self.n, len(self.conditions))
                      if self.augment == "conditions" else None)
        draws = draw(self.seed, epoch, self.n)
        if self.backend == "torch":  # on the device once per epoch, not per batch
            draws = Draws(*(t.to(self.device) for t in (draws.flip, draws.factors, draws.hue,
                                                         draws.order)))
        self.draws = draws

    def __call__(self, pixels: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.augment != "report":
            pixels = before_jitter(pixels, idx, self.augment, self.seed, self.epoch, self.pool,
                                   self.conditions, self.drawn)
        if self.backend == "torch":
            return normalise(jitter_torch(pixels, self.draws, idx), self.mean, self.std)
        return jitter_opencv(pixels.cpu(), self.draws, idx, self.pool, self.mean,
                             self.std).to(pixels.device)
