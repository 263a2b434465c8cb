"""The camera conditions: each a pure function of (seed, condition, severity, crop).

A crop (uint8 H x W x 3 RGB) goes in, the same crop as the camera would have seen it under the
condition comes out, the same bytes on every machine with these pinned libraries: every random
draw comes from a generator seeded by :func:`crop_rng` (the SHA-256 of seed, condition, severity
and the crop's key), never from a global one, and the arithmetic is float64 numpy, OpenCV's
filters and torchvision's kernels, rounded to uint8 once at the end.

Definitions follow ImageNet-C (Hendrycks & Dietterich, ICLR 2019, github.com/hendrycks/robustness,
``corruptions.py``, the ImageNet 224 px set) where it has the corruption; lengths in pixels there
are scaled by ``side / 224`` so a blur covers the same share of the object on any crop size.
Every parameter per severity is in :data:`SEVERITIES` and in docs/conditions.md. What a library
does is the library's (torchvision.transforms.v2.functional: JPEG, resize, grey, brightness,
contrast; OpenCV: 2-D filtering); what none has (the plasma fractal of fog, the snow and rain
layers, the motion-blur kernel of ImageMagick that ImageNet-C calls through Wand, the sensor noise
of a dark scene) is a few lines of numpy here.
"""
from __future__ import annotations

import hashlib
import math
import warnings
from typing import Callable

import cv2
import numpy as np
import torch
import torchvision.transforms.v2.functional as tvf

IMAGENET_C_SIDE = 224  # the side ImageNet-C's pixel lengths are given for

