"""Image transforms: the report's train-only augmentation and ImageNet normalisation.

Crops are already square canvases of ``crops.size`` pixels, so nothing is resized here.
"""
from __future__ import annotations

from torchvision import transforms as T


def train_transform(mean: list[float], std: list[float]) -> T.Compose:
    return T.Compose([
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.2, 0.2, 0.2, 0.1),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def eval_transform(mean: list[float], std: list[float]) -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(mean, std)])
