"""Picture files: what they are from their bytes and header alone, and their decoded pixels.

The checks (:func:`examine`) come before any decode and are shared by extract_crops (source
pictures) and predict (an operator's files), so both refuse the same files for the same reasons:
empty, not a picture, more pixels than the limit (a decompression bomb: a 1 MB PNG can announce
30,000 x 30,000 pixels, 2.7 GB decoded), or cut off before its end.

:func:`decode` is the one decoder; each caller says what it needs:

- extract_crops: full size or 1/2, 1/4, 1/8; orientation stored; BGR; checked bytes;
- the crop batches (train, calibrate, evaluate, export): full size; stored; RGB; unchecked
  bytes (crops the pipeline wrote: no header parse per crop);
- predict: full size; EXIF orientation applied; BGR; checked bytes.

Orientation "stored" ignores an EXIF Orientation tag: Open Images boxes refer to the picture as
stored, and crops carry no tag. "exif" turns an operator's photo as it was taken.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image

from stages.common.infra.errors import StageError

# Pictures above this many pixels are not decoded: crops.max_image_pixels' default (params.yaml
# holds the same value; a test keeps them equal) and predict's --max-image-pixels. 100 MP is
# 300 MB decoded; Open Images' largest are a few MP. The highest either accepts: params.py's
# MAX_IMAGE_PIXELS.
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Why a picture could not be used (extract_crops counts them by these names).
IMAGE_PROBLEMS = ["empty_file", "not_an_image", "too_many_pixels", "truncated", "decode_failed"]
ORIENTATION_TAG = 0x0112
JPEG_MAGIC = b"\xff\xd8"
STORED, EXIF = "stored", "exif"  # orientation: ignore the EXIF tag, or apply it
BGR, RGB = "BGR", "RGB"  # colour order of the decoded channels
_OPENCV_SCALE = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}


# Names that say "picture": the formats predict decodes (PIL reads the header, OpenCV or
# libjpeg-turbo the pixels: JPEG, PNG, BMP, WebP, TIFF, GIF, JPEG 2000, AVIF, PNM, Sun raster),
# each checked on a real file of its kind (tests/test_picture_suffixes.py). A file so named is
# always an input: answered, or its own error. Not .heic / .heif: neither the pinned Pillow nor
# OpenCV decodes HEIF (pillow-heif would: a new dependency bundling libheif and its HEVC
# decoder); a HEIF file is still found by its first bytes (PICTURE_BRANDS) and named with its
# own error, never passed over.
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif", ".jif", ".png", ".bmp", ".dib", ".webp",
                    ".tif", ".tiff", ".gif", ".jp2", ".j2k", ".avif", ".pbm", ".pgm", ".ppm",
                    ".pnm", ".ras", ".sr")
SIGNATURE_BYTES = 32  # enough for every signature below
# The first bytes of each format (its "magic number"), for a file whose name says nothing.
SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"),
              (b"GIF89a", "GIF"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
              (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
              (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"\x59\xa6\x6a\x95", "Sun raster"))
# ISO base media files (HEIF, AVIF) name their kind in the "ftyp" box at byte 4: HEVC-coded
# HEIF (a phone's .heic), AVIF, and the brands either may lead with.
HEIF_BRANDS = {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs"}
PICTURE_BRANDS = {**dict.fromkeys(HEIF_BRANDS, "HEIF"), b"avif": "AVIF", b"avis": "AVIF",
                  b"mif1": "HEIF/AVIF", b"msf1": "HEIF/AVIF"}
BMP_HEADER_SIZES = {12, 40, 52, 56, 64, 108, 124}  # the DIB header versions


def picture_format(head: bytes) -> str | None:
    """The picture format a file's first :data:`SIGNATURE_BYTES` announce, or None. "BM" alone
    begins many a text; a BMP also names its header's size at byte 14."""
    for magic, name in SIGNATURES:
        if head.startswith(magic):
            return name
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    if head[:2] == b"BM" and int.from_bytes(head[14:18], "little") in BMP_HEADER_SIZES:
        return "BMP"
    if head[4:8] == b"ftyp":
        return PICTURE_BRANDS.get(head[8:12])
    return None


@dataclass(frozen=True)
class Header:
    width: int
    height: int
    format: str
    exif_turned: bool


