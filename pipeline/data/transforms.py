"""Image transforms: I-JEPA pretraining crop and the evaluation resize + centre crop.

Both take a PIL image (any mode; converted to RGB) and return a normalised float32 tensor (3, S, S).
torchvision is imported on first use: it costs seconds, and the prepare stage never needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The official I-JEPA code (src/transforms.py) crops with scale (0.3, 1.0) and no colour jitter.
CROP_SCALE = (0.3, 1.0)


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _tv():
    from torchvision import transforms

    return transforms


def normalize_uint8(image: np.ndarray) -> Tensor:
    """(H, W, 3) uint8 -> normalised float32 (3, H, W); the same numbers as `to_tensor()` on its PIL image."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def to_tensor() -> Callable[[Image.Image], Tensor]:
    """RGB PIL (H, W) -> normalised float32 (3, H, W), no geometry change."""
    T = _tv()
    return T.Compose([T.Lambda(_rgb), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int) -> Callable[[Image.Image], Tensor]:
    """Pretraining view: RandomResizedCrop(scale 0.3-1), horizontal flip, normalise -> (3, S, S)."""
    T = _tv()
    return T.Compose([
        T.Lambda(_rgb),
        T.RandomResizedCrop(image_size, scale=CROP_SCALE),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def eval_transform(image_size: int, crop_fraction: float = 1.0) -> Callable[[Image.Image], Tensor]:
    """Shorter side to S / crop_fraction, centre crop S, normalise -> (3, S, S).

    With the default crop_fraction 1.0 an S x S image keeps its exact pixels (torchvision's Resize
    returns the image unchanged when it already has the size); 0.875 gives the classic 256/224 recipe.
    """
    T = _tv()
    resize = round(image_size / crop_fraction)
    return T.Compose([
        T.Lambda(_rgb),
        T.Resize(resize, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(image_size),
        T.ToTensor(),
        T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
