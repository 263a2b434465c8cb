"""The shared data path: crops decoded once, normalised as torchvision's per-image transforms do,
kept where they fit, the same batches whichever way they are kept; prefetching that loses no
error."""
import itertools

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from stages.common.inference import batches as B
from stages.common.infra.errors import StageError
from stages.common.model.build import IMAGENET_MEAN, IMAGENET_STD
from stages.train.data import prefetched

CPU = torch.device("cpu")


@pytest.fixture
def split(tmp_path):
    """A labelled split of JPEG and PNG crops, 24 px, random content."""
    rng = np.random.default_rng(3)
    for i, label in enumerate(["animal", "object", "person"] * 5):
        folder = tmp_path / label
        folder.mkdir(exist_ok=True)
        pixels = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
        cv2.imwrite(str(folder / f"{i}.{'png' if i % 4 == 0 else 'jpg'}"), pixels,
                    [cv2.IMWRITE_JPEG_QUALITY, 90])
    return tmp_path


def test_crops_are_decoded_to_pils_pixels_and_normalised_as_torchvision_does(split):
    crops = B.CropSet.load(split, CPU)
    per_image = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    assert crops.classes == ["animal", "object", "person"] and crops.size == 24
    for i, path in enumerate(crops.paths):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert np.array_equal(crops.pixels[i].permute(1, 2, 0).numpy(), rgb), path
    x = B.normalise(crops.pixels, IMAGENET_MEAN, IMAGENET_STD)
    expected = torch.stack([per_image(Image.open(p).convert("RGB")) for p in crops.paths])
    assert torch.equal(x, expected)  # bit for bit: evaluate scores what it scored before
    assert x.is_contiguous(memory_format=torch.channels_last)


def test_kept_in_memory_or_streamed_the_batches_are_the_same(split):
    kept = B.CropSet.load(split, CPU, workers=2, keep="host")
    streamed = B.CropSet.load(split, CPU, workers=2, keep="stream")
    assert streamed.pixels is None and kept.pixels is not None
    order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(0))
    a = list(B.batches(kept, order, 4, CPU, IMAGENET_MEAN, IMAGENET_STD))
    b = list(B.batches(streamed, order, 4, CPU, IMAGENET_MEAN, IMAGENET_STD))
    assert [len(t) for _, t in a] == [4, 4, 4, 3]  # the last batch keeps what is left
    for (xa, ta), (xb, tb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    assert torch.equal(torch.cat([t for _, t in a]), kept.targets[order])


def test_where_a_split_is_kept_follows_the_memory_there_is(monkeypatch):
    monkeypatch.setattr(B, "available_ram", lambda: 10_000)
    assert B.where_to_keep(4_000, CPU) == "host"
    assert B.where_to_keep(6_000, CPU) == "stream"  # more than half the free memory
    monkeypatch.setattr(B, "available_ram", lambda: None)
    assert B.where_to_keep(10**12, CPU) == "host"  # unknown: keep it


def test_an_unreadable_crop_is_one_line_naming_it(split):
    bad = split / "person" / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not a jpeg at all")
    with pytest.raises(StageError, match="bad.jpg: cannot decode"):
        B.CropSet.load(split, CPU)


def test_prefetching_keeps_order_and_hands_errors_over():
    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def failing():
        yield 1
        raise RuntimeError("decode failed in the producer")

    got = []
    with pytest.raises(RuntimeError, match="decode failed in the producer"):
        for item in prefetched(failing()):
            got.append(item)
    assert got == [1]
    # a consumer that stops early does not leave the producer blocked for ever
    assert list(itertools.islice(prefetched(iter(range(10_000)), depth=1), 3)) == [0, 1, 2]


@pytest.mark.parametrize("name", ["0000.jpg", "zzzz.jpg"])  # first (its size is read) or not
@pytest.mark.parametrize("keep", ["host", "stream"])
def test_a_zero_byte_crop_is_one_line_naming_it(split, name, keep):
    """A zero-byte crop was a traceback (torch.frombuffer's, or PIL's when it sorted first);
    a cut-off one was already one line."""
    (split / "animal" / name).write_bytes(b"")
    with pytest.raises(StageError) as err:
        crops = B.CropSet.load(split, CPU, keep=keep)
        list(B.batches(crops, torch.arange(len(crops)), 4, CPU, IMAGENET_MEAN, IMAGENET_STD))
    assert str(err.value) == (f"{split / 'animal' / name}: empty file (0 bytes: a damaged "
                              "copy); rerun extract_crops and split")


def test_the_gpu_path_names_a_bad_crop_too(split):
    """Crops that are not JPEG are decoded on the CPU beside nvJPEG: the same one line."""
    paths = sorted(str(p) for p in split.rglob("*.png"))
    (split / "animal" / "0.png").write_bytes(b"")
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool, pytest.raises(StageError, match="0.png: empty file"):
        B._decode_on_gpu([B.read_bytes(p) for p in paths], paths, CPU, pool)