def read_header(data: bytes) -> Header | None:
    """Size, format and orientation tag from the header alone; None when PIL cannot parse it."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the pixel limit is ours (image_problem), not PIL's
    try:
        with warnings.catch_warnings(), Image.open(io.BytesIO(data)) as im:
            warnings.simplefilter("ignore")
            width, height = im.size
            try:
                turned = im.getexif().get(ORIENTATION_TAG, 1) not in (1, None)
            except Exception:  # a malformed EXIF block says nothing about the pixels
                turned = False
            return Header(width, height, str(im.format), turned)
    except Exception:  # PIL raises a zoo of types on hostile headers
        return None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def examine(data: bytes, max_pixels: int) -> tuple[Header | None, str]:
    """(header, problem): the header (None when unreadable) and why the picture must not be
    decoded ("" when it may be), the checks every caller of checked bytes runs."""
    header = read_header(data) if data else None
    return header, image_problem(data, header, max_pixels)


def image_problem(data: bytes, header: Header | None, max_pixels: int) -> str:
    """Why the picture must not be decoded ("" when it may be), from its bytes and header."""
    if not data:
        return "empty_file"
    if header is None:
        return "not_an_image"
    if header.width * header.height > max_pixels:
        return "too_many_pixels"
    # A cut-off download still decodes (libjpeg pads the rest with grey) and would become
    # crops of half a picture: require an end-of-image marker with no scan after it, and the
    # PNG end chunk. Neither JPEG marker can occur inside entropy-coded data (0xFF is stuffed
    # there); an EXIF thumbnail's own markers come before the picture's first scan. Searched
    # from the end, a complete file costs two short scans, not two passes over its bytes.
    if header.format == "JPEG":
        end = data.rfind(b"\xff\xd9")
        if end < 0 or data.find(b"\xff\xda", end) >= 0:
            return "truncated"
    if header.format == "PNG" and data.rfind(b"IEND") < 0:
        return "truncated"
    return ""


def describe(problem: str, header: Header | None, max_pixels: int) -> str:
    """A problem of :func:`image_problem` in words, for a person reading one file's line."""
    if problem == "too_many_pixels":
        return (f"{header.width} x {header.height} pixels, more than the limit of "
                f"{max_pixels:,}; not decoded (a decompression bomb, or raise the limit)")
    return {"empty_file": "empty file",
            "not_an_image": "cannot decode the file as an image (damaged, or not a picture)",
            "truncated": "truncated: the end of the picture is missing (a cut-off copy?)",
            "decode_failed": "cannot decode the file as an image (damaged, or not a picture)",
            }[problem]


class Undecodable(ValueError):
    """The bytes gave no picture; the message says why, in one line."""


def decode(data: bytes | np.ndarray, scale: int = 1, orientation: str = STORED,
           colours: str = BGR, checked: bool = True) -> np.ndarray:
    """A picture file's bytes -> H x W x 3 uint8 in ``colours`` order, at 1/``scale`` of its
    size (1, 2, 4, 8; libjpeg's DCT scaling rounds sizes up). Gray, 16-bit, alpha and CMYK
    pictures all come back as 8-bit colour.

    A full-size JPEG in stored orientation goes to libjpeg-turbo through simplejpeg (the same
    library, accurate IDCT and smooth upsampling as OpenCV: its pixels, tested; faster around
    the same calls, BENCHMARKS.md); anything else to OpenCV. ``checked``: the bytes passed
    :func:`examine`; a JPEG that libjpeg-turbo declines (CMYK with subsampled chroma, any
    libjpeg warning such as damaged data) then goes to OpenCV, which tolerates warnings.
    Unchecked bytes get no such second try, so a cut-off or damaged crop is refused, never
    padded with grey.

    Raises :class:`Undecodable`; OpenCV's own errors (cv2.error, MemoryError) pass through.
    """
    if scale not in _OPENCV_SCALE or orientation not in (STORED, EXIF) or \
            colours not in (BGR, RGB):  # a caller's slip, never the picture's fault
        raise TypeError(f"decode: scale {scale!r}, orientation {orientation!r}, colours "
                        f"{colours!r}: not one of {tuple(_OPENCV_SCALE)}, {STORED}/{EXIF}, "
                        f"{BGR}/{RGB}")
    if scale == 1 and orientation == STORED and bytes(data[:2]) == JPEG_MAGIC:
        try:
            return libjpeg_turbo(data, colours)
        except Undecodable:
            if not checked:
                raise
    return opencv(data, scale, orientation, colours)


def libjpeg_turbo(data: bytes | np.ndarray, colours: str) -> np.ndarray:
    """A full-size JPEG by simplejpeg, orientation tag ignored; strict: a libjpeg warning
    (damaged data it could paper over) refuses the picture."""
    try:
        image = simplejpeg.decode_jpeg(data, colorspace=colours, fastdct=False,
                                       fastupsample=False, strict=True)
    except (ValueError, RuntimeError, TypeError) as exc:
        text = str(exc).strip()
        raise Undecodable(text.splitlines()[0][:120] if text else type(exc).__name__) from None
    if image.ndim != 3 or image.shape[2] != 3 or not image.size:
        raise Undecodable(f"libjpeg-turbo gave a {image.shape} array")
    return image


def opencv(data: bytes | np.ndarray, scale: int, orientation: str, colours: str) -> np.ndarray:
    """Any picture OpenCV reads, at 1/``scale``, orientation tag applied or ignored."""
    flags = _OPENCV_SCALE[scale] | (cv2.IMREAD_IGNORE_ORIENTATION if orientation == STORED
                                    else 0)
    image = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    if image is None or image.size == 0:
        raise Undecodable("not a picture OpenCV can decode")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB) if colours == RGB else image


def square_side(path: str | Path) -> int:
    """The side of a square crop file, from its header; a crop that is not square is an error
    (every crop of the pipeline is an S x S canvas, and the model was trained on one S)."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for a file it cannot read
        empty = Path(path).is_file() and Path(path).stat().st_size == 0
        what = "empty file (0 bytes: a damaged copy)" if empty else \
            f"not a picture ({type(exc).__name__})"
        raise StageError(f"{path}: {what}; rerun extract_crops and split") from None
    if width != height:
        raise StageError(f"{path}: crops must be square, got {width}x{height}; rerun "
                         "extract_crops")
    return width
