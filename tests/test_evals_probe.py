"""Linear probe on cached features: known answers, grid independence, selection protocol."""

import pytest
import torch

from evals.probe import GridAdam, grid, linear_probe, split_train_val, topk_accuracy, train_heads
from pipeline.config import ProbeConfig
from pipeline.errors import PipelineError

CFG = ProbeConfig(epochs=30, lrs=(1e-3, 1e-2, 1e-1), weight_decays=(0.0, 1e-3), val_fraction=0.2)


def clusters(n: int, d: int = 32, c: int = 8, noise: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = 4 * torch.randn(c, d, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, c, (n,), generator=g)
    return centres[y] + noise * torch.randn(n, d, generator=g), y


def test_separable_clusters_are_probed_near_perfectly():
    x, y = clusters(600)
    xt, yt = clusters(200, seed=1)
    out = linear_probe(x, y, xt, yt, 8, CFG)
    assert out["top1"] >= 98.0
    assert out["top5"] == 100.0
    assert (out["lr"], out["weight_decay"]) in grid(CFG.lrs, CFG.weight_decays)
    assert "hits" not in out
    with_hits = linear_probe(x, y, xt, yt, 8, CFG, hits=True)
    assert with_hits["hits"].shape == (200,) and with_hits["hits"].dtype == torch.bool
    assert 100 * with_hits["hits"].float().mean().item() == pytest.approx(out["top1"])


def test_random_labels_stay_near_chance():
    x, _ = clusters(600)
    xt, _ = clusters(400, seed=1)
    g = torch.Generator().manual_seed(5)
    y, yt = torch.randint(0, 8, (600,), generator=g), torch.randint(0, 8, (400,), generator=g)
    out = linear_probe(x, y, xt, yt, 8, CFG)
    assert out["top1"] < 25.0  # chance is 12.5 %


def test_grid_heads_train_independently():
    """Training (lr_a, lr_b) together gives head a exactly what training lr_a alone gives."""
    x, y = clusters(300)
    w2, b2 = train_heads(x, y, 8, [1e-2, 1e-1], [0.0, 1e-3], epochs=3, batch_size=64)
    w1, b1 = train_heads(x, y, 8, [1e-2], [0.0], epochs=3, batch_size=64)
    torch.testing.assert_close(w2[0], w1[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b2[0], b1[0], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(w2[1], w1[0])


def test_grid_adam_uses_each_heads_lr():
    p = torch.ones(2, 3)
    opt = GridAdam([p], torch.tensor([0.0, 0.5]))
    opt.step([torch.ones(2, 3)])
    torch.testing.assert_close(p[0], torch.ones(3))
    torch.testing.assert_close(p[1], torch.full((3,), 0.5), rtol=1e-5, atol=1e-5)  # Adam's first step: lr * sign


def test_split_is_disjoint_and_complete():
    tr, va = split_train_val(50, 0.1, seed=3)
    assert len(va) == 5 and len(tr) == 45
    assert sorted(torch.cat([tr, va]).tolist()) == list(range(50))
    tr2, va2 = split_train_val(50, 0.1, seed=3)
    assert torch.equal(va, va2)
    tr, va = split_train_val(3, 0.01, seed=0)  # tiny 1% subsets still get one val item
    assert len(va) == 1 and len(tr) == 2
    with pytest.raises(PipelineError):
        split_train_val(1, 0.1, 0)


def test_topk_accuracy_hand_values():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5], [0.5, 0.4, 0.1]])
    y = torch.tensor([1, 1, 0, 2])
    assert topk_accuracy(logits, y, 1) == 25.0
    assert topk_accuracy(logits, y, 2) == 50.0
    assert topk_accuracy(logits, y, 5) == 100.0  # k capped at the number of classes


def test_labels_out_of_range_are_rejected():
    x, y = clusters(40)
    with pytest.raises(PipelineError, match="labels outside"):
        linear_probe(x, y, x, y, 4, CFG)
