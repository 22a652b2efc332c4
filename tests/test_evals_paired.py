"""Paired comparison of two encoders' probes: McNemar p-values and intervals against hand-computed values."""

import math

import pytest
import torch

from evals.paired import ERRORS, HITS, mcnemar_p, pair_up, paired_errors, paired_margin


def brute_mcnemar(a_only: int, b_only: int) -> float:
    n = a_only + b_only
    tail = sum(math.comb(n, i) for i in range(min(a_only, b_only) + 1)) / 2**n
    return min(1.0, 2 * tail)


def test_mcnemar_hand_values():
    assert mcnemar_p(10, 0) == pytest.approx(2 / 2**10)
    assert mcnemar_p(3, 12) == pytest.approx(2 * (1 + 15 + 105 + 455) / 2**15)  # 0.0352
    assert mcnemar_p(5, 5) == 1.0
    assert mcnemar_p(0, 0) == 1.0  # no discordant item: no evidence either way
    for a, b in [(7, 19), (19, 7), (40, 31), (1, 2)]:
        assert mcnemar_p(a, b) == pytest.approx(brute_mcnemar(a, b))


def test_mcnemar_on_imagenet_sized_counts_is_exact_and_quick():
    p = mcnemar_p(2600, 2400)  # 50,000 val images, 5,000 discordant: a 0.4-point margin
    assert 0.0 < p < 0.01
    assert mcnemar_p(2500, 2500) == 1.0


def test_paired_margin_by_hand():
    a = torch.tensor([1, 1, 1, 0], dtype=torch.bool)
    b = torch.tensor([1, 0, 0, 0], dtype=torch.bool)
    out = paired_margin(a, b)
    assert out["margin"] == pytest.approx(50.0)
    half = 100 * 1.959964 * math.sqrt(1 / 3) / 2  # differences (0, 1, 1, 0): sample std sqrt(1/3)
    assert (out["ci95_low"], out["ci95_high"]) == pytest.approx((50 - half, 50 + half))
    assert out["p_value"] == pytest.approx(0.5)  # 2 discordant items, both for a
    assert out["n"] == 4
    assert paired_margin(b, a)["margin"] == pytest.approx(-50.0)


def test_identical_encoders_give_no_margin_and_p_one():
    hits = torch.rand(800, generator=torch.Generator().manual_seed(0)) < 0.2
    out = paired_margin(hits, hits.clone())
    assert out["margin"] == 0.0 and out["p_value"] == 1.0 and out["ci95_low"] == out["ci95_high"] == 0.0


def test_a_real_gain_on_800_items_is_significant_and_noise_is_not():
    g = torch.Generator().manual_seed(1)
    base = torch.rand(800, generator=g) < 0.2
    better = base | (torch.rand(800, generator=g) < 0.1)  # ~8 points more, never worse on an item
    assert paired_margin(better, base)["p_value"] < 1e-6
    other = torch.rand(800, generator=g) < 0.2  # an unrelated draw at the same accuracy
    assert paired_margin(other, base)["p_value"] > 0.01


def test_paired_errors_by_hand():
    a = torch.tensor([0.10, 0.20, 0.30, 0.40])  # per-image AbsRel of a: lower on 3 images, higher on 1
    b = torch.tensor([0.15, 0.25, 0.35, 0.30])
    out = paired_errors(a, b)
    assert out["margin"] == pytest.approx(0.0125)  # differences b - a: .05, .05, .05, -.10
    half = 1.959964 * torch.tensor([0.05, 0.05, 0.05, -0.10]).double().std().item() / 2
    assert (out["ci95_low"], out["ci95_high"]) == pytest.approx((0.0125 - half, 0.0125 + half))
    assert out["p_value"] == pytest.approx(mcnemar_p(3, 1))  # the sign test: 3 images for a, 1 for b
    assert paired_errors(b, a)["margin"] == pytest.approx(-0.0125)


def test_pair_up_takes_the_per_item_leaves_out_and_keeps_the_nesting():
    t, f = torch.tensor([True, True]), torch.tensor([False, True])
    results = {"ijepa": {"count_all": {"last": {"top1": 100.0, HITS: t}}, "extra": {"last": {"top1": 1.0}},
                         "depth": {"abs_rel": 0.1, ERRORS: torch.tensor([0.1, 0.1])}},
               "random": {"count_all": {"last": {"top1": 50.0, HITS: f}}, "extra": {"last": {"top1": 1.0}},
                          "depth": {"abs_rel": 0.2, ERRORS: torch.tensor([0.2, 0.2])}}}
    paired = pair_up(results)
    assert set(paired) == {"count_all", "depth"}
    assert paired["count_all"]["last"]["top1"]["margin"] == pytest.approx(50.0)
    assert paired["depth"]["abs_rel"]["margin"] == pytest.approx(0.1)  # random's error minus I-JEPA's
    assert HITS not in results["ijepa"]["count_all"]["last"] and HITS not in results["random"]["count_all"]["last"]
    assert ERRORS not in results["ijepa"]["depth"] and ERRORS not in results["random"]["depth"]
    with pytest.raises(ValueError, match="same non-zero length"):
        paired_margin(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool))
