"""A synthetic, deterministic stand-in for Open Images V7, written in its on-disk layout.

It exists so ``dvc repro`` runs anywhere in minutes with no network: pictures drawn with OpenCV,
several objects each, labelled like real Open Images boxes. What it must imitate (because the
later stages have to cope with it):

- boxes of every size, including ones too small to crop (< 24 px on a side);
- IsGroupOf boxes (a crowd in one box) and IsDepiction boxes (a picture of a thing);
- one figure boxed twice under two classes (Person and Man, IoU > 0.8);
- distractor classes (Tree, Building) that are in the label file but in no wanted label.

What it must also be: learnable. Every label keeps one shape language (person: upright figure,
head over a narrow body with arms and legs; animal: horizontal body with legs, head and tail;
object: rigid geometric things, guns, blades, vehicles, bags) under random colours, sizes,
positions and noisy, cluttered backgrounds, so a small CNN has to learn shape, not colour.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` and JPEG
encoding uses fixed settings, so the same params give byte-identical files.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from stages.common.pictures import crops

# Open Images boxable classes the generator can draw: DisplayName -> (MID, shape).
# MIDs are the real ones from class-descriptions-boxable.csv (checked against two published
# copies of that file), so a model or a script written for the sample reads real data unchanged.
CATALOG: dict[str, tuple[str, str]] = {
    "Person": ("/m/01g317", "figure"),
    "Man": ("/m/04yx4", "figure"),
    "Woman": ("/m/03bt1vf", "figure"),
    "Boy": ("/m/01bl7v", "figure"),
    "Girl": ("/m/05r655", "figure"),
    "Dog": ("/m/0bt9lr", "quadruped"),
    "Cat": ("/m/01yrx", "quadruped"),
    "Horse": ("/m/03k3r", "quadruped"),
    "Cattle": ("/m/01xq0k1", "quadruped"),
    "Pig": ("/m/068zj", "quadruped"),
    "Sheep": ("/m/07bgp", "quadruped"),
    "Goat": ("/m/03fwl", "quadruped"),
    "Deer": ("/m/09kx5", "quadruped"),
    "Rabbit": ("/m/06mf6", "quadruped"),
    "Squirrel": ("/m/071qp", "quadruped"),
    "Bird": ("/m/015p6", "bird"),
    "Chicken": ("/m/09b5t", "bird"),
    "Duck": ("/m/09ddx", "bird"),
    "Handgun": ("/m/0gxl3", "handgun"),
    "Rifle": ("/m/06c54", "long_gun"),
    "Shotgun": ("/m/06nrc", "long_gun"),
    "Knife": ("/m/04ctx", "blade"),
    "Sword": ("/m/06y5r", "blade"),
    "Dagger": ("/m/02gzp", "blade"),
    "Axe": ("/m/0c2jj", "axe"),
    "Backpack": ("/m/01940j", "bag"),
    "Helmet": ("/m/0zvk5", "helmet"),
    "Car": ("/m/0k4j", "car"),
    "Truck": ("/m/07r04", "car"),
    "Bicycle": ("/m/0199g", "cycle"),
    "Motorcycle": ("/m/04_sv", "cycle"),
    "Tree": ("/m/07j7r", "tree"),
    "Building": ("/m/0cgh4", "building"),
}
# Drawn behind many pictures and boxed, but in no label: the crop stage must ignore them.
DISTRACTORS = ["Tree", "Building"]

JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90, cv2.IMWRITE_JPEG_OPTIMIZE, 0,
               cv2.IMWRITE_JPEG_PROGRESSIVE, 0]
MIN_MAIN_PX = 32          # shorter side of a main object: above the crop stage's 24 px minimum
TOO_SMALL_PX = (10, 24)   # longest side of a deliberately too-small object

# A few real-looking colour ranges; objects also get fully random colours (see _colour).
SKIN = [(60, 90, 140), (90, 130, 190), (120, 170, 225), (40, 60, 100), (150, 190, 235)]
FUR = [(30, 60, 100), (50, 80, 120), (200, 210, 220), (20, 20, 25), (80, 120, 170),
       (130, 160, 190)]


@dataclass
class Box:
    """One row of detections.csv, in pixels until written out."""
    name: str
    x0: int
    y0: int
    x1: int   # exclusive
    y1: int   # exclusive
    occluded: int = 0
    group_of: int = 0
    depiction: int = 0

    def area(self) -> int:
        return max(0, self.x1 - self.x0) * max(0, self.y1 - self.y0)

    def intersection(self, other: "Box") -> int:
        w = min(self.x1, other.x1) - max(self.x0, other.x0)
        h = min(self.y1, other.y1) - max(self.y0, other.y0)
        return max(0, w) * max(0, h)

    def iou(self, other: "Box") -> float:
        return crops.iou((self.x0, self.y0, self.x1, self.y1),
                         (other.x0, other.y0, other.x1, other.y1))


@dataclass
class Picture:
    image_id: str
    jpeg: bytes
    width: int
    height: int
    boxes: list[Box]


class Canvas:
    """An object drawn alone: colour patch plus the mask of exactly the pixels it covers.

    Every primitive goes to both, so the box taken from the mask fits the drawing tightly.
    """

    def __init__(self, w: int, h: int):
        self.img = np.zeros((h, w, 3), np.uint8)
        self.mask = np.zeros((h, w), np.uint8)

    def line(self, p, q, colour, thickness):
        t = max(1, int(round(thickness)))
        cv2.line(self.img, _pt(p), _pt(q), colour, t, cv2.LINE_AA)
        cv2.line(self.mask, _pt(p), _pt(q), 255, t, cv2.LINE_8)

    def circle(self, c, r, colour):
        r = max(1, int(round(r)))
        cv2.circle(self.img, _pt(c), r, colour, -1, cv2.LINE_AA)
        cv2.circle(self.mask, _pt(c), r, 255, -1, cv2.LINE_8)

    def ring(self, c, r, colour, thickness):
        r, t = max(1, int(round(r))), max(1, int(round(thickness)))
        cv2.circle(self.img, _pt(c), r, colour, t, cv2.LINE_AA)
        cv2.circle(self.mask, _pt(c), r, 255, t, cv2.LINE_8)

    def ellipse(self, c, axes, colour, angle=0.0, start=0, end=360):
        ax = (max(1, int(round(axes[0]))), max(1, int(round(axes[1]))))
        cv2.ellipse(self.img, _pt(c), ax, angle, start, end, colour, -1, cv2.LINE_AA)
        cv2.ellipse(self.mask, _pt(c), ax, angle, start, end, 255, -1, cv2.LINE_8)

    def poly(self, points, colour):
        pts = np.round(np.asarray(points, np.float64)).astype(np.int32)
        cv2.fillPoly(self.img, [pts], colour, cv2.LINE_AA)
        cv2.fillPoly(self.mask, [pts], 255, cv2.LINE_8)

    def rect(self, x0, y0, x1, y1, colour):
        self.poly([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], colour)


def _pt(p) -> tuple[int, int]:
    return int(round(p[0])), int(round(p[1]))


def _colour(rng: np.random.Generator, palette=None) -> tuple[int, int, int]:
    """A BGR colour: from ``palette`` with jitter half of the time, else anything."""
    if palette is not None and rng.random() < 0.5:
        base = np.array(palette[rng.integers(len(palette))], np.int64)
        return tuple(int(v) for v in np.clip(base + rng.integers(-25, 26, 3), 0, 255))
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _shade(colour, delta: int) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + delta, 0, 255)) for c in colour)


# ---------------------------------------------------------------------------- the shapes
# Each drawer gets the object's longest side in pixels and picks its own aspect ratio.

def draw_figure(rng: np.random.Generator, size: int) -> Canvas:
    """A standing person: round head over a tall narrow body, arms, two legs (aspect ~0.35)."""
    h = size
    w = max(4, int(h * rng.uniform(0.30, 0.42)))
    c = Canvas(w, h)
    cx = w / 2
    head_r = h * rng.uniform(0.075, 0.09)
    neck_y = 2 * head_r
    hip_y = h * rng.uniform(0.52, 0.58)
    shirt, trousers, skin = _colour(rng), _colour(rng), _colour(rng, SKIN)
    limb = max(2.0, w * 0.16)
    # Legs first so the torso covers their tops; slight stride for variety.
    stride = w * rng.uniform(0.05, 0.3)
    for side in (-1, 1):
        c.line((cx + side * w * 0.12, hip_y), (cx + side * stride, h - limb / 2), trousers, limb)
    torso_w = w * rng.uniform(0.22, 0.3)
    c.poly([(cx - torso_w, neck_y), (cx + torso_w, neck_y),
            (cx + torso_w * 0.9, hip_y), (cx - torso_w * 0.9, hip_y)], shirt)
    for side in (-1, 1):
        # Arms hang, swing or are raised: the outline changes, the "head over body" does not.
        ang = np.deg2rad(rng.uniform(-30, 60) if rng.random() < 0.85 else rng.uniform(120, 160))
        length = h * 0.3
        sx, sy = cx + side * torso_w, neck_y + limb / 2
        ex = sx + side * np.sin(ang) * length * 0.55
        ey = sy + np.cos(ang) * length
        ex = float(np.clip(ex, limb / 2, w - limb / 2))
        c.line((sx, sy), (ex, ey), shirt, limb * 0.8)
        c.circle((ex, ey), limb * 0.45, skin)
    c.circle((cx, head_r + 1), head_r, skin)
    if rng.random() < 0.5:  # hair or a cap: a darker cap on the head
        c.ellipse((cx, head_r * 0.8 + 1), (head_r, head_r * 0.7), _colour(rng), 0, 180, 360)
    return c


def draw_quadruped(rng: np.random.Generator, size: int) -> Canvas:
    """A four-legged animal in profile: body ellipse, four legs, head and tail (aspect ~1.6)."""
    w = size
    h = max(4, int(w * rng.uniform(0.5, 0.72)))
    c = Canvas(w, h)
    fur = _colour(rng, FUR)
    dark = _shade(fur, -50)
    body_cx, body_cy = w * 0.47, h * 0.45
    ax, ay = w * rng.uniform(0.27, 0.32), h * rng.uniform(0.17, 0.23)
    leg = max(2.0, w * 0.065)
    for fx in (-0.75, -0.45, 0.45, 0.75):
        x = body_cx + fx * ax
        c.line((x, body_cy), (x + rng.uniform(-0.03, 0.03) * w, h - leg / 2), dark, leg)
    # Tail from the rear, up or down.
    tail_end = (w * 0.04 + leg / 2, body_cy + rng.uniform(-0.35, 0.25) * h)
    c.line((body_cx - ax * 0.9, body_cy - ay * 0.3), tail_end, dark, leg * 0.7)
    c.ellipse((body_cx, body_cy), (ax, ay), fur)
    # Neck and head at the front; the head may be raised or lowered (grazing).
    head_r = h * rng.uniform(0.13, 0.17)
    head = (w - head_r * 1.2 - 1, h * rng.uniform(0.15, 0.45) + head_r * 0.3)
    c.line((body_cx + ax * 0.7, body_cy - ay * 0.3), head, fur, head_r * 1.1)
    c.ellipse(head, (head_r * 1.2, head_r * 0.85), fur, angle=rng.uniform(-20, 20))
    ear = [(head[0] - head_r * 0.6, head[1] - head_r * 0.5), (head[0] - head_r * 0.2, head[1]),
           (head[0] - head_r * 0.5, head[1] - head_r * 1.4)]
    c.poly(ear, dark)
    if rng.random() < 0.5:  # spots, so fur is not one flat colour
        for _ in range(int(rng.integers(2, 6))):
            spot = (body_cx + rng.uniform(-0.6, 0.6) * ax, body_cy + rng.uniform(-0.5, 0.5) * ay)
            c.ellipse(spot, (ax * 0.18, ay * 0.25), dark)
    return _maybe_flip(rng, c)


def draw_bird(rng: np.random.Generator, size: int) -> Canvas:
    """A bird in profile: egg body, round head with a beak, wing, two thin legs (aspect ~1.2)."""
    w = size
    h = max(4, int(w * rng.uniform(0.7, 0.9)))
    c = Canvas(w, h)
    plumage = _colour(rng, FUR)
    leg = max(1.5, w * 0.03)
    body = (w * 0.45, h * 0.55)
    ax, ay = w * 0.3, h * 0.22
    for dx in (-0.1, 0.1):
        c.line((body[0] + dx * w, body[1]), (body[0] + dx * w * 1.5, h - leg / 2),
               (40, 90, 200), leg)
    c.line((body[0] - ax * 0.8, body[1]), (w * 0.03 + leg, body[1] - h * 0.15), plumage, ay * 0.6)
    c.ellipse(body, (ax, ay), plumage, angle=rng.uniform(-15, 5))
    c.ellipse((body[0] - ax * 0.1, body[1] - ay * 0.1), (ax * 0.6, ay * 0.55),
              _shade(plumage, -40), angle=-10)
    head_r = h * 0.13
    head = (w * 0.78, h * 0.22 + head_r * 0.2)
    c.line((body[0] + ax * 0.6, body[1] - ay * 0.4), head, plumage, head_r * 1.2)
    c.circle(head, head_r, plumage)
    c.poly([(head[0] + head_r * 0.7, head[1] - head_r * 0.3),
            (w - 1, head[1] + head_r * 0.1), (head[0] + head_r * 0.7, head[1] + head_r * 0.4)],
           (30, 140, 230))
    return _maybe_flip(rng, c)


def draw_handgun(rng: np.random.Generator, size: int) -> Canvas:
    """A pistol: horizontal slide, grip angled down at the back, trigger guard (an L shape)."""
    w = size
    h = max(4, int(w * rng.uniform(0.6, 0.75)))
    c = Canvas(w, h)
    metal = _colour(rng)
    slide_h = h * 0.3
    c.rect(0, 0, w - 1, slide_h, metal)
    c.rect(0, slide_h * 0.2, w * 0.08, slide_h * 0.8, _shade(metal, -40))  # muzzle
    grip_w = w * 0.26
    gx = w * rng.uniform(0.62, 0.7)
    c.poly([(gx, slide_h), (gx + grip_w, slide_h), (min(w - 1, gx + grip_w * 1.3), h - 1),
            (gx + grip_w * 0.3, h - 1)], _shade(metal, -30))
    c.ring((gx - w * 0.08, slide_h + h * 0.12), h * 0.12, metal, max(1.0, h * 0.05))
    return _maybe_rotate(rng, _maybe_flip(rng, c), 20)


def draw_long_gun(rng: np.random.Generator, size: int) -> Canvas:
    """A rifle: long thin barrel, receiver, grip and a wedge-shaped stock (aspect ~4)."""
    w = size
    h = max(4, int(w * rng.uniform(0.2, 0.28)))
    c = Canvas(w, h)
    metal, wood = _colour(rng), _colour(rng)
    barrel_h = h * 0.18
    c.rect(0, h * 0.15, w * 0.6, h * 0.15 + barrel_h, metal)
    c.rect(w * 0.35, h * 0.08, w * 0.68, h * 0.45, metal)  # receiver
    c.poly([(w * 0.66, h * 0.08), (w - 1, h * 0.35), (w - 1, h - 1), (w * 0.62, h * 0.45)], wood)
    c.poly([(w * 0.55, h * 0.45), (w * 0.62, h * 0.45), (w * 0.6, h * 0.85), (w * 0.53, h * 0.85)],
           wood)
    if rng.random() < 0.5:  # a magazine
        c.rect(w * 0.42, h * 0.45, w * 0.48, h * 0.8, _shade(metal, -30))
    return _maybe_rotate(rng, _maybe_flip(rng, c), 35)


def draw_blade(rng: np.random.Generator, size: int) -> Canvas:
    """Knife, sword or dagger: long thin pointed blade, crossguard and handle, any angle."""
    w = size
    h = max(6, int(w * rng.uniform(0.12, 0.18)))
    c = Canvas(w, h)
    steel, handle = _colour(rng), _colour(rng)
    handle_len = w * rng.uniform(0.2, 0.3)
    blade_h = h * 0.45
    cy = h / 2
    c.poly([(handle_len, cy - blade_h / 2), (w * 0.9, cy - blade_h / 2), (w - 1, cy),
            (w * 0.9, cy + blade_h / 2), (handle_len, cy + blade_h / 2)], steel)
    c.rect(handle_len - h * 0.12, 0, handle_len, h - 1, _shade(handle, -30))  # crossguard
    c.rect(0, cy - h * 0.18, handle_len - h * 0.12, cy + h * 0.18, handle)
    # Lying roughly level: a box around a diagonal blade is mostly background, and an upright
    # one is a thin tall thing, the person label's silhouette.
    return _rotate(c, rng.uniform(-25, 25))


def draw_axe(rng: np.random.Generator, size: int) -> Canvas:
    """An axe: a straight handle with a wedge-shaped head at one end."""
    h = size
    w = max(6, int(h * rng.uniform(0.4, 0.5)))
    c = Canvas(w, h)
    wood, steel = _colour(rng), _colour(rng)
    hx = w * 0.3
    c.rect(hx - w * 0.07, 0, hx + w * 0.07, h - 1, wood)
    c.poly([(hx, h * 0.02), (w - 1, 0), (w - 1, h * 0.3), (hx, h * 0.2)], steel)
    return _rotate(_maybe_flip(rng, c), 90 + rng.uniform(-30, 30))  # lying, not upright


def draw_bag(rng: np.random.Generator, size: int) -> Canvas:
    """A backpack: upright rounded box, front pocket, top handle and side straps."""
    h = size
    w = max(6, int(h * rng.uniform(0.65, 0.8)))
    c = Canvas(w, h)
    cloth = _colour(rng)
    top = h * 0.1
    c.ring((w / 2, top + 1), min(w * 0.15, top), _shade(cloth, -40), max(1.0, h * 0.03))
    c.rect(w * 0.05, top, w * 0.95, h - 1, cloth)
    c.ellipse((w / 2, top + 1), (w * 0.45, top), cloth)
    c.rect(w * 0.18, h * 0.55, w * 0.82, h * 0.9, _shade(cloth, -35))  # pocket
    c.line((w * 0.18, h * 0.55), (w * 0.82, h * 0.55), _shade(cloth, 50), max(1.0, h * 0.02))
    for x in (0.05, 0.95):
        c.rect(w * x - w * 0.05, h * 0.2, w * x + w * 0.05, h * 0.85, _shade(cloth, -60))
    return c


def draw_helmet(rng: np.random.Generator, size: int) -> Canvas:
    """A helmet: a half dome on a straight brim, with a visor line."""
    w = size
    h = max(6, int(w * rng.uniform(0.6, 0.7)))
    c = Canvas(w, h)
    shell = _colour(rng)
    brim_h = h * 0.12
    c.ellipse((w / 2, h - brim_h), (w * 0.44, h - brim_h - 1), shell, 0, 180, 360)
    c.rect(0, h - brim_h, w - 1, h - 1, _shade(shell, -40))
    c.line((w * 0.15, h * 0.55), (w * 0.85, h * 0.55), _shade(shell, 60), max(1.0, h * 0.04))
    return c


def draw_car(rng: np.random.Generator, size: int) -> Canvas:
    """A car or truck in profile: box body, cabin with windows, dark wheels (aspect ~2)."""
    w = size
    h = max(6, int(w * rng.uniform(0.42, 0.55)))
    c = Canvas(w, h)
    paint = _colour(rng)
    wheel_r = h * 0.2
    body_top, body_bot = h * 0.42, h - wheel_r
    c.rect(0, body_top, w - 1, body_bot, paint)
    truck = rng.random() < 0.4
    if truck:   # high cab in front, flat cargo box behind
        c.rect(w * 0.68, 0, w - 1, body_top, paint)
        c.rect(w * 0.74, h * 0.08, w * 0.95, body_top - 2, (230, 200, 160))
        c.rect(0, h * 0.05, w * 0.64, body_top, _shade(paint, -30))
    else:
        c.poly([(w * 0.2, body_top), (w * 0.32, 0), (w * 0.7, 0), (w * 0.85, body_top)], paint)
        c.poly([(w * 0.27, body_top - 2), (w * 0.35, h * 0.08), (w * 0.5, h * 0.08),
                (w * 0.5, body_top - 2)], (230, 200, 160))
        c.poly([(w * 0.53, body_top - 2), (w * 0.53, h * 0.08), (w * 0.68, h * 0.08),
                (w * 0.8, body_top - 2)], (230, 200, 160))
    for x in (0.2, 0.8):
        c.circle((w * x, h - wheel_r - 1), wheel_r, (25, 25, 25))
        c.circle((w * x, h - wheel_r - 1), wheel_r * 0.45, (170, 170, 170))
    return _maybe_flip(rng, c)


def draw_cycle(rng: np.random.Generator, size: int) -> Canvas:
    """A bicycle or motorcycle: two wheels joined by a rigid frame, handlebar and seat."""
    w = size
    h = max(6, int(w * rng.uniform(0.55, 0.65)))
    c = Canvas(w, h)
    frame = _colour(rng)
    wheel_r = h * 0.3
    rear, front = (wheel_r + 1, h - wheel_r - 1), (w - wheel_r - 2, h - wheel_r - 1)
    tyre = max(1.5, h * 0.05)
    for centre in (rear, front):
        c.ring(centre, wheel_r, (30, 30, 30), tyre)
    seat = (w * 0.38, h * 0.2)
    bar = (w * 0.72, h * 0.12)
    crank = (w * 0.48, rear[1])
    t = max(1.5, h * 0.045)
    tubes = ((rear, seat), (seat, crank), (crank, rear), (seat, bar), (bar, front), (crank, bar))
    for p, q in tubes:
        c.line(p, q, frame, t)
    if rng.random() < 0.5:  # motorcycle: a solid tank and engine block in the frame
        c.poly([seat, bar, (w * 0.62, rear[1] - wheel_r * 0.2), crank], frame)
    c.line((bar[0] - w * 0.05, 2), (bar[0] + w * 0.06, 2), (40, 40, 40), max(1.5, h * 0.04))
    c.line(bar, (bar[0], 2), frame, t)
    c.rect(seat[0] - w * 0.07, seat[1] - h * 0.05, seat[0] + w * 0.07, seat[1], (40, 40, 40))
    return _maybe_flip(rng, c)


def draw_tree(rng: np.random.Generator, size: int) -> Canvas:
    h = size
    w = max(6, int(h * rng.uniform(0.5, 0.75)))
    c = Canvas(w, h)
    c.rect(w * 0.44, h * 0.45, w * 0.56, h - 1, (30, 60, 90))
    green = (int(rng.integers(20, 80)), int(rng.integers(100, 180)), int(rng.integers(20, 80)))
    for _ in range(5):
        c.circle((w * rng.uniform(0.3, 0.7), h * rng.uniform(0.22, 0.4)), w * 0.28, green)
    c.circle((w / 2, w * 0.3), w * 0.3, green)
    return c


def draw_building(rng: np.random.Generator, size: int) -> Canvas:
    h = size
    w = max(6, int(h * rng.uniform(0.45, 0.9)))
    c = Canvas(w, h)
    wall = _colour(rng)
    c.rect(0, 0, w - 1, h - 1, wall)
    glass = _shade(wall, -70)
    step = max(6, int(w / rng.integers(3, 6)))
    for y in range(step // 2, h - step, step):
        for x in range(step // 3, w - step // 2, step):
            c.rect(x, y, x + step // 2, y + step // 2, glass)
    return c


DRAWERS: dict[str, Callable[[np.random.Generator, int], Canvas]] = {
    "figure": draw_figure, "quadruped": draw_quadruped, "bird": draw_bird,
    "handgun": draw_handgun, "long_gun": draw_long_gun, "blade": draw_blade, "axe": draw_axe,
    "bag": draw_bag, "helmet": draw_helmet, "car": draw_car, "cycle": draw_cycle,
    "tree": draw_tree, "building": draw_building,
}


def _maybe_flip(rng: np.random.Generator, c: Canvas) -> Canvas:
    """Face left or right at random."""
    if rng.random() < 0.5:
        c.img, c.mask = np.ascontiguousarray(c.img[:, ::-1]), np.ascontiguousarray(c.mask[:, ::-1])
    return c


def _maybe_rotate(rng: np.random.Generator, c: Canvas, max_deg: float) -> Canvas:
    return _rotate(c, rng.uniform(-max_deg, max_deg)) if rng.random() < 0.5 else c


def _rotate(c: Canvas, degrees: float) -> Canvas:
    """Rotate onto a canvas just big enough; the mask rotates with nearest-neighbour."""
    h, w = c.mask.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    nw, nh = int(np.ceil(h * sin + w * cos)) + 2, int(np.ceil(h * cos + w * sin)) + 2
    m[0, 2] += nw / 2 - w / 2
    m[1, 2] += nh / 2 - h / 2
    out = Canvas(nw, nh)
    out.img = cv2.warpAffine(c.img, m, (nw, nh), flags=cv2.INTER_LINEAR)
    out.mask = cv2.warpAffine(c.mask, m, (nw, nh), flags=cv2.INTER_NEAREST)
    return out


# ---------------------------------------------------------------------------- pictures

def _muted(rng: np.random.Generator) -> tuple[int, int, int]:
    """A random colour halfway to grey: scenery is duller than the things in it."""
    return tuple(int(v) for v in (rng.integers(0, 256, 3) + 120) // 2)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient + low-frequency blotches + soft clutter: never one flat colour."""
    a, b = np.array(_muted(rng), np.float32), np.array(_muted(rng), np.float32)
    t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    img = a * (1 - t) + b * t + np.zeros((1, w, 1), np.float32)
    blotch = rng.normal(0, 1, (max(2, h // 16), max(2, w // 16), 3)).astype(np.float32)
    img += cv2.resize(blotch, (w, h), interpolation=cv2.INTER_CUBIC) * rng.uniform(8, 25)
    img = np.clip(img, 0, 255).astype(np.uint8)
    # Translucent blobs (bushes, shadows). Not straight lines: at 64 px those look like
    # blades and sticks, i.e. like objects.
    layer = img.copy()
    for _ in range(int(rng.integers(2, 7))):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        axes = (int(rng.integers(w // 20, w // 5)), int(rng.integers(h // 20, h // 5)))
        cv2.ellipse(layer, centre, axes, float(rng.uniform(0, 180)), 0, 360, _muted(rng), -1,
                    cv2.LINE_AA)
    return cv2.addWeighted(layer, 0.45, img, 0.55, 0)


def _outline(rng: np.random.Generator, c: Canvas) -> Canvas:
    """A dark contour around the silhouette, as edges and shadows give real objects one;
    without it an object that happens to match the background colour has no shape at all."""
    h, w = c.mask.shape
    t = max(1, min(h, w) // 40)
    out = Canvas(w + 2 * t, h + 2 * t)
    out.img[t:t + h, t:t + w] = c.img
    out.mask[t:t + h, t:t + w] = c.mask
    grown = cv2.dilate(out.mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * t + 1,) * 2))
    out.img[(grown > 0) & (out.mask == 0)] = tuple(int(v) for v in rng.integers(0, 60, 3))
    out.mask = grown
    return out


def _texture(rng: np.random.Generator, c: Canvas) -> None:
    """Mottle the object's surface so it is not one flat colour either."""
    h, w = c.mask.shape
    noise = rng.normal(0, 1, (max(2, h // 6), max(2, w // 6), 1)).astype(np.float32)
    noise = cv2.resize(noise, (w, h), interpolation=cv2.INTER_LINEAR)[..., None] * 14
    c.img = np.clip(c.img.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def _paste(img: np.ndarray, c: Canvas, x: int, y: int) -> None:
    region = img[y:y + c.mask.shape[0], x:x + c.mask.shape[1]]
    on = c.mask > 0
    region[on] = c.img[on]


def _tight(c: Canvas) -> Canvas:
    """Crop the canvas to its mask, so a box from the paste position is tight."""
    ys, xs = np.nonzero(c.mask)
    out = Canvas(1, 1)
    out.img = c.img[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    out.mask = c.mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return out


class Scene:
    """One picture being composed: the pixels and the boxes placed so far."""

    def __init__(self, rng: np.random.Generator, w: int, h: int):
        self.rng, self.w, self.h = rng, w, h
        self.img = _background(rng, w, h)
        self.boxes: list[Box] = []

    def draw(self, name: str, size: int, *, avoid: bool = True, max_overlap: float = 0.15,
             **flags: int) -> Box | None:
        """Draw ``name`` with longest side ``size`` somewhere it fits; None if no place found.

        With ``avoid``, the new box may cover at most ``max_overlap`` of an earlier box
        (slight overlap, like real pictures); covered boxes are marked IsOccluded.
        """
        c = draw_object(self.rng, name, size)
        return self.place(name, c, avoid=avoid, max_overlap=max_overlap, **flags)

    def place(self, name: str, c: Canvas, *, avoid: bool = True, max_overlap: float = 0.15,
              **flags: int) -> Box | None:
        ch, cw = c.mask.shape
        if cw > self.w or ch > self.h:
            return None
        for _ in range(20):
            x = int(self.rng.integers(0, self.w - cw + 1))
            y = int(self.rng.integers(0, self.h - ch + 1))
            box = Box(name, x, y, x + cw, y + ch, **flags)
            hits = [b for b in self.boxes if b.intersection(box)]
            if avoid and any(b.intersection(box) > max_overlap * min(b.area(), box.area())
                             for b in hits):
                continue
            for b in hits:
                b.occluded = 1
            _paste(self.img, c, x, y)
            self.boxes.append(box)
            return box
        return None


def draw_object(rng: np.random.Generator, name: str, size: int) -> Canvas:
    c = DRAWERS[CATALOG[name][1]](rng, max(6, int(size)))
    _texture(rng, c)
    return _tight(_outline(rng, c))


def _main_object(rng: np.random.Generator, name: str, size: int) -> Canvas:
    """An object meant to be cropped: thin ones (rifles, blades) are drawn longer until their
    shorter side reaches MIN_MAIN_PX, so they are not all lost as too small."""
    c = draw_object(rng, name, size)
    short = min(c.mask.shape)
    if short < MIN_MAIN_PX:
        c = draw_object(rng, name, int(np.ceil(size * MIN_MAIN_PX / short)) + 1)
    return c


def _near_duplicate(rng: np.random.Generator, box: Box, name: str, w: int, h: int) -> Box:
    """The same figure boxed again by another annotator: edges moved by <= 3 % of its size."""
    bw, bh = box.x1 - box.x0, box.y1 - box.y0
    while True:
        dx = np.round(rng.uniform(-0.03, 0.03, 2) * bw).astype(int)
        dy = np.round(rng.uniform(-0.03, 0.03, 2) * bh).astype(int)
        twin = Box(name, max(0, box.x0 + dx[0]), max(0, box.y0 + dy[0]),
                   min(w, box.x1 + dx[1]), min(h, box.y1 + dy[1]), occluded=box.occluded)
        if twin.iou(box) > 0.8:
            return twin


def _draw_group(scene: Scene, name: str) -> None:
    """A row of 3-5 small look-alikes with one IsGroupOf box around them all."""
    rng = scene.rng
    n = int(rng.integers(3, 6))
    size = int(rng.integers(24, 48))
    parts = [draw_object(rng, name, size) for _ in range(n)]
    gap = max(1, size // 8)
    gw = sum(p.mask.shape[1] for p in parts) + gap * (n - 1)
    gh = max(p.mask.shape[0] for p in parts)
    group = Canvas(gw, gh)
    x = 0
    for p in parts:
        ph, pw = p.mask.shape
        _paste(group.img, p, x, gh - ph)
        group.mask[gh - ph:, x:x + pw] |= p.mask
        x += pw + gap
    scene.place(name, group, group_of=1)


def _draw_depiction(scene: Scene, name: str) -> None:
    """A framed poster on the wall showing ``name``: the object box has IsDepiction=1."""
    rng = scene.rng
    inner = draw_object(rng, name, int(rng.integers(40, 90)))
    ih, iw = inner.mask.shape
    pad = max(4, max(ih, iw) // 6)
    poster = Canvas(iw + 2 * pad, ih + 2 * pad)
    poster.rect(0, 0, iw + 2 * pad - 1, ih + 2 * pad - 1, _colour(rng))
    poster.img[pad // 2:-(pad // 2), pad // 2:-(pad // 2)] = _colour(rng)
    _paste(poster.img, inner, pad, pad)
    frame = scene.place("__poster__", poster)   # the frame itself is not an Open Images box here
    if frame is None:
        return
    scene.boxes.remove(frame)
    scene.boxes.append(Box(name, frame.x0 + pad, frame.y0 + pad, frame.x0 + pad + iw,
                           frame.y0 + pad + ih, depiction=1))


def _picture_size(rng: np.random.Generator, max_side: int) -> tuple[int, int]:
    """Mostly landscape like Open Images (4:3, 3:2), some portrait and square."""
    ratio = float(rng.choice([4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3], p=[0.4, 0.2, 0.1, 0.2, 0.1]))
    if ratio >= 1:
        return max_side, int(round(max_side / ratio))
    return int(round(max_side * ratio)), max_side


def draw_picture(seed: int, index: int, labels: dict[str, list[str]], max_side: int) -> Picture:
    """Picture number ``index``: distractors behind, 1-4 main objects, sometimes extras."""
    rng = np.random.default_rng([seed, index])
    image_id = f"{int(rng.integers(0, 2**64, dtype=np.uint64)):016x}"
    w, h = _picture_size(rng, max_side)
    scene = Scene(rng, w, h)
    short = min(w, h)
    for name in DISTRACTORS:
        if rng.random() < 0.35:
            scene.draw(name, int(short * rng.uniform(0.5, 0.95)), avoid=False)
    label_names = sorted(labels)
    figures = {lab: [n for n in labels[lab] if CATALOG[n][1] == "figure"] for lab in label_names}
    for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.1, 0.3, 0.4, 0.2]))):
        label = label_names[int(rng.integers(len(label_names)))]
        name = labels[label][int(rng.integers(len(labels[label])))]
        size = int(rng.uniform(MIN_MAIN_PX * 1.5, max(MIN_MAIN_PX * 1.5 + 1, short * 0.8)))
        box = scene.place(name, _main_object(rng, name, size))
        others = [n for n in figures[label] if n != name]
        if box is not None and name in figures[label] and others and rng.random() < 0.35:
            twin_name = others[int(rng.integers(len(others)))]
            scene.boxes.append(_near_duplicate(rng, box, twin_name, w, h))
    all_names = [n for lab in label_names for n in labels[lab]]
    for _ in range(int(rng.integers(0, 3))):   # too small to be recognised: crops skip them
        name = all_names[int(rng.integers(len(all_names)))]
        scene.draw(name, int(rng.integers(*TOO_SMALL_PX)))
    if rng.random() < 0.12:
        _draw_group(scene, all_names[int(rng.integers(len(all_names)))])
    if rng.random() < 0.12:
        _draw_depiction(scene, all_names[int(rng.integers(len(all_names)))])
    img = cv2.GaussianBlur(scene.img, (3, 3), 0)
    noise = rng.normal(0, 5, img.shape)
    img = np.clip(img.astype(np.float32) + noise, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", img, JPEG_PARAMS)
    assert ok, "OpenCV failed to encode a JPEG"
    return Picture(image_id, jpeg.tobytes(), w, h, scene.boxes)


def generate(seed: int, labels: dict[str, list[str]], images: int, max_side: int) -> list[Picture]:
    """All pictures of the sample, in index order. ImageIDs are unique (64-bit random)."""
    pictures = [draw_picture(seed, i, labels, max_side) for i in range(images)]
    ids = [p.image_id for p in pictures]
    assert len(set(ids)) == len(ids), "ImageID collision"   # 2**-63 odds per pair
    return pictures


def unknown_names(labels: dict[str, list[str]]) -> list[str]:
    """Class names in ``labels`` the generator has no MID or shape for."""
    return [n for names in labels.values() for n in names if n not in CATALOG]
