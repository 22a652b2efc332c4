"""Depth metrics against hand-computed values, the evaluation mask, the mean baseline, the head."""

import math

import pytest
import torch

from evals.depth import DepthHeads, depth_metrics, depth_probe, eval_mask, evaluate_mean_depth, mean_depth_map, sig_loss
from evals.paired import ERRORS
from pipeline.config import DepthProbeConfig
from pipeline.data import eigen_mask
from pipeline.errors import PipelineError


def test_metrics_match_hand_computation():
    pred = torch.tensor([[[2.0, 4.0, 1.9, 7.0]]])
    gt = torch.tensor([[[1.0, 4.0, 1.0, 9.0]]])
    mask = torch.tensor([[[True, True, True, False]]])  # the last pixel is not evaluated
    m = depth_metrics(pred, gt, mask)
    assert m["abs_rel"] == pytest.approx((1 / 1 + 0 / 4 + 0.9 / 1) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt((1 + 0 + 0.81) / 3))
    assert m["log10"] == pytest.approx((math.log10(2) + 0 + math.log10(1.9)) / 3)
    # ratios max(p/g, g/p) = 2, 1, 1.9 against 1.25, 1.5625, 1.953125
    assert (m["d1"], m["d2"], m["d3"]) == pytest.approx((1 / 3, 1 / 3, 2 / 3))


def test_metrics_average_per_image_not_per_pixel():
    pred = torch.tensor([[[2.0, 2.0]], [[1.0, 1.0]]])
    gt = torch.ones(2, 1, 2)
    mask = torch.tensor([[[True, True]], [[True, False]]])
    m = depth_metrics(pred, gt, mask)
    assert m["abs_rel"] == pytest.approx(0.5)  # (1 + 0) / 2 images; pooled pixels would give 2/3
    assert m["rmse"] == pytest.approx(0.5)
    assert ERRORS not in m
    assert depth_metrics(pred, gt, mask, per_image_out=True)[ERRORS].tolist() == pytest.approx([1.0, 0.0])
    with pytest.raises(PipelineError, match="no test image"):
        depth_metrics(pred, gt, torch.zeros_like(mask))


def test_eval_mask_is_eigen_crop_and_valid_range():
    gt = torch.full((2, 48, 64), 5.0)
    gt[0, 20, 30] = 0.0  # a hole
    gt[1, 21, 31] = 12.0  # beyond max_depth
    mask = eval_mask(gt, 1e-3, 10.0)
    crop = torch.from_numpy(eigen_mask(48, 64))
    assert torch.equal(mask[1] | (gt[1] == 12.0) & crop, crop)
    assert not mask[0, 20, 30] and not mask[1, 21, 31] and not mask[:, 0, 0].any()
    assert mask[0].sum() == crop.sum() - 1
    # at NYU's native size the crop is exactly rows 45:471, cols 41:601
    full = eval_mask(torch.full((1, 480, 640), 5.0), 1e-3, 10.0)[0]
    assert full[45:471, 41:601].all() and full.sum() == 426 * 560


def test_mean_depth_map_skips_invalid_pixels():
    d = torch.tensor([[[1.0, 0.0]], [[3.0, 0.0]], [[0.0, 0.0]]])  # (3, 1, 2); 0 = no depth
    m = mean_depth_map(d, 1e-3, 10.0)
    torch.testing.assert_close(m, torch.tensor([[2.0, 2.0]]))  # no valid pixel: the global mean
    metrics = evaluate_mean_depth(d, torch.tensor([[[1.0, 4.0]]]), DepthProbeConfig())
    assert metrics["rmse"] == pytest.approx(math.sqrt((1 + 4) / 2))
    assert metrics["abs_rel"] == pytest.approx((1 / 1 + 2 / 4) / 2)


def test_sig_loss_zero_when_exact_and_scale_term():
    gt = torch.rand(2, 4, 4) + 1
    valid = torch.ones(2, 4, 4, dtype=torch.bool)
    assert sig_loss(gt[:, None], gt, valid).item() == pytest.approx(0.0, abs=1e-5)
    # a constant factor 2: Var(g) = 0, loss = sqrt(0.15) * log 2
    assert sig_loss(2 * gt[:, None], gt, valid).item() == pytest.approx(math.sqrt(0.15) * math.log(2), rel=1e-4)


@pytest.mark.parametrize("head", ["bins", "regression"])
def test_head_shapes_and_range(head):
    cfg = DepthProbeConfig(head=head, num_bins=16)
    heads = DepthHeads(dim=8, heads=3, cfg=cfg, grid_hw=(2, 2), image_size=8)
    with torch.no_grad():
        for p in heads.params:
            p.normal_()
        out = heads(torch.randn(5, 4, 8))
    assert out.shape == (5, 3, 8, 8)
    assert out.min() >= cfg.min_depth and out.max() <= cfg.max_depth


@pytest.mark.parametrize("head", ["bins", "regression"])
def test_probe_learns_depth_linear_in_the_tokens(head):
    g = torch.Generator().manual_seed(0)
    n, grid, dim, size = 120, 4, 16, 16
    tokens = torch.randn(n, grid * grid, dim, generator=g)
    w = torch.randn(dim, generator=g) / dim**0.5
    patch_depth = 1 + 8 * torch.sigmoid(tokens @ w).view(n, 1, grid, grid)  # metres, 1..9
    depth = torch.nn.functional.interpolate(patch_depth, size=(size, size), mode="bilinear")[:, 0]
    cfg = DepthProbeConfig(head=head, num_bins=32, epochs=40, lrs=(1e-2, 1e-1), weight_decays=(0.0,))
    metrics, pred = depth_probe(tokens[:90], depth[:90], tokens[90:], depth[90:], cfg, (grid, grid))
    baseline = evaluate_mean_depth(depth[:90], depth[90:], cfg)
    assert pred.shape == (30, size, size)
    assert metrics["rmse"] < 0.5 * baseline["rmse"]
    assert metrics["d1"] > 0.9
    assert metrics["lr"] in cfg.lrs
    assert metrics[ERRORS].shape == (30,) and metrics[ERRORS].mean().item() == pytest.approx(metrics["abs_rel"])
