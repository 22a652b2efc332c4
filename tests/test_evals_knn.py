"""k-NN probe: the votes of a brute-force reference, the temperature's role, blocks that change nothing."""

import math

import pytest
import torch

from evals.knn import knn_classify, knn_probe, knn_votes
from pipeline.config import ClassifierProbeConfig, ConfigError, from_dict


def reference_votes(x_train, y_train, x_test, num_classes, k, temperature):
    """Per test item in float64: sort every train item by cosine, sum exp(cos / T) of the first k per class."""
    out = torch.zeros(len(x_test), num_classes, dtype=torch.float64)
    for i, q in enumerate(x_test.double()):
        sims = [(float(q @ t) / (q.norm() * t.norm()).item(), int(c))
                for t, c in zip(x_train.double(), y_train, strict=True)]
        for s, c in sorted(sims, key=lambda sc: -sc[0])[:k]:
            out[i, c] += math.exp(s / temperature)
    return out


def data(n, d=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def test_votes_match_brute_force_reference():
    x, y = data(60)
    xt, yt = data(25, seed=1)
    votes = knn_votes(x, y, xt, 5, k=7, temperature=0.07)
    ref = reference_votes(x, y, xt, 5, 7, 0.07)
    torch.testing.assert_close(votes.double(), ref, rtol=1e-4, atol=0)
    out = knn_classify(x, y, xt, yt, 5, k=7, temperature=0.07, hits=True)
    assert out["top1"] == pytest.approx(100 * (ref.argmax(1) == yt).double().mean().item())
    assert out["hits"].dtype == torch.bool and torch.equal(out["hits"], ref.argmax(1) == yt)
    assert out["top1"] <= out["top5"] == 100.0  # 5 classes: top-5 holds all of them


def test_temperature_weighting_decides_against_the_majority():
    """One very close neighbour of class 0 against two farther ones of class 1 (k = 3)."""
    x = torch.tensor([[1.0, 0.01], [1.0, 0.5], [1.0, -0.5], [-1.0, 0.0]])
    y = torch.tensor([0, 1, 1, 0])
    q, yq = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_classify(x, y, q, yq, 2, k=3, temperature=0.07)["top1"] == 100.0  # exp(1/T) beats 2 exp(0.89/T)
    assert knn_classify(x, y, q, yq, 2, k=3, temperature=1e3)["top1"] == 0.0  # ~equal weights: the majority
    torch.testing.assert_close(knn_votes(x, y, q, 2, 3, 1e3), torch.tensor([[1.0, 2.0]]), rtol=2e-3, atol=0)


def test_blocks_give_identical_results():
    x, y = data(200, d=16)
    xt, yt = data(50, d=16, seed=1)
    whole = knn_classify(x, y, xt, yt, 5, k=20, hits=True)
    votes = knn_votes(x, y, xt, 5, 20, 0.07)
    for test_block, train_block in [(1, 200), (7, 13), (50, 5), (3, 1000)]:  # blocks smaller than k, too
        blocked = knn_votes(x, y, xt, 5, 20, 0.07, test_block=test_block, train_block=train_block)
        torch.testing.assert_close(blocked, votes, rtol=1e-5, atol=0)  # a matmul's ulp of the cosine, / T
        out = knn_classify(x, y, xt, yt, 5, k=20, hits=True, test_block=test_block, train_block=train_block)
        assert (out["top1"], out["top5"]) == (whole["top1"], whole["top5"])
        assert torch.equal(out["hits"], whole["hits"])


def test_clusters_are_found_and_k_is_capped():
    g = torch.Generator().manual_seed(3)
    centres = 5 * torch.randn(4, 16, generator=g)
    y, yt = torch.randint(0, 4, (100,), generator=g), torch.randint(0, 4, (40,), generator=g)
    x, xt = centres[y] + torch.randn(100, 16, generator=g), centres[yt] + torch.randn(40, 16, generator=g)
    assert knn_classify(x, y, xt, yt, 4)["top1"] == 100.0
    few = knn_classify(x[:5], y[:5], xt, yt, 4, k=20)  # k > n: every train item votes
    torch.testing.assert_close(knn_votes(x[:5], y[:5], xt, 4, 20, 0.07).sum(1),
                               knn_votes(x[:5], y[:5], xt, 4, 5, 0.07).sum(1))
    assert 0 <= few["top1"] <= 100


def test_probe_covers_both_views_with_hits():
    g = torch.Generator().manual_seed(0)
    ftr = {"last": torch.randn(30, 8, generator=g), "last4": torch.randn(30, 32, generator=g),
           "y": torch.randint(0, 3, (30,), generator=g)}
    fva = {"last": torch.randn(10, 8, generator=g), "last4": torch.randn(10, 32, generator=g),
           "y": torch.randint(0, 3, (10,), generator=g)}
    out = knn_probe(ftr, fva, 3, ClassifierProbeConfig(knn_k=5), hits=True)
    assert set(out) == {"last", "last4"}
    for res in out.values():
        assert set(res) == {"top1", "top5", "hits"} and res["hits"].shape == (10,)
        assert 100 * res["hits"].float().mean().item() == pytest.approx(res["top1"])
    assert "hits" not in knn_probe(ftr, fva, 3, ClassifierProbeConfig())["last"]


@pytest.mark.parametrize("override,message", [
    ({"knn_k": 0}, "params: eval_linear.knn_k = 0 is not allowed; expected an integer >= 1"),
    ({"knn_temperature": 0}, "params: eval_linear.knn_temperature = 0.0 is not allowed; expected a number > 0"),
    ({"knn": "yes"}, "params: eval_linear.knn = 'yes' is not allowed; expected true or false"),
])
def test_bad_knn_params_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"preset": "demo", "eval_linear": override})
    assert str(err.value) == message
