"""Greedy removal of near-duplicate boxes in O(n log n) instead of comparing every pair.

extract_crops keeps, per (image, label), the largest box first (ties: lower box_index), and drops
a box whose IoU (:func:`stages.common.pictures.crops.iou`, the same floating-point function) with
any box already kept is >= t. Compared with every kept box, one picture with 10,000 boxes took 55 s
and a crafted detections.csv could stall a run for hours. :func:`greedy_duplicates` gives exactly
the same answer, box for box, while comparing each box only with the kept boxes that could reach
IoU >= t, found through a grid.

Why a box can be skipped. Write w, h for the widths and heights (``x1 - x0`` as the floats IoU
computes them), s for the areas ``w * h``, eps = 2**-53 for the relative rounding of one
operation (monotonic; a subtraction's error is relative to its result):
  * IoU > 0 needs the intervals to overlap: ``min(x1) - max(x0) > 0`` iff ``min(x1) > max(x0)``;
  * the intersection is no wider than either box and no larger in area, and the union is at
    least max(s) (1 - 3 eps), so IoU >= t needs min(s) >= max(s) t (1 - 5 eps). Kept boxes are
    never smaller than the new one (sorted), so only kept boxes with area <= s / (t (1 - 5 eps))
    can match;
  * when no product underflows (both areas >= 2**-600 and t >= 2**-200, so the intersection is
    a normal float too), the same holds per side: the overlap in x is at least t (1 - 8 eps)
    times each box's width. So the widths are within a factor t of each other, and the left
    edges differ by at most (1 - t) times the wider box: a kept box starts at most
    (1 - t + 9 eps) w_kept before the new one, or (1 - t + 9 eps) w_new after it. The same in y.
So a kept box is filed under its size class (the binary exponents e of its width and height,
w < 2**e) and the grid cell of its corner (x0, y0), cells a quarter of 2**e wide; a new box
looks in the size classes its sides allow and, in each, in the cells its corner's window
reaches: a handful of cells, of boxes of about its size. Window edges are widened by 1e-9 of the
box plus 4 ulps, far more than the rounding they absorb. When a class holds fewer boxes than
the cells to look in (a low t), its boxes are read directly. Boxes with an underflowing area
(sides below about 1e-90 of the picture: nothing an annotator draws) or a threshold below
2**-200 skip the grid and are compared, vectorised, with every kept box the area bound allows,
with the same arithmetic as crops.iou. Figures in BENCHMARKS.md ("Near-duplicate removal").
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from stages.common.pictures.crops import iou

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 (XMin, YMin, XMax, YMax)

# Below these, products may underflow and the per-side bound no longer holds (module docstring).
NORMAL_AREA = 2.0 ** -600
NORMAL_THRESHOLD = 2.0 ** -200
# Relative slack on the bounds: far above the few eps of rounding they must absorb.
SLACK = 1e-9
# Cells are 2**-CELLS_PER_CLASS of a size class's largest side: small enough that few kept boxes
# share a cell, large enough that a window covers few cells.
CELLS_PER_CLASS = 2
# A class is read whole when its boxes are fewer than the cells to look in (x this).
CELLS_PER_MEMBER = 1
# Groups this small are compared pair by pair: the grid's bookkeeping costs more than it saves.
SMALL_GROUP = 16


def greedy_duplicates(boxes: Sequence[Box], threshold: float) -> list[bool]:
    """For boxes of one (image, label), largest first: True for each box dropped because its
    IoU with a box kept before it is >= ``threshold``."""
    if len(boxes) <= SMALL_GROUP:
        kept: list[Box] = []
        dropped = []
        for box in boxes:
            hit = any(iou(box, k) >= threshold for k in kept)
            dropped.append(hit)
            if not hit:
                kept.append(box)
        return dropped
    index = KeptBoxes(threshold, len(boxes))
    dropped = []
    for box in boxes:
        hit = index.overlaps(box)
        dropped.append(hit)
        if not hit:
            index.add(box)
    return dropped


def _area(box: Box) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])  # as crops.iou computes it


def _size_class(side: float) -> int:
    """e with side in [2**(e-1), 2**e): exact, no logarithm to round."""
    return math.frexp(side)[1]


def _cell_range(start: float, side: float, class_side: float, gap: float,
                scale: int) -> tuple[int, int]:
    """The cells (``scale``: cells are 2**-scale wide) where a kept box of a class whose sides
    are below ``class_side`` can start, if it is to reach the threshold with a box starting at
    ``start`` with ``side`` (module docstring)."""
    lo = start - gap * class_side
    hi = start + gap * side
    lo -= 4 * math.ulp(abs(start) + gap * class_side)  # the two roundings above, and more
    hi += 4 * math.ulp(abs(start) + gap * side)
    return math.floor(math.ldexp(lo, scale)), math.floor(math.ldexp(hi, scale))


class KeptBoxes:
    """The boxes kept so far in one (image, label), indexed for :meth:`overlaps`."""

    def __init__(self, threshold: float, capacity: int):
        self.t = threshold
        self.side_ratio = threshold * (1 - SLACK)
        self.gap = (1 - threshold) * (1 + SLACK) + SLACK  # times a width: the corner window
        self.area_ratio = threshold * (1 - SLACK)
        self.use_grid = threshold >= NORMAL_THRESHOLD
        self.cells: dict[tuple[int, int, int, int], list[Box]] = {}
        self.classes: dict[tuple[int, int], list[Box]] = {}
        # Every kept box, in the order kept (areas never increase), for the vectorised path.
        self.coords = np.empty((capacity, 4))
        self.neg_areas = np.empty(capacity)
        self.n = 0

    def add(self, box: Box) -> None:
        self.coords[self.n] = box
        self.neg_areas[self.n] = -_area(box)
        self.n += 1
        if self.use_grid and _area(box) >= NORMAL_AREA:
            ex, ey = _size_class(box[2] - box[0]), _size_class(box[3] - box[1])
            key = (ex, ey, math.floor(math.ldexp(box[0], CELLS_PER_CLASS - ex)),
                   math.floor(math.ldexp(box[1], CELLS_PER_CLASS - ey)))
            self.cells.setdefault(key, []).append(box)
            self.classes.setdefault((ex, ey), []).append(box)

    def overlaps(self, box: Box) -> bool:
        """Whether ``box`` has IoU >= t with a kept box (it is never larger than those)."""
        if self.n == 0:
            return False
        if not self.use_grid or _area(box) < NORMAL_AREA:
            return self._overlaps_any(box)
        t = self.t
        for kept in self._candidates(box):
            if iou(box, kept) >= t:
                return True
        return False

    def _candidates(self, box: Box):
        w, h = box[2] - box[0], box[3] - box[1]
        r, gap = self.side_ratio, self.gap
        cells = self.cells
        for ex in range(_size_class(w * r), _size_class(w / r) + 1):
            for ey in range(_size_class(h * r), _size_class(h / r) + 1):
                members = self.classes.get((ex, ey))
                if not members:
                    continue
                x_lo, x_hi = _cell_range(box[0], w, math.ldexp(1.0, ex), gap, CELLS_PER_CLASS - ex)
                y_lo, y_hi = _cell_range(box[1], h, math.ldexp(1.0, ey), gap, CELLS_PER_CLASS - ey)
                if (x_hi - x_lo + 1) * (y_hi - y_lo + 1) > CELLS_PER_MEMBER * len(members):
                    yield from members
                    continue
                for ix in range(x_lo, x_hi + 1):
                    for iy in range(y_lo, y_hi + 1):
                        yield from cells.get((ex, ey, ix, iy), ())

    def _overlaps_any(self, box: Box) -> bool:
        """Vectorised crops.iou against every kept box whose area the bound allows."""
        limit = _area(box) / self.area_ratio
        first = int(np.searchsorted(self.neg_areas[:self.n], -limit, side="left"))
        k = self.coords[first:self.n]
        if not len(k):
            return False
        iw = np.minimum(box[2], k[:, 2]) - np.maximum(box[0], k[:, 0])
        ih = np.minimum(box[3], k[:, 3]) - np.maximum(box[1], k[:, 1])
        inter = iw * ih
        union = (box[2] - box[0]) * (box[3] - box[1]) + (k[:, 2] - k[:, 0]) * (k[:, 3] - k[:, 1])
        union = union - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = inter / union
        hits = (iw > 0) & (ih > 0) & (union > 0) & (ratio >= self.t)
        return bool(hits.any())
