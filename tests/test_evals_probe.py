"""Linear probe on cached features: known answers, grid independence, selection protocol."""

import pytest
import torch

from evals.probe import (
    GridAdam,
    grid,
    kfold,
    linear_probe,
    selection_splits,
    split_train_val,
    topk_accuracy,
    train_heads,
)
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
    assert out["selection_folds"] == 1  # 120 val items for 8 classes: the held-out split
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


def test_kfold_is_disjoint_complete_and_stratified():
    y = torch.tensor([0] * 7 + [1] * 3 + [2] * 12)
    folds = kfold(len(y), 5, seed=1, labels=y)
    assert len(folds) == 5
    assert sorted(torch.cat([va for _, va in folds]).tolist()) == list(range(22))
    for tr, va in folds:
        assert sorted(torch.cat([tr, va]).tolist()) == list(range(22)) and len(va) in (4, 5)
    for c, m in ((0, 7), (1, 3), (2, 12)):  # each class dealt over the folds: floor or ceil of m / 5
        assert {int((y[va] == c).sum()) for _, va in folds} <= {m // 5, -(-m // 5)}
    assert all(torch.equal(a[1], b[1]) for a, b in zip(folds, kfold(22, 5, seed=1, labels=y), strict=True))
    assert [len(va) for _, va in kfold(3, 3, seed=0)] == [1, 1, 1]
    with pytest.raises(PipelineError, match="k-fold needs 2 <= k <= n; got k=4, n=3"):
        kfold(3, 4, seed=0)


def test_selection_protocol_follows_the_val_size():
    eight = torch.arange(8)
    # 10% of 400 = 40 val items = 5 a class: held out; 39 is below 5 a class: 5 folds
    assert len(selection_splits(400, 0.1, 0, eight.repeat(50))) == 1
    assert len(selection_splits(390, 0.1, 0, eight.repeat(49)[:390])) == 5
    assert len(selection_splits(48, 0.1, 0, eight.repeat(6))) == 5  # a 1% list: 6 labels a class
    assert len(selection_splits(46, 0.1, 0)) == 1 and len(selection_splits(44, 0.1, 0)) == 5  # depth: 5 | 4 images
    assert len(selection_splits(3, 0.1, 0)) == 3  # fewer items than folds: leave-one-out


def test_tiny_label_set_picks_the_clear_lr_by_kfold():
    """30 items (27 of class 0), features without information: the class prior is all there is to learn.

    At lr 1e-4 the 30 Adam steps leave the bias near 0 and the noise directions decide (55-65% on test); at
    lr 1 the bias learns the prior while weight decay keeps the noise weights small (~89%, always class 0).
    """
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 8, generator=g), torch.cat([torch.zeros(27), torch.ones(3)]).long()
    xt, yt = torch.randn(1000, 8, generator=g), (torch.rand(1000, generator=g) < 0.1).long()
    cfg = ProbeConfig(epochs=30, lrs=(1e-4, 1.0), weight_decays=(1.0,), val_fraction=0.1)
    out = linear_probe(x, y, xt, yt, 2, cfg)
    assert out["selection_folds"] == 5  # a 10% split would validate on 3 items
    assert out["lr"] == 1.0
    slow = linear_probe(x, y, xt, yt, 2, ProbeConfig(epochs=30, lrs=(1e-4,), weight_decays=(1.0,)))
    assert slow["selection_folds"] == 0  # one point: nothing to choose
    assert out["top1"] > 85.0 > 70.0 > slow["top1"]
