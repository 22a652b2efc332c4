"""A stand-in dataset for tests and benchmarks: seeded Gaussian images, no files.

It lives in the package, not in tests/, because Ray workers import it by name: the pretrain and sweep
tests hand `functools.partial(RandomImages, n, size)` to a TorchTrainer as its dataset function.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.data import Dataset


class RandomImages(Dataset):
    """`n` fixed Gaussian images (3, S, S), seeded."""

    def __init__(self, n: int, image_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randn(n, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i]
