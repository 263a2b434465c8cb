"""Crop geometry: from a normalised box to a square, letterboxed canvas.

Pure functions on numpy arrays, shared by ``extract_crops`` (training data) and ``predict`` (the
same preprocessing at inference time, so the model sees what it was trained on).

The report's recipe (``data_fix.py``), step by step:
  cut the box out of the picture; scale it by ``ratio = min(S / cw, S / ch)`` so the long side
  becomes S and the aspect ratio is kept; fill an S x S canvas with
  ``tuple(np.median(xy, axis=0).astype(int))`` of the crop's four corner pixels; put the scaled
  crop at a random position, so the model cannot learn "always centred on the same colour".

Decisions the report leaves open, made here:
  * Box edges: the normalised coordinates are edges on a continuous [0, 1] axis, so
    ``XMin * width`` is a pixel *edge*. Each edge is rounded to the nearest integer, halves up
    (``floor(v + 0.5)``, not Python's banker's ``round``), then clipped to [0, width]; the cut is
    the half-open range ``[x0, x1)``. Width and height are ``x1 - x0`` and ``y1 - y0``.
  * Scaled size: ``int(cw * ratio)`` in floating point can give S - 1 for the long side
    (224 / 3 * 3 == 223.99...), leaving a one-pixel strip. The same truncation is computed
    exactly in integers: long side = S, short side = ``short * S // long``, at least 1 pixel.
  * Corner pixels: those of the *scaled* crop, i.e. the pixels that will touch the padding in the
    canvas. The report says the colour is taken from "the corners of the image" being placed; the
    scaled crop is that image, and its corners are what the padding must blend with.
  * Random position: both ends inclusive, ``x in [0, S - nw]``, ``y in [0, S - nh]`` (the report's
    ``np.random.randint(0, S - nw)`` can never touch the right or bottom edge), drawn x first,
    from a generator seeded per box (see :func:`box_rng`), so a crop does not depend on which
    worker made it or in which order.
"""
from __future__ import annotations

import hashlib
import math

import numpy as np

PixelBox = tuple[int, int, int, int]  # x0, y0, x1, y1; half-open: columns x0..x1-1


def _edge(v: float, limit: int) -> int:
    """A normalised coordinate times the image side, rounded half up and clipped to [0, limit]."""
    return min(max(math.floor(v + 0.5), 0), limit)


def pixel_box(xmin: float, xmax: float, ymin: float, ymax: float,
              width: int, height: int) -> PixelBox:
    """The half-open pixel rectangle of a normalised Open Images box, clipped to the picture.

    A degenerate box (max <= min after rounding, or entirely outside) comes back with zero or
    negative width / height; callers treat that like a too-small box.
    """
    return (_edge(xmin * width, width), _edge(ymin * height, height),
            _edge(xmax * width, width), _edge(ymax * height, height))


def box_size(box: PixelBox) -> tuple[int, int]:
    x0, y0, x1, y1 = box
    return x1 - x0, y1 - y0


