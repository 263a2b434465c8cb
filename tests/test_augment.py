"""The batched train augmentation is torchvision's RandomHorizontalFlip + ColorJitter(0.2, 0.2,
0.2, 0.1): the same distributions of draws, the same result per image for the same draws (both
implementations: torch on a batch, OpenCV per crop), and a function of (seed, epoch, crop) alone.
train.augment's AugMix and camera conditions before it: torchvision's AugMix and corrupt.py's
conditions, each crop a function of (seed, epoch, crop) alone too.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import ColorJitter
from torchvision.transforms.v2 import AugMix
from torchvision.transforms.v2 import functional as F

from stages.common.inference.batches import normalise
from stages.common.model.build import IMAGENET_MEAN as MEAN, IMAGENET_STD as STD
from stages.common.pictures.corrupt import corrupt
from stages.train.augment import (AUGMIX_STREAM, BRIGHTNESS, CONTRAST, SATURATION, Augment,
                                  Draws, augmix, before_jitter, draw, draw_conditions,
                                  jitter_opencv, jitter_torch)
from stages.train.data import derived_seed

N = 20_000


def test_draws_have_torchvisions_distributions():
    ours = draw(7, 3, N)
    jitter = ColorJitter(0.2, 0.2, 0.2, 0.1)
    theirs = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
              for _ in range(4000)]
    # the flip: torchvision's RandomHorizontalFlip(p=0.5)
    assert abs(ours.flip.float().mean().item() - 0.5) < 0.015
    # factors and hue: the same uniform ranges (two-sample Kolmogorov-Smirnov against
    # torchvision's own get_params draws, and against the exact uniform)
    for column, position in [(0, 1), (1, 2), (2, 3)]:
        mine = ours.factors[:, column].numpy()
        assert mine.min() >= 0.8 and mine.max() <= 1.2
        assert stats.ks_2samp(mine, [t[position] for t in theirs]).pvalue > 1e-3
        assert stats.kstest(mine, stats.uniform(0.8, 0.4).cdf).pvalue > 1e-3
    hue = ours.hue.numpy()
    assert hue.min() >= -0.1 and hue.max() <= 0.1
    assert stats.ks_2samp(hue, [t[4] for t in theirs]).pvalue > 1e-3
    # the order of the four adjustments: a uniform permutation, as torch.randperm(4)
    assert sorted(ours.order[0].tolist()) == [0, 1, 2, 3]
    counts = {}
    for row in ours.order.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    assert len(counts) == 24
    assert stats.chisquare(list(counts.values())).pvalue > 1e-3
    # the four draws of a crop are independent of each other
    assert abs(np.corrcoef(ours.factors[:, 0], ours.hue)[0, 1]) < 0.05


def test_draws_are_a_function_of_seed_epoch_and_crop():
    a, b = draw(7, 3, 500), draw(7, 3, 500)
    for name in ("flip", "factors", "hue", "order"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.factors, draw(7, 4, 500).factors)   # another epoch
    assert not torch.equal(a.factors, draw(8, 3, 500).factors)   # another seed


def reference(pixels: torch.Tensor, draws: Draws, idx: torch.Tensor) -> torch.Tensor:
    """torchvision's per-image functions, one picture at a time, for the given draws."""
    out = []
    for k, i in enumerate(idx.tolist()):
        x = F.to_dtype(pixels[k], torch.float32, scale=True)
        if draws.flip[i]:
            x = F.horizontal_flip(x)
        b, c, s = draws.factors[i].tolist()
        for op in draws.order[i].tolist():
            if op == BRIGHTNESS:
                x = F.adjust_brightness(x, b)
            elif op == CONTRAST:
                x = F.adjust_contrast(x, c)
            elif op == SATURATION:
                x = F.adjust_saturation(x, s)
            else:
                x = F.adjust_hue(x, draws.hue[i].item())
        out.append(x)
    return torch.stack(out)


