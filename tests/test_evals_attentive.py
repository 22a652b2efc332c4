"""Attentive probe: it is multi-head attention with one learnt query, it reads what mean pooling loses,
a seed fixes it, grid heads train independently, the token budget is enforced."""

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from evals.attentive import attend, attentive_probe, check_token_budget, evaluate_attentive, num_heads, train_attentive
from evals.features import extract
from evals.probe import linear_probe
from pipeline.config import ClassifierProbeConfig, ConfigError, ModelConfig, from_dict
from pipeline.errors import PipelineError
from pipeline.models.encoder import build_encoder

CFG = ClassifierProbeConfig(lrs=(1e-3, 1e-2), epochs=30, attentive=True, attentive_epochs=30)


def signed_pairs(n: int, c: int = 4, tokens: int = 16, d: int = 32, seed: int = 0):
    """Noise tokens (n, N, D) float16 and labels (n,): each image holds +p_y and -p_y at two random positions,
    so the label is in two tokens while the tokens' mean carries none of it."""
    g = torch.Generator().manual_seed(seed)
    patterns = 3 * torch.linalg.qr(torch.randn(d, c, generator=torch.Generator().manual_seed(7)))[0].T  # (c, d)
    y = torch.randint(0, c, (n,), generator=g)
    x = torch.randn(n, tokens, d, generator=g)
    pos = torch.stack([torch.randperm(tokens, generator=g)[:2] for _ in range(n)])
    rows = torch.arange(n)
    x[rows, pos[:, 0]] = patterns[y]
    x[rows, pos[:, 1]] = -patterns[y]
    return x.half(), y


def test_attend_is_multihead_attention_with_one_learnt_query():
    """nn.MultiheadAttention's weights mapped onto (u, wv, wo, bo) give its output exactly."""
    torch.manual_seed(0)
    d, h, b, n = 32, 4, 5, 9
    mha = nn.MultiheadAttention(d, h, batch_first=True)
    with torch.no_grad():
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    query, x = torch.randn(1, 1, d), torch.randn(b, n, d)
    ref = mha(query.expand(b, 1, d), x, x, need_weights=False)[0][:, 0]  # (B, D)
    wq, wk, wv = mha.in_proj_weight.detach().chunk(3)
    bq, _, bv = mha.in_proj_bias.detach().chunk(3)  # the key bias adds the same logit to every token: no effect
    dh = d // h
    qh = (wq @ query[0, 0] + bq).view(h, dh)
    u = torch.einsum("he,hed->hd", qh, wk.view(h, dh, d)) / math.sqrt(dh)
    wo, bo = mha.out_proj.weight.detach(), mha.out_proj.bias.detach()
    out = attend(x, u[None], wv.view(1, h, dh, d), wo.T[None], (bo + wo @ bv)[None])  # (B, 1, D)
    torch.testing.assert_close(out[:, 0], ref.detach(), rtol=1e-5, atol=1e-5)


def test_reads_tokens_that_mean_pooling_averages_out():
    x, y = signed_pairs(600)
    xt, yt = signed_pairs(200, seed=1)
    out = attentive_probe(x, y, xt, yt, 4, CFG, hits=True)
    assert out["top1"] >= 95.0
    assert (out["lr"], out["weight_decay"]) in [(lr, CFG.attentive_weight_decay) for lr in CFG.lrs]
    assert out["hits"].shape == (200,) and 100 * out["hits"].float().mean().item() == pytest.approx(out["top1"])
    pooled = linear_probe(x.float().mean(1), y, xt.float().mean(1), yt, 4, CFG)
    assert pooled["top1"] < 40.0  # chance is 25 %


def test_seed_fixes_everything():
    x, y = signed_pairs(120)
    xt, yt = signed_pairs(40, seed=1)
    a, b = (attentive_probe(x, y, xt, yt, 4, CFG, hits=True) for _ in range(2))
    assert torch.equal(a.pop("hits"), b.pop("hits")) and a == b
    p1, p2 = (train_attentive(x, y, 4, [1e-2], [0.01], epochs=2, seed=3) for _ in range(2))
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    p3 = train_attentive(x, y, 4, [1e-2], [0.01], epochs=2, seed=4)
    assert not torch.equal(p1["wv"], p3["wv"])