def fit_size(cw: int, ch: int, size: int) -> tuple[int, int]:
    """(new width, new height) of a cw x ch crop scaled to fit an S x S canvas, aspect kept.

    Equal to the report's ``(int(cw * ratio), int(ch * ratio))`` with ``ratio = min(S/cw, S/ch)``,
    computed in integers so the long side is exactly S, and never 0 for a very thin box.
    """
    if cw <= 0 or ch <= 0:
        raise ValueError(f"crop of {cw}x{ch} pixels cannot be scaled")
    if cw >= ch:
        return size, max(1, ch * size // cw)
    return max(1, cw * size // ch), size


def corner_colour(image: np.ndarray) -> tuple[int, ...]:
    """The report's padding colour: per-channel median of the four corner pixels, truncated.

    With four values the median is the mean of the middle two, so one odd corner (a bright sky
    patch, a black border) does not pull the colour the way a plain mean would.
    """
    xy = np.array([image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]], dtype=np.int64)
    xy = xy.reshape(4, -1)
    # np.median of 4 values, truncated: the floored mean of the middle two (values are >= 0);
    # np.median itself costs more than the resize of a crop.
    middle = np.sort(xy, axis=0)[1:3].sum(axis=0) // 2
    return tuple(int(v) for v in middle)


def box_rng(seed: int, image_id: str, box_index: int) -> np.random.Generator:
    """A generator that depends only on (seed, ImageID, box index).

    The ImageID enters through SHA-256, not ``hash()``, which Python salts per process.
    """
    digest = hashlib.sha256(image_id.encode("utf-8")).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng([seed, *words, box_index])


def place(scaled: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
    """Put ``scaled`` on an S x S canvas of its corner colour; random spot, or centred if no rng."""
    nh, nw = scaled.shape[:2]
    if nw > size or nh > size:
        raise ValueError(f"{nw}x{nh} crop does not fit a {size}x{size} canvas")
    if rng is None:
        x, y = (size - nw) // 2, (size - nh) // 2
    else:
        x = int(rng.integers(0, size - nw, endpoint=True))
        y = int(rng.integers(0, size - nh, endpoint=True))
    import cv2  # here: the box geometry of this module is usable without OpenCV

    # One C call pads with the colour; filling a numpy canvas by broadcasting cost 8x as much
    # time as the whole rest of a crop's placement.
    canvas = cv2.copyMakeBorder(scaled, y, size - nh - y, x, size - nw - x, cv2.BORDER_CONSTANT,
                                value=corner_colour(scaled))
    return canvas.reshape((size, size) + scaled.shape[2:])


def letterbox(cut: np.ndarray, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Scale ``cut`` to fit S x S with its aspect ratio kept and pad it (see :func:`place`).

    Training data uses a per-box ``rng``; prediction passes ``None`` for a centred, repeatable
    canvas.
    """
    import cv2  # imported here so the pure geometry above is usable without OpenCV

    ch, cw = cut.shape[:2]
    nw, nh = fit_size(cw, ch, size)
    # cv2.resize's default (bilinear), as in the report.
    scaled = cv2.resize(cut, (nw, nh))
    if scaled.ndim < cut.ndim:  # cv2 drops a trailing channel axis of 1
        scaled = scaled[..., np.newaxis]
    return place(scaled, size, rng)


def cut(image: np.ndarray, box: PixelBox) -> np.ndarray:
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


# ---------------------------------------------------------------------------------------------
# Reduced-scale decoding. libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size by dropping
# DCT coefficients (OpenCV's IMREAD_REDUCED_COLOR_2/4/8), several times faster than a full
# decode. When every crop of a picture is shrunk by a factor f or more anyway, cutting it from
# the 1/f picture gives the same geometry and almost the same pixels (the DCT scaling averages
# blocks where bilinear resizing of the full picture samples and aliases).

REDUCE_FACTORS = (8, 4, 2)


def reduce_factor(sizes: list[tuple[int, int]], size: int) -> int:
    """The largest f in 8, 4, 2 (else 1) by which every (cw, ch) crop is shrunk at least.

    A crop's long side becomes S (see :func:`fit_size`), so it is shrunk ``long / S`` times;
    both sides by the same factor, so the 1/f cut still has at least as many pixels as the
    scaled crop on each axis.
    """
    if not sizes:
        return 1
    shortest_long = min(max(cw, ch) for cw, ch in sizes)
    return next((f for f in REDUCE_FACTORS if shortest_long >= f * size), 1)


def reduced_shape(width: int, height: int, factor: int) -> tuple[int, int]:
    """(width, height) of a picture decoded at 1/factor: libjpeg rounds up."""
    return -(-width // factor), -(-height // factor)


def scale_from_reduced(image: np.ndarray, box: PixelBox, factor: int,
                       scaled_size: tuple[int, int]) -> np.ndarray:
    """What ``cv2.resize(cut(full, box), scaled_size)`` gives, sampled from the 1/factor picture.

    cv2.resize samples output pixel u of the cut at full-size x = x0 + (u + 0.5) * cw / nw (an
    edge coordinate); on the 1/f picture that point is at x / f, i.e. pixel index x / f - 0.5.
    The same bilinear sampling at exactly those points keeps the crop aligned to a fraction of a
    pixel, which rounding the box to the 1/f grid would not (up to f/2 source pixels off).
    """
    import cv2  # here: the box geometry of this module is usable without OpenCV

    x0, y0, x1, y1 = box
    nw, nh = scaled_size
    sx, sy = (x1 - x0) / nw, (y1 - y0) / nh
    to_source = np.array([[sx / factor, 0.0, (x0 + 0.5 * sx) / factor - 0.5],
                          [0.0, sy / factor, (y0 + 0.5 * sy) / factor - 0.5]])
    scaled = cv2.warpAffine(image, to_source, (nw, nh),
                            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REPLICATE)
    return scaled[..., np.newaxis] if scaled.ndim < image.ndim else scaled


def iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """Intersection over union of two (xmin, ymin, xmax, ymax) boxes, 0 for empty ones.

    Scaling x and y by the picture's width and height scales every area by the same factor, so
    IoU of normalised boxes equals IoU in pixels: duplicates can be found before any image is
    read.
    """
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
