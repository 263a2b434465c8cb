"""Every suffix predict calls a picture (PICTURE_SUFFIXES, listed in its --help) decodes: a real
small file of that kind, written by OpenCV or Pillow, goes through predict's own read. A suffix
nothing here can write or read is not listed; a HEIF file (no pinned library decodes it) is still
found by its first bytes and named with an error that says what it is."""
from __future__ import annotations

import io
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages.common.pictures.decode import PICTURE_SUFFIXES
from stages.common.serving.predictor import Skipped, expand, read_image

HEIGHT, WIDTH = 24, 32
PIXELS = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), np.uint8)  # BGR


def opencv(extension: str):
    def write() -> bytes:
        ok, data = cv2.imencode(extension, PIXELS)
        assert ok, extension
        return data.tobytes()
    return write


def pillow(kind: str, mode: str = "RGB"):
    def write() -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(PIXELS[:, :, ::-1]).convert(mode).save(buffer, format=kind)
        return buffer.getvalue()
    return write


# Each listed suffix, and how a file of that kind is made: the kind the suffix names, whatever
# library writes it (JPEG's other names are JPEG; a .dib is a BMP).
WRITERS = {
    ".jpg": opencv(".jpg"), ".jpeg": opencv(".jpg"), ".jpe": opencv(".jpg"),
    ".jfif": opencv(".jpg"), ".jif": opencv(".jpg"),
    ".png": opencv(".png"), ".bmp": opencv(".bmp"), ".dib": opencv(".bmp"),
    ".webp": opencv(".webp"), ".tif": opencv(".tif"), ".tiff": opencv(".tiff"),
    ".gif": pillow("GIF"), ".jp2": pillow("JPEG2000"), ".j2k": pillow("JPEG2000"),
    ".avif": pillow("AVIF"), ".pbm": pillow("PPM", "1"), ".pgm": pillow("PPM", "L"),
    ".ppm": opencv(".ppm"), ".pnm": opencv(".pnm"), ".ras": opencv(".ras"),
    ".sr": opencv(".sr"),
}


def test_every_listed_suffix_has_a_real_file_here():
    assert set(WRITERS) == set(PICTURE_SUFFIXES), "a listed suffix with no file that checks it"


@pytest.mark.parametrize("suffix", PICTURE_SUFFIXES)
def test_every_listed_suffix_decodes_a_real_file_of_its_kind(tmp_path, suffix):
    path = tmp_path / f"picture{suffix}"
    path.write_bytes(WRITERS[suffix]())
    pixels = read_image(path)
    assert pixels.shape == (HEIGHT, WIDTH, 3) and pixels.dtype == np.uint8
    if suffix in (".png", ".bmp", ".dib", ".tif", ".tiff", ".ppm", ".pnm", ".ras", ".sr"):
        assert np.array_equal(pixels, PIXELS), suffix  # lossless: the very pixels


def heif_bytes() -> bytes:
    """The start of a phone's HEIC file: its ftyp box (brand heic), then a box nothing here
    parses."""
    ftyp = b"ftypheic" + b"\x00\x00\x00\x00" + b"mif1heic"
    return len(ftyp + b"1234").to_bytes(4, "big") + ftyp + b"\x00\x00\x00\x10meta" + bytes(12)


@pytest.mark.parametrize("suffix", [".heic", ".heif"])
def test_heif_is_not_listed_yet_found_and_named_for_what_it_is(tmp_path, suffix):
    assert suffix not in PICTURE_SUFFIXES
    folder = tmp_path / "camera"
    folder.mkdir()
    (folder / f"IMG_0001{suffix}").write_bytes(heif_bytes())
    skipped: list[Skipped] = []
    assert expand([folder], skipped) == [(folder / f"IMG_0001{suffix}", None)] and not skipped
    with pytest.raises(ValueError) as refused:
        read_image(folder / f"IMG_0001{suffix}")
    assert str(refused.value).startswith("a HEIF picture (a phone's .heic is HEIF), which no "
                                         "library here decodes; convert it to JPEG or PNG")


def test_a_file_named_heic_that_is_not_one_is_passed_over_with_a_note(tmp_path):
    (tmp_path / "notes.heic").write_text("not a picture at all\n")
    skipped: list[Skipped] = []
    assert expand([tmp_path], skipped)[0][1] == "folder holds no pictures (by name or content)"
    assert skipped == [Skipped(Path(tmp_path / "notes.heic"))]
