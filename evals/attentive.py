"""Attentive probe (V-JEPA's evaluation): a learnt query cross-attends over the frozen patch tokens.

The head: each token is layer-normalised (no affine: the projections absorb it), a learnt query
attends over the N tokens of the last layer with H heads (H = D / 64, at most 16, at least 1, dividing D),
the value and output projections give a (D,) vector that is added to the query (the residual of
V-JEPA's cross-attention block), layer-normalised, and a linear classifier reads it out. V-JEPA's block
also has an MLP after the attention; this one has none, so the probe stays a read-out of the tokens.

With one query, multi-head attention needs no per-token projection: the attention logit of head h on
token x is q_h . (W_k,h x) / sqrt(d) = u_h . x, so the query-key product is learnt as u_h (D,) directly,
and the value projection commutes with the attention-weighted sum (W_v,h sum_n a_n x_n). The per-token
work is one dot product and one weighted sum per head: the function of `nn.MultiheadAttention` with one
learnt query (`tests/test_evals_attentive.py` maps one onto the other) at about H / D of its cost.

Protocol as the linear probe's (`evals.probe`): the grid (the section's lrs x attentive_weight_decay) is
trained at once as G heads sharing the input (their losses add up, gradients never cross heads) on
(train - val), the best val top-1 (ties: lower val cross-entropy) is retrained on all of train, the test
set is touched once. AdamW (decoupled weight decay on the matrices and u, not on biases or the query),
cosine lr over all steps, init and shuffles from cfg.seed: deterministic for a seed.

The tokens come from the feature cache (`evals.features`, float16 (n, N, D)), which holds every one of
them: ImageNet-1k at ViT-H/14 would be 1.28M x 256 x 1280 x 2 B = 838 GB. `check_token_budget` refuses
more than TOKEN_BUDGET before any encoder pass; the paper preset leaves the probe off and
`attentive_max_train` runs it on a seeded subset of the train images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from evals import common
from evals.features import cached, extract
from evals.paired import HITS
from evals.probe import GridAdam, cosine, grid, num_threads, split_train_val, topk_accuracy
from pipeline.config import ClassifierProbeConfig
from pipeline.errors import PipelineError

NAME = "attentive"  # the section under each encoder in the metrics files: {"attentive": {"last": {...}}}
VIEW = "last"  # the last layer's patch tokens
BATCH = 256
EVAL_BATCH = 1024
MAX_HEADS = 16  # ViT-H's
TOKEN_BUDGET = 32 * 2**30  # bytes of cached float16 tokens (train + test) an evaluation may hold
DECAYED = ("u", "wv", "wo", "wc")  # AdamW's weight decay: the matrices, not the biases or the query


def num_heads(dim: int) -> int:
    """D / 64 heads, capped at MAX_HEADS, at least 1, lowered until they divide D."""
    h = max(1, min(MAX_HEADS, dim // 64))
    while dim % h:
        h -= 1
    return h


def check_token_budget(n_images: int, tokens: int, dim: int) -> None:
    """PipelineError when n_images x tokens x dim float16 values exceed TOKEN_BUDGET."""
    size = n_images * tokens * dim * 2
    if size > TOKEN_BUDGET:
        raise PipelineError(f"attentive probe: the patch tokens of {n_images} images ({tokens} x {dim} float16 "
                            f"each) take {size / 1e9:.1f} GB, over the {TOKEN_BUDGET / 1e9:.1f} GB the feature cache "
                            "may hold; lower attentive_max_train (or max_test) in the evaluation's params "
                            "section, or set attentive: false")


def init_heads(dim: int, num_classes: int, groups: int, heads: int, seed: int,
               device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Parameters of `groups` identical heads, each leading axis G: u (G, H, D) zeros (uniform attention:
    the probe starts from mean pooling), wv (G, H, D/H, D) and wo (G, D, D) normal(1/sqrt(D)), the query
    q (G, D), bo (G, D), wc (G, D, C) and bc (G, C) zeros."""
    gen = torch.Generator().manual_seed(seed)
    wv = torch.randn(heads, dim // heads, dim, generator=gen) / math.sqrt(dim)
    wo = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
    one = {"u": torch.zeros(heads, dim), "wv": wv, "wo": wo, "q": torch.zeros(dim), "bo": torch.zeros(dim),
           "wc": torch.zeros(dim, num_classes), "bc": torch.zeros(num_classes)}
    return {k: v.expand(groups, *v.shape).clone().to(device).requires_grad_() for k, v in one.items()}


def attend(x: Tensor, u: Tensor, wv: Tensor, wo: Tensor, bo: Tensor) -> Tensor:
    """Multi-head attention of one query per head group over the tokens.

    x (B, N, D) tokens, u (G, H, D) query-key vectors, wv (G, H, D/H, D), wo (G, D, D) (applied as z @ wo),
    bo (G, D) -> (B, G, D).
    """
    b, n, d = x.shape
    g, h, _ = u.shape
    attn = (x @ u.reshape(g * h, d).T).softmax(1)  # (B, N, G*H): over the tokens
    pooled = (attn.transpose(1, 2) @ x).view(b, g, h, d)  # (B, G, H, D)
    values = torch.einsum("bghd,ghed->bghe", pooled, wv).reshape(b, g, d)
    return torch.einsum("bgd,gde->bge", values, wo) + bo


def head_logits(x: Tensor, p: dict[str, Tensor]) -> Tensor:
    """x (B, N, D) tokens (any float dtype) -> logits (B, G, C) of every head in `p` (from `init_heads`)."""
    x = F.layer_norm(x.float(), x.shape[-1:])
    z = p["q"] + attend(x, p["u"], p["wv"], p["wo"], p["bo"])
    z = F.layer_norm(z, z.shape[-1:])
    return torch.einsum("bgd,gdc->bgc", z, p["wc"]) + p["bc"]


def train_attentive(tokens: Tensor, y: Tensor, num_classes: int, lrs: Sequence[float], wds: Sequence[float],
                    epochs: int, seed: int = 0, batch_size: int = BATCH,
                    rows: Tensor | None = None) -> dict[str, Tensor]:
    """Attentive heads, one per (lrs[g], wds[g]), on tokens (n, N, D) (CPU, float16 is fine), y (n,) in
    [0, C) -> their parameters (see `init_heads`) on `common.device()`. AdamW, cosine lr over all steps,
    minibatches reshuffled each epoch. `rows`: train on these items of `tokens` only (not copied)."""
    rows = torch.arange(len(tokens)) if rows is None else rows.cpu()
    n, d = len(rows), tokens.shape[-1]
    dev = common.device()
    p = init_heads(d, num_classes, len(lrs), num_heads(d), seed, dev)
    lr = torch.tensor(list(lrs), dtype=torch.float32, device=dev)
    decay = lr * torch.tensor(list(wds), dtype=torch.float32, device=dev)  # AdamW: p *= 1 - lr * wd
    names = list(p)
    opt = GridAdam([p[k] for k in names], lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    total, step = epochs * steps_per_epoch, 0
    y = y.long()
    for _ in range(epochs):
        perm = rows[torch.randperm(n, generator=gen)]
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            logits = head_logits(tokens[idx].to(dev), p)  # (B, G, C)
            yb = y[idx].to(dev)
            loss = F.cross_entropy(logits.permute(0, 2, 1), yb[:, None].expand(-1, len(lrs)))
            grads = torch.autograd.grad(loss * len(lrs), [p[k] for k in names])  # per-head means, summed
            scale = cosine(step, total)
            with torch.no_grad():
                for k in DECAYED:
                    p[k].mul_((1 - decay * scale).view(-1, *([1] * (p[k].dim() - 1))))
            opt.step(grads, scale)
            step += 1
    return {k: v.detach() for k, v in p.items()}


@torch.no_grad()
def predict(tokens: Tensor, p: dict[str, Tensor], batch_size: int = EVAL_BATCH) -> Tensor:
    """tokens (n, N, D) -> logits (n, G, C) on the CPU, in batches (the tokens may not fit the device at once)."""
    dev = p["u"].device
    return torch.cat([head_logits(tokens[i:i + batch_size].to(dev), p).cpu()
                      for i in range(0, len(tokens), batch_size)])


def attentive_probe(tok_train: Tensor, y_train: Tensor, tok_test: Tensor, y_test: Tensor, num_classes: int,
                    cfg: ClassifierProbeConfig, hits: bool = False) -> dict[str, Any]:
    """Tokens (n, N, D) and labels (n,) -> {"top1", "top5"} on test in %, the chosen "lr", "weight_decay"; with
    `hits`, also "hits": (n_test,) bool, each test item's top-1 hit (for `evals.paired`)."""
    if len(tok_test) == 0:
        raise PipelineError("attentive probe: the test split is empty; expected at least one item")
    y_train, y_test = y_train.long(), y_test.long()
    if int(y_train.max()) >= num_classes or int(y_test.max()) >= num_classes or int(y_train.min()) < 0:
        raise PipelineError(f"attentive probe: labels outside 0..{num_classes - 1}")
    points = grid(cfg.lrs, (cfg.attentive_weight_decay,))
    with num_threads(1):  # small ops: as for the linear heads, fork/join costs more than the work
        if len(points) == 1:
            lr, wd = points[0]
        else:
            tr, va = split_train_val(len(tok_train), cfg.val_fraction, cfg.seed)
            p = train_attentive(tok_train, y_train, num_classes, [q[0] for q in points], [q[1] for q in points],
                                cfg.attentive_epochs, cfg.seed, rows=tr)
            logits = predict(tok_train[va], p)  # (n_val, G, C)
            yv = y_train[va]
            top1 = (logits.argmax(-1) == yv[:, None]).float().mean(0)
            ce = F.cross_entropy(logits.permute(0, 2, 1), yv[:, None].expand(-1, len(points)),
                                 reduction="none").mean(0).nan_to_num(math.inf)
            best = min(range(len(points)), key=lambda g: (-top1[g].item(), ce[g].item(), g))
            lr, wd = points[best]
        p = train_attentive(tok_train, y_train, num_classes, [lr], [wd], cfg.attentive_epochs, cfg.seed)
        logits = predict(tok_test, p)[:, 0]
    out = {"top1": topk_accuracy(logits, y_test, 1), "top5": topk_accuracy(logits, y_test, 5), "lr": lr,
           "weight_decay": wd}
    if hits:
        out[HITS] = logits.topk(1, dim=-1).indices[:, 0] == y_test  # what top1 counts
    return out


def evaluate_attentive(encoder: nn.Module, train: Dataset, test: Dataset, cfg: ClassifierProbeConfig, *,
                       rows: Sequence[int] | None = None, num_classes: int | None = None,
                       cache_dir: str | Path | None = None, num_workers: int = 0,
                       hits: bool = False) -> dict[str, dict[str, Any]]:
    """The attentive probe of `encoder` trained on `train` (its `rows` only, when given; at most
    cfg.attentive_max_train of them, a seeded choice) and tested on `test` -> {"last": {"top1", "top5", "lr",
    "weight_decay"}}. Checks the token budget before any encoder pass; with `rows`, the train tokens are
    picked from the full train set's cached ones when there are some (as the 1 % probe does for pooled
    features). `num_classes`: None takes the largest label + 1."""
    if rows is None:
        images = common.limit(train, cfg.attentive_max_train, cfg.seed)
    else:
        some = common.limit(list(rows), cfg.attentive_max_train, cfg.seed)  # a list is a Dataset here
        rows = [some[i] for i in range(len(some))]
        images = Subset(train, rows)
    check_token_budget(len(images) + len(test), encoder.num_patches, encoder.embed_dim)
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    full = None if rows is None else cached(encoder, train, "tokens", cache_dir=cache_dir)
    if full is not None:
        idx = torch.as_tensor(rows, dtype=torch.long)
        ftr = {k: v[idx] for k, v in full.items()}
    else:
        ftr = extract(encoder, images, "tokens", desc="tokens train", **kw)
    fte = extract(encoder, test, "tokens", desc="tokens test", **kw)
    c = num_classes or int(max(ftr["y"].max(), fte["y"].max())) + 1
    return {VIEW: attentive_probe(ftr["tokens"], ftr["y"], fte["tokens"], fte["y"], c, cfg, hits=hits)}