# condition -> one tuple per severity 1..5 (docs/conditions.md cites each source).
SEVERITIES: dict[str, tuple] = {
    # exposure in linear light, photons at full white, read noise (linear), display gamma
    "night": ((0.5, 500, 0.004, 2.2), (0.3, 250, 0.008, 2.2), (0.18, 120, 0.012, 2.2),
              (0.1, 60, 0.018, 2.2), (0.06, 30, 0.025, 2.2)),
    # share of the red channel in the grey (near-IR: skin and leaves bright), contrast factor
    "infrared": ((0.2, 0.9), (0.4, 0.8), (0.6, 0.7), (0.8, 0.6), (1.0, 0.5)),
    # ImageNet-C motion_blur: (radius, sigma) at 224 px; angle uniform in (-45, 45) degrees
    "motion_blur": ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15)),
    # ImageNet-C defocus_blur: (disk radius at 224 px, alias blur sigma)
    "defocus": ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)),
    # ImageNet-C fog: (fog strength, plasma fractal wibble decay)
    "fog": ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4)),
    # drops per pixel, streak length as a share of the side, dimming, streak brightness
    "rain": ((0.004, 0.15, 0.05, 0.5), (0.008, 0.2, 0.1, 0.55), (0.012, 0.25, 0.15, 0.6),
             (0.018, 0.3, 0.2, 0.65), (0.025, 0.35, 0.25, 0.7)),
    # ImageNet-C snow: (loc, scale, zoom, threshold, blur radius, blur sigma, blend)
    "snow": ((0.1, 0.3, 3, 0.5, 10, 4, 0.8), (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
             (0.55, 0.3, 4, 0.9, 12, 8, 0.7), (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
             (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55)),
    # ImageNet-C jpeg_compression: quality
    "jpeg": ((25,), (18,), (15,), (10,), (7,)),
    # side seen by the camera as a share of the crop's (a far person), then back up
    "low_resolution": ((0.5,), (0.35,), (0.25,), (0.18,), (0.12,)),
    # exposure gain, flare peak (added), flare sigma as a share of the side
    "glare": ((1.2, 0.2, 0.25), (1.4, 0.3, 0.25), (1.7, 0.45, 0.3), (2.0, 0.6, 0.3),
              (2.5, 0.8, 0.35)),
}
CONDITIONS = tuple(SEVERITIES)


def crop_rng(seed: int, condition: str, severity: int, key: str) -> np.random.Generator:
    """The generator of one corrupted crop: the same draws for the same four values on any
    machine, in any order, in any process (``key``: the crop's path inside its split)."""
    text = f"{seed}\0{condition}\0{severity}\0{key}".encode()
    return np.random.default_rng(int.from_bytes(hashlib.sha256(text).digest()[:8], "little"))


def _tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _array(t: torch.Tensor) -> np.ndarray:
    return t.permute(1, 2, 0).numpy().astype(np.float64)


def _scaled(pixels: float, side: int) -> float:
    return pixels * side / IMAGENET_C_SIDE


def _filter(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    return cv2.filter2D(x, cv2.CV_64F, kernel, borderType=cv2.BORDER_REFLECT)


def motion_kernel(radius: float, sigma: float, angle: float, both_ways: bool = False
                  ) -> np.ndarray:
    """ImageMagick's -motion-blur (what ImageNet-C calls through Wand): Gaussian weights along a
    line from the pixel towards ``angle`` degrees, ``radius`` long; ``both_ways``: centred."""
    half = max(1, math.ceil(radius))
    t = np.arange(-half if both_ways else 0, half + 1, dtype=np.float64)
    weights = np.exp(-t ** 2 / (2 * max(sigma, 1e-3) ** 2))
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    ys, xs = half + t * math.sin(math.radians(angle)), half + t * math.cos(math.radians(angle))
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                      (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):  # bilinear splat of each tap
        yy, xx = np.clip(y0 + dy, 0, 2 * half), np.clip(x0 + dx, 0, 2 * half)
        np.add.at(kernel, (yy, xx), weights * w)
    return kernel / kernel.sum()


def plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """ImageNet-C's plasma fractal (diamond-square), ``size`` a power of 2, values in [0, 1];
    its wibble quirk kept (``wibble * uniform(-wibble, wibble)``) so fog looks as it does there."""
    grid = np.zeros((size, size))
    step, wibble = size, 100.0

    def wibbled(mean_of: np.ndarray) -> np.ndarray:
        return mean_of / 4 + wibble * rng.uniform(-wibble, wibble, mean_of.shape)

    while step >= 2:
        half = step // 2
        corners = grid[0:size:step, 0:size:step]
        squares = corners + np.roll(corners, -1, axis=0)
        squares += np.roll(squares, -1, axis=1)
        grid[half:size:step, half:size:step] = wibbled(squares)
        centres = grid[half:size:step, half:size:step]
        corners = grid[0:size:step, 0:size:step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        grid[0:size:step, half:size:step] = wibbled(left)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        grid[half:size:step, 0:size:step] = wibbled(top)
        step //= 2
        wibble /= decay
    grid -= grid.min()
    return grid / grid.max()


def _grey(x: np.ndarray) -> np.ndarray:
    return _array(tvf.rgb_to_grayscale(_tensor(x)))[..., 0]


def night(x, p, rng):
    exposure, photons, read, gamma = p
    linear = x ** gamma * exposure  # the scene darkened, in linear light
    linear = rng.poisson(linear * photons) / photons  # shot noise: few photons per pixel
    linear = linear + rng.normal(0.0, read, linear.shape)  # read noise of the sensor
    return np.clip(linear, 0, 1) ** (1 / gamma)


def infrared(x, p, rng):
    red_share, contrast = p
    grey = (1 - red_share) * _grey(x) + red_share * x[..., 0]
    grey = np.repeat(grey[..., None], 3, axis=2)
    return _array(tvf.adjust_contrast(_tensor(np.clip(grey, 0, 1)), contrast))


def motion_blur(x, p, rng):
    radius, sigma = p
    side = x.shape[0]
    kernel = motion_kernel(_scaled(radius, side), _scaled(sigma, side), rng.uniform(-45, 45))
    return _filter(x, kernel)


def defocus(x, p, rng):
    radius, alias_blur = p
    radius = _scaled(radius, x.shape[0])
    reach = max(8, math.ceil(radius))
    ys, xs = np.mgrid[-reach:reach + 1, -reach:reach + 1]
    disk = ((xs ** 2 + ys ** 2) <= radius ** 2).astype(np.float64)
    disk = cv2.GaussianBlur(disk / disk.sum(), (3, 3) if radius <= 8 else (5, 5), alias_blur)
    return _filter(x, disk)


def fog(x, p, rng):
    strength, decay = p
    side = x.shape[0]
    size = 1 << max(1, (side - 1).bit_length())
    top = x.max()
    x = x + strength * plasma_fractal(size, decay, rng)[:side, :x.shape[1], None]
    return x * top / (top + strength)


def _zoom(layer: np.ndarray, zoom: float) -> np.ndarray:
    h, w = layer.shape
    ch, cw = max(1, math.ceil(h / zoom)), max(1, math.ceil(w / zoom))
    top, left = (h - ch) // 2, (w - cw) // 2
    return cv2.resize(layer[top:top + ch, left:left + cw], (w, h),
                      interpolation=cv2.INTER_LINEAR)


def snow(x, p, rng):
    loc, scale, zoom, threshold, radius, sigma, blend = p
    side = x.shape[0]
    layer = _zoom(rng.normal(loc, scale, x.shape[:2]), zoom)
    layer[layer < threshold] = 0
    kernel = motion_kernel(_scaled(radius, side), _scaled(sigma, side), rng.uniform(-135, -45))
    layer = _filter(np.clip(layer, 0, 1), kernel)[..., None]
    x = blend * x + (1 - blend) * np.maximum(x, _grey(x)[..., None] * 1.5 + 0.5)
    return x + layer + np.rot90(layer, k=2)


def rain(x, p, rng):
    density, length, dim, brightness = p
    side = x.shape[0]
    drops = (rng.random(x.shape[:2]) < density).astype(np.float64)
    reach = max(1.0, length * side / 2)
    kernel = motion_kernel(reach, reach, rng.uniform(80, 100), both_ways=True)
    streaks = np.clip(_filter(drops, kernel) * (2 * reach), 0, 1)[..., None]
    x = x * (1 - dim)  # an overcast, wet scene
    return x + (1 - x) * brightness * streaks


def jpeg(x, p, rng):
    (quality,) = p
    pixels = _tensor(to_uint8(x))
    with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; libjpeg still works
        warnings.simplefilter("ignore", DeprecationWarning)
        return _array(tvf.jpeg(pixels, quality)) / 255


def low_resolution(x, p, rng):
    (share,) = p
    h, w = x.shape[:2]
    small = [max(1, round(h * share)), max(1, round(w * share))]
    t = tvf.resize(_tensor(x), small, antialias=True)  # the sensor averages over the person
    return _array(tvf.resize(t, [h, w], antialias=True))


def glare(x, p, rng):
    gain, peak, sigma = p
    h, w = x.shape[:2]
    x = _array(tvf.adjust_brightness(_tensor(x), gain))  # overexposed, clipped at white
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ys, xs = np.mgrid[0:h, 0:w]
    flare = peak * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * (sigma * h) ** 2))
    return x + flare[..., None]


FUNCTIONS: dict[str, Callable] = {
    "night": night, "infrared": infrared, "motion_blur": motion_blur, "defocus": defocus,
    "fog": fog, "rain": rain, "snow": snow, "jpeg": jpeg, "low_resolution": low_resolution,
    "glare": glare}


def to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def corrupt(pixels: np.ndarray, condition: str, severity: int, seed: int, key: str
            ) -> np.ndarray:
    """``pixels`` (uint8 H x W x 3 RGB) under ``condition`` at ``severity`` (1-5), uint8 again;
    ``key`` names the crop (its path inside the split), so each crop draws its own."""
    rng = crop_rng(seed, condition, severity, key)
    x = pixels.astype(np.float64) / 255
    return to_uint8(FUNCTIONS[condition](x, SEVERITIES[condition][severity - 1], rng))
