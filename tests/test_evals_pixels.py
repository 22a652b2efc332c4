"""The raw-pixel baseline: features by hand, the probe reads a linear pixel cue, the 1 % rows come from the cache."""

import pytest
import torch
from torch.utils.data import TensorDataset

from evals.pixels import PixelFeatures, pixel_features, pixel_probe
from pipeline.config import ProbeConfig


def test_features_are_area_downscaled_pixels():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    tok = PixelFeatures(16)(x)
    assert tok.shape == (2, 1, 3 * 16 * 16)
    assert tok[0, 0, 0] == pytest.approx(x[0, 0, :2, :2].mean())  # the top-left 2x2 block of channel 0
    layers = PixelFeatures(16).forward_layers(x, 4)
    assert len(layers) == 4 and torch.equal(layers[-1], tok)


def _coloured(n: int, seed: int) -> TensorDataset:
    """Class = which channel is bright in the left half: a cue a linear read-out of pixels sees."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    x[torch.arange(n), y, :, :16] += 1.0
    return TensorDataset(x, y)


def test_probe_reads_a_pixel_cue_and_semi_rows_come_from_the_cache(tmp_path):
    cfg = ProbeConfig(epochs=20, lrs=(0.01,), weight_decays=(0.0,))
    train, val = _coloured(300, 0), _coloured(200, 1)
    res = pixel_probe(pixel_features(train, cfg, cache_dir=tmp_path), pixel_features(val, cfg), cfg)
    assert res["top1"] > 95 and set(res) == {"top1", "top5"}
    n_cached = len(list(tmp_path.iterdir()))
    rows = [3, 1, 4, 1, 5]
    picked = pixel_features(train, cfg, rows=rows, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == n_cached  # picked from the full set's cache, nothing new written
    direct = pixel_features(train, cfg, rows=rows)  # no cache: encoded from the subset
    assert torch.equal(picked["last"], direct["last"]) and torch.equal(picked["y"], train.tensors[1][rows])
