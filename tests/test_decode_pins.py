"""Each caller's decoded pixels stay what they were: extract_crops (stored orientation, BGR, full
and 1/2, 1/4, 1/8 scale), the crop batches of train/calibrate/evaluate (stored orientation, RGB)
and predict (EXIF orientation applied, BGR), on the hostile and ordinary pictures of
tests/pictures/ (committed bytes; tests/pictures/make.py wrote them).

An outcome is the SHA-256 of the array (shape and dtype included), or why the caller refused the
file. The expected values were recorded with the decoders as they were before one module owned
decoding; a change of any pixel, of a refusal, or of a reduced decode's factor fails here.
Print the current table with ``python -m tests.test_decode_pins``.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stages.common.inference import batches
from stages.common.pictures import decode as pictures
from stages.common.serving import predictor
from stages.extract_crops import stage as extract_crops

PICTURES = Path(__file__).resolve().parent / "pictures"
NAMES = sorted(p.name for p in PICTURES.iterdir() if p.suffix != ".py")
LIMIT = 10**8


def digest(image: np.ndarray) -> str:
    image = np.ascontiguousarray(image)
    head = f"{image.shape} {image.dtype} ".encode()
    return hashlib.sha256(head + image.tobytes()).hexdigest()[:16]


def for_crops(name: str, size: int | None) -> str:
    """extract_crops' picture: full size (``size`` None), or reduced for one whole-picture box
    cut to ``size`` px (the factor it decoded at is part of the outcome)."""
    task = extract_crops.ImageTask(name, str(PICTURES / name), "", 0, size or 16, 1,
                                   size is not None, LIMIT,
                                   ((0, "person", 0.0, 1.0, 0.0, 1.0),))
    image, problem, _, factor = extract_crops.read_for_crops(task)
    return f"refused {problem}" if image is None else f"1/{factor} {digest(image)}"


def for_batches(name: str) -> str:
    try:
        pixels = batches.decode_files([str(PICTURES / name)], torch.device("cpu"), 1)
    except Exception:  # the message is the batch path's own business; refused is what counts
        return "refused"
    return digest(pixels[0].numpy())


def for_predict(name: str) -> str:
    try:
        return digest(predictor.read_image(PICTURES / name, LIMIT))
    except ValueError as exc:
        return f"refused {exc}"


CALLERS = {
    "crops": lambda n: for_crops(n, None),
    "crops/2": lambda n: for_crops(n, 80),
    "crops/4": lambda n: for_crops(n, 40),
    "crops/8": lambda n: for_crops(n, 20),
    "batches": for_batches,
    "predict": for_predict,
}

EXPECTED: dict[str, dict[str, str]] = {
    'alpha.png': {
        'crops': '1/1 03ab03f2421ed2fd',
        'crops/2': '1/1 03ab03f2421ed2fd',
        'crops/4': '1/1 03ab03f2421ed2fd',
        'crops/8': '1/2 a81ecdb7b6bece35',
        'batches': '2d0692e30a43cd43',
        'predict': '03ab03f2421ed2fd',
    },
    'cmyk.jpg': {
        'crops': '1/1 22ecad5523869701',
        'crops/2': '1/2 5d96dffa25778202',
        'crops/4': '1/4 89978c8ed8d9b141',
        'crops/8': '1/8 51f2aadb97c14136',
        'batches': 'd7831c64373fd334',
        'predict': '22ecad5523869701',
    },
    'deep16.png': {
        'crops': '1/1 b8beed0db96f559c',
        'crops/2': '1/1 b8beed0db96f559c',
        'crops/4': '1/2 9237963464e7f7f4',
        'crops/8': '1/4 89ca206992e65379',
        'batches': 'baa779e977a0df17',
        'predict': 'b8beed0db96f559c',
    },
    'empty.jpg': {
        'crops': 'refused empty_file',
        'crops/2': 'refused empty_file',
        'crops/4': 'refused empty_file',
        'crops/8': 'refused empty_file',
        'batches': 'refused',
        'predict': 'refused empty file',
    },
    'exif6.jpg': {
        'crops': '1/1 b6d9e6a3a3a7e779',
        'crops/2': '1/2 2f92a9228dffc61a',
        'crops/4': '1/4 33995eb88b0989fc',
        'crops/8': '1/8 170e4a5723fc736a',
        'batches': '1d73f6ac9789ccce',
        'predict': 'ed491d123022c5e2',
    },
    'gray.jpg': {
        'crops': '1/1 9854e40fd766fed7',
        'crops/2': '1/2 5550b938e91fc28a',
        'crops/4': '1/4 b70da696d87a8f65',
        'crops/8': '1/8 c017bd9dbcafba4e',
        'batches': 'b9adc7dba23f5e49',
        'predict': '9854e40fd766fed7',
    },
    'gray.png': {
        'crops': '1/1 593f10cf07d47100',
        'crops/2': '1/1 593f10cf07d47100',
        'crops/4': '1/1 593f10cf07d47100',
        'crops/8': '1/2 badb9c3f9a75c03c',
        'batches': '45ba067d550a41ea',
        'predict': '593f10cf07d47100',
    },
    'multi.mpo': {
        'crops': '1/1 5a9d3447f9278811',
        'crops/2': '1/2 c13425eaea76985e',
        'crops/4': '1/4 de58ce5d585305d9',
        'crops/8': '1/8 6bc5689e1e8d6af6',
        'batches': 'fc029c14e6c977b6',
        'predict': '5a9d3447f9278811',
    },
    'not_a_picture.jpg': {
        'crops': 'refused not_an_image',
        'crops/2': 'refused not_an_image',
        'crops/4': 'refused not_an_image',
        'crops/8': 'refused not_an_image',
        'batches': 'refused',
        'predict': 'refused cannot decode the file as an image (damaged, or not a picture)',
    },
    'odd.png': {
        'crops': '1/1 c29fc1335e6e88d4',
        'crops/2': '1/1 c29fc1335e6e88d4',
        'crops/4': '1/1 c29fc1335e6e88d4',
        'crops/8': '1/1 c29fc1335e6e88d4',
        'batches': 'b0f3f3ddc6c75bdc',
        'predict': 'c29fc1335e6e88d4',
    },
    'plain.jpg': {
        'crops': '1/1 b6d9e6a3a3a7e779',
        'crops/2': '1/2 2f92a9228dffc61a',
        'crops/4': '1/4 33995eb88b0989fc',
        'crops/8': '1/8 170e4a5723fc736a',
        'batches': '1d73f6ac9789ccce',
        'predict': 'b6d9e6a3a3a7e779',
    },
    'progressive420.jpg': {
        'crops': '1/1 a9cbf2d7a6225c11',
        'crops/2': '1/1 a9cbf2d7a6225c11',
        'crops/4': '1/2 171320105478a97b',
        'crops/8': '1/4 b5d707433ec5849c',
        'batches': '4295473a755b9784',
        'predict': 'a9cbf2d7a6225c11',
    },
    'truncated.jpg': {
        'crops': 'refused truncated',
        'crops/2': 'refused truncated',
        'crops/4': 'refused truncated',
        'crops/8': 'refused truncated',
        'batches': 'refused',
        'predict': 'refused truncated: the end of the picture is missing (a cut-off copy?)',
    },
    'truncated.png': {
        'crops': 'refused truncated',
        'crops/2': 'refused truncated',
        'crops/4': 'refused truncated',
        'crops/8': 'refused truncated',
        'batches': 'refused',
        'predict': 'refused truncated: the end of the picture is missing (a cut-off copy?)',
    },
}


def test_the_corpus_is_complete():
    assert NAMES == sorted(EXPECTED), "tests/pictures/ and EXPECTED disagree"


@pytest.mark.parametrize("name", NAMES)
def test_every_callers_pixels_are_pinned(name):
    got = {caller: outcome(name) for caller, outcome in CALLERS.items()}
    assert got == EXPECTED[name]


def test_the_pins_tell_the_callers_apart():
    """The corpus exercises what differs between callers: EXIF turns predict's picture only,
    colour order differs between batches and the rest, reduced decodes are reduced."""
    assert EXPECTED["exif6.jpg"]["predict"] != EXPECTED["exif6.jpg"]["crops"].split()[1]
    assert EXPECTED["plain.jpg"]["predict"] == EXPECTED["plain.jpg"]["crops"].split()[1]
    assert EXPECTED["plain.jpg"]["batches"] != EXPECTED["plain.jpg"]["predict"]
    assert [EXPECTED["plain.jpg"][f"crops/{f}"].split()[0] for f in (2, 4, 8)] == \
        ["1/2", "1/4", "1/8"]


if __name__ == "__main__":
    for n in NAMES:
        row = {caller: outcome(n) for caller, outcome in CALLERS.items()}
        print(f"    {n!r}: {{" + ", ".join(f"{c!r}: {v!r}" for c, v in row.items()) + "},")


def test_damaged_crops_are_refused_where_checked_pictures_get_a_second_try():
    """A libjpeg warning inside the scan (a restart marker in the middle of the data): a source
    picture that passed the byte checks is still decoded (OpenCV tolerates the warning, as
    extract_crops always did), but unchecked crop bytes are refused, not papered over."""
    data = (PICTURES / "plain.jpg").read_bytes()
    cut = data.find(b"\xff\xda") + 200
    damaged = data[:cut] + b"\xff\xd3" + data[cut + 2:]
    assert pictures.examine(damaged, LIMIT)[1] == ""
    assert pictures.decode(damaged).shape == (120, 160, 3)
    with pytest.raises(pictures.Undecodable, match="Corrupt JPEG data"):
        pictures.decode(damaged, colours=pictures.RGB, checked=False)
    assert pictures.decode(data, checked=False).shape == (120, 160, 3)


def test_a_caller_that_asks_for_what_does_not_exist_is_told_so():
    """A typo in a caller's needs must not decode quietly in another colour order or size."""
    data = (PICTURES / "plain.jpg").read_bytes()
    for needs in [{"scale": 3}, {"orientation": "exif6"}, {"colours": "rgb"}]:
        with pytest.raises(TypeError, match="not one of"):
            pictures.decode(data, **needs)


@pytest.mark.parametrize("name", ["plain.jpg", "progressive420.jpg", "gray.jpg", "exif6.jpg",
                                  "multi.mpo", "gray.png", "alpha.png", "odd.png"])
def test_the_mistakes_gallery_shows_the_pixels_pil_showed(name):
    """evaluate's gallery read its crops with PIL (``Image.open(p).convert("RGB")``); it now
    reads them as the crop batches do, and on any crop-like file the pixels are PIL's."""
    path = PICTURES / name
    with Image.open(path) as im:
        expected = np.asarray(im.convert("RGB"))
    got = pictures.decode(path.read_bytes(), colours=pictures.RGB, checked=False)
    assert got.shape == expected.shape and np.array_equal(got, expected)