def pictures(n: int, size: int = 24) -> torch.Tensor:
    """Random pictures with grey, black, white and saturated pixels (the edge cases of HSV)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8)
    x[:, :, :4] = rng.integers(0, 256, (n, 1, 4, size), dtype=np.uint8)  # grey rows
    x[:, :, 4:6] = 0
    x[:, :, 6:8] = 255
    x[:, 0, 8:10] = 255
    x[:, 1:, 8:10] = 0
    return torch.from_numpy(x)


@pytest.mark.parametrize("backend", ["torch", "opencv"])
def test_each_picture_gets_what_torchvision_gives_it_for_the_same_draws(backend):
    draws = draw(1, 2, 64)
    idx = torch.arange(64).flip(0)[:48]  # any crops, in any order
    pixels = pictures(48)
    expected = reference(pixels, draws, idx)
    if backend == "torch":
        got = jitter_torch(pixels, draws, idx)
    else:
        with ThreadPoolExecutor(2) as pool:
            got = jitter_opencv(pixels, draws, idx, pool)
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert (got - expected).abs().max().item() < 2e-5


def test_a_crop_gets_the_same_augmentation_whatever_its_batch_and_threads():
    pixels = pictures(40)
    idx = torch.arange(40)
    whole = Augment(5, 40, torch.device("cpu"), 1, MEAN, STD)
    whole.set_epoch(4)
    in_one = whole(pixels, idx)
    split = Augment(5, 40, torch.device("cpu"), 3, MEAN, STD)
    split.set_epoch(4)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    parts = torch.empty_like(in_one)
    for chunk in order.split(7):
        parts[chunk] = split(pixels[chunk], chunk)
    assert torch.equal(in_one, parts)
    on_torch = Augment(5, 40, torch.device("cpu"), 1, MEAN, STD, backend="torch")
    on_torch.set_epoch(4)
    assert (on_torch(pixels, idx) - in_one).abs().max().item() < 1e-4  # 2e-5 / std


def test_normalising_in_the_jitter_threads_gives_the_bits_of_normalise():
    pixels, idx, draws = pictures(24, 64), torch.arange(24), draw(3, 1, 24)
    with ThreadPoolExecutor(2) as pool:
        fused = jitter_opencv(pixels, draws, idx, pool, MEAN, STD)
        apart = normalise(jitter_opencv(pixels, draws, idx, pool), MEAN, STD)
    assert torch.equal(fused, apart)
    assert fused.is_contiguous(memory_format=torch.channels_last)


# ----- train.augment: augmix, conditions -------------------------------------------------------

TRAINED_ON = ("night", "fog", "jpeg")


def test_augmix_is_torchvisions_and_leaves_the_training_draws_alone():
    x = pictures(1, 32)[0]
    torch.manual_seed(11)
    after = torch.rand(3)  # what dropout would draw next
    torch.manual_seed(11)
    for seed in range(4):
        got = augmix(x, seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            assert got.dtype == torch.uint8 and torch.equal(got, AugMix()(x)), seed
    assert torch.equal(torch.rand(3), after)
    # in a batch (one intra-op thread): each crop AugMix's for its own seed of (seed, epoch, crop)
    pixels, idx = pictures(3, 32), torch.tensor([7, 0, 4])
    with ThreadPoolExecutor(1) as pool:
        batch = before_jitter(pixels, idx, "augmix", 5, 2, pool)
    for k, crop in enumerate(idx.tolist()):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed(5, 2, AUGMIX_STREAM, crop))
            assert torch.equal(batch[k], AugMix()(pixels[k])), crop


def augmented(augment: str, seed: int, threads: int, chunks: int = 1, n: int = 12
              ) -> torch.Tensor:
    """Epoch 2's model input for ``n`` crops, given to Augment in ``chunks`` shuffled batches."""
    pixels = pictures(n, 32)
    aug = Augment(seed, n, torch.device("cpu"), threads, MEAN, STD, augment=augment,
                  conditions=TRAINED_ON)
    aug.set_epoch(2)
    out = torch.empty(n, 3, 32, 32)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1))
    for part in order.chunk(chunks):
        out[part] = aug(pixels[part], part)
    return out


@pytest.mark.parametrize("augment", ["augmix", "conditions"])
def test_augment_batches_are_a_function_of_the_seed(augment):
    first = augmented(augment, 5, threads=1)
    assert torch.equal(first, augmented(augment, 5, threads=3, chunks=4))
    assert not torch.equal(first, augmented(augment, 6, threads=1))   # another seed
    assert not torch.equal(first, augmented("report", 5, threads=1))  # it adds a step


def test_conditions_are_corrupt_pys_on_the_drawn_share_and_severity():
    drawn = draw_conditions(5, 2, 24, len(TRAINED_ON))
    assert torch.equal(drawn.condition, draw_conditions(5, 2, 24, 3).condition)
    assert not torch.equal(drawn.condition, draw_conditions(5, 3, 24, 3).condition)
    many = draw_conditions(0, 1, 20_000, 3)
    under = many.condition >= 0
    assert abs(under.float().mean().item() - 0.5) < 0.02
    assert set(many.condition[under].tolist()) == {0, 1, 2}
    assert set(many.severity.tolist()) == {1, 2, 3, 4, 5}
    # each crop under its drawn condition is exactly corrupt()'s, then the report's jitter
    pixels = pictures(24, 32)
    report = Augment(5, 24, torch.device("cpu"), 1, MEAN, STD)
    report.set_epoch(2)
    expected = []
    for k in range(24):
        crop = pixels[k]
        c = int(drawn.condition[k])
        if c >= 0:
            hwc = crop.permute(1, 2, 0).numpy().copy()
            crop = torch.from_numpy(corrupt(hwc, TRAINED_ON[c], int(drawn.severity[k]),
                                            derived_seed(5, 2), str(k))).permute(2, 0, 1)
        expected.append(crop)
    want = report(torch.stack(expected), torch.arange(24))
    assert torch.equal(augmented("conditions", 5, threads=2, n=24), want)