def test_grid_heads_train_independently():
    """Training (lr_a, lr_b) together gives head a what training lr_a alone gives."""
    x, y = signed_pairs(100)
    both = train_attentive(x, y, 4, [1e-2, 1e-1], [0.01, 0.0], epochs=3, seed=0, batch_size=32)
    alone = train_attentive(x, y, 4, [1e-2], [0.01], epochs=3, seed=0, batch_size=32)
    for k in both:
        torch.testing.assert_close(both[k][0], alone[k][0], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both["wc"][1], alone["wc"][0])


def test_heads_and_token_budget():
    assert [num_heads(d) for d in (32, 100, 128, 192, 768, 1280, 1408)] == [1, 1, 2, 3, 12, 16, 16]
    check_token_budget(2400 + 800, 64, 128)  # the demo: 0.4 GB
    with pytest.raises(PipelineError, match=r"1331167 images .* 872\.4 GB.*attentive_max_train"):
        check_token_budget(1281167 + 50000, 256, 1280)  # ImageNet-1k at ViT-H/14


def test_rows_are_picked_from_the_cached_train_tokens(tmp_path):
    """The 1 % path: rows of the full train set's cached tokens, the same result as encoding those rows."""
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(name="vit_micro", patch_size=8), 32).eval()
    g = torch.Generator().manual_seed(0)
    train = TensorDataset(torch.randn(24, 3, 32, 32, generator=g), torch.arange(24) % 3)
    test = TensorDataset(torch.randn(9, 3, 32, 32, generator=g), torch.arange(9) % 3)
    cfg = ClassifierProbeConfig(lrs=(1e-2,), attentive=True, attentive_epochs=2, batch_size=16)
    rows = [1, 4, 5, 8, 13, 21]
    evaluate_attentive(enc, train, test, cfg, cache_dir=tmp_path)  # caches the full train set's tokens
    entries = sorted(tmp_path.iterdir())
    picked = evaluate_attentive(enc, train, test, cfg, rows=rows, cache_dir=tmp_path)["last"]
    assert sorted(tmp_path.iterdir()) == entries  # nothing encoded again
    full, fte = (extract(enc, ds, "tokens", cache_dir=tmp_path) for ds in (train, test))
    assert picked == attentive_probe(full["tokens"][rows], full["y"][rows], fte["tokens"], fte["y"], 3, cfg)
    assert evaluate_attentive(enc, Subset(train, rows), test, cfg)["last"].keys() == picked.keys()
    capped = ClassifierProbeConfig(lrs=(1e-2,), attentive=True, attentive_epochs=2, attentive_max_train=4)
    assert evaluate_attentive(enc, train, test, capped, rows=rows, cache_dir=tmp_path)["last"]["top1"] >= 0


@pytest.mark.parametrize("override,message", [
    ({"attentive_epochs": 0}, "params: eval_semi.attentive_epochs = 0 is not allowed; expected an integer >= 1"),
    ({"attentive_weight_decay": -1},
     "params: eval_semi.attentive_weight_decay = -1.0 is not allowed; expected a number >= 0"),
    ({"attentive_max_train": 1},
     "params: eval_semi.attentive_max_train = 1 is not allowed; expected null or an integer >= 2"),
])
def test_bad_attentive_params_are_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"preset": "demo", "eval_semi": override})
    assert str(err.value) == message


def test_paper_setting_leaves_it_off_and_the_demo_on():
    paper, demo = from_dict({"preset": "paper"}), from_dict({"preset": "demo"})
    for section in ("eval_linear", "eval_semi", "eval_clevr"):
        assert not getattr(paper, section).attentive and getattr(demo, section).attentive
        assert getattr(paper, section).knn and getattr(demo, section).knn
