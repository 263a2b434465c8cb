"""Writes the hostile and ordinary pictures of tests/test_decode_pins.py (run once; the files are
committed, so the pinned pixels depend on the decoders only, never on this machine's encoders).

    python -m tests.pictures.make
"""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
ORIENTATION = 0x0112


def smooth(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    """Photo-like content: random colours blown up smoothly, plus fine texture."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (5, 7, channels), dtype=np.uint8)
    big = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-12, 13, big.shape)
    return np.clip(big.astype(int) + noise, 0, 255).astype(np.uint8).reshape(h, w, channels)


def pil(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **options)
    return buf.getvalue()


def corpus() -> dict[str, bytes]:
    rgb = Image.fromarray(smooth(120, 160, 1))
    turned = Image.Exif()
    turned[ORIENTATION] = 6  # "rotate 90 degrees clockwise to view"
    plain = pil(rgb, "JPEG", quality=90)
    deep = (smooth(60, 80, 6, 1)[..., 0].astype(np.uint16) * 257)
    return {
        "plain.jpg": plain,
        "exif6.jpg": pil(rgb, "JPEG", quality=90, exif=turned.tobytes()),
        "progressive420.jpg": pil(Image.fromarray(smooth(97, 131, 2)), "JPEG", quality=80,
                                  progressive=True, subsampling=2),
        "gray.jpg": pil(rgb.convert("L"), "JPEG", quality=90),
        "cmyk.jpg": pil(rgb.convert("CMYK"), "JPEG", quality=90),
        "multi.mpo": pil(rgb, "MPO", save_all=True, append_images=[rgb.rotate(90)]),
        "gray.png": pil(Image.fromarray(smooth(50, 70, 3, 1)[..., 0]), "PNG"),
        "alpha.png": pil(Image.fromarray(smooth(50, 70, 4, 4), "RGBA"), "PNG"),
        "deep16.png": cv2.imencode(".png", deep)[1].tobytes(),
        "odd.png": pil(Image.fromarray(smooth(121, 163, 5)), "PNG"),
        "truncated.jpg": plain[: len(plain) * 2 // 3],
        "truncated.png": pil(rgb, "PNG")[:-300],
        "empty.jpg": b"",
        "not_a_picture.jpg": b"\xff\xd8 this is text, not a JPEG\n" * 4,
    }


if __name__ == "__main__":
    for name, data in corpus().items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(corpus())} pictures to {HERE}")
