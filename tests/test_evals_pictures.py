"""The pictures stage's library: a fixed image per class, and every picture written as a real PNG."""

import numpy as np
import torch
from PIL import Image

from evals.pictures import draw, fixed_images
from pipeline.models.encoder import build_encoder


class Labelled(torch.utils.data.Dataset):
    def __init__(self, targets, size=32):
        self.targets = targets
        self.size = size

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return torch.full((3, self.size, self.size), float(i)), self.targets[i]


def test_fixed_images_take_the_first_of_each_class_then_fill():
    ds = Labelled([2, 2, 0, 1, 0, 1])
    got = fixed_images(ds, n=3)
    assert [int(x[0, 0, 0]) for x in got] == [2, 3, 0]  # class 0 first seen at 2, class 1 at 3, class 2 at 0
    got = fixed_images(Labelled([0, 0, 0, 1]), n=3)
    assert [int(x[0, 0, 0]) for x in got] == [0, 3, 1]


def test_draw_writes_every_picture(tiny_cfg, tmp_path):
    torch.manual_seed(0)
    encoders = {"ijepa": build_encoder(tiny_cfg.model, 32).eval(), "random": build_encoder(tiny_cfg.model, 32).eval()}
    images = torch.randn(4, 3, 32, 32)
    paths = draw(tiny_cfg, encoders, images, tmp_path)
    assert sorted(p.name for p in paths) == ["mask_strategies.png", "masks.png", "pca_ijepa.png", "pca_random.png"]
    for p in paths:
        pixels = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        assert pixels.shape[0] > 50 and pixels.std() > 0
