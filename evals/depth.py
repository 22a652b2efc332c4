"""NYU Depth v2: a linear head on frozen patch tokens, evaluated on the Eigen crop.

Head (DINOv2's "linear" depth head, without its 4x feature upsampling): each patch token is
concatenated with the image's pooled token (the mean of its patch tokens; our ViT has no class token)
and mapped linearly to
    bins        256 logits over bin centres linearly spaced on [min_depth, max_depth]; the patch's
                depth is the softmax-weighted sum of the centres (DINOv2's classification mode, "UD")
    regression  one number; depth = min_depth + (max_depth - min_depth) * sigmoid(x)
The (h, w) patch depths are upsampled bilinearly to the image (S, S). Training loss: DINOv2's SigLoss,
sqrt(Var(g) + 0.15 mean(g)^2), g = log pred - log gt over the valid pixels (min_depth < gt < max_depth).

Unlike DINOv2, the bias is one per patch position, initialised so that the head starts as the train-mean
depth map (averaged over each patch; `patch_prior`): bins get the maximum-entropy logits whose weighted
centre is that depth, regression the sigmoid's inverse of it. From zero logits the head starts at
(min_depth + max_depth) / 2 = 5 m for every pixel, and SigLoss, which weighs the scale by only 0.15,
moves it slowly: on 13 NYU-format images (one Adam step an epoch) 30 epochs ended at 4.6-5.0 m against
a 3.7 m truth, AbsRel 0.26-0.34, twice the train-mean map's 0.12 (tests/test_evals_depth.py; with the
scale's full weight, 4.1 m). Starting at the baseline, the head contains it and training measures what
the tokens add beyond it; a ViT trained on images carries position in its tokens, its random-init twin
hardly, so the position prior is the head's.

Evaluation (Eigen et al. 2014, as in BTS / AdaBins / DINOv2): predictions clamped to
[min_depth, max_depth]; pixels inside the Eigen crop with min_depth < gt < max_depth; each metric
computed per image, then averaged over the test images:
    abs_rel = mean |p - g| / g        rmse = sqrt(mean (p - g)^2)      log10 = mean |log10 p - log10 g|
    d_k     = fraction with max(p / g, g / p) < 1.25^k,  k = 1, 2, 3
Images and depth maps are at the model's resolution S x S (NyuDepth resizes the whole frame).
The lr x wd grid is trained at once (as in `evals.probe`) and chosen on val RMSE: a held-out split of
train, or k-fold over the train images when that split would hold fewer than MIN_VAL_ITEMS images
(`evals.probe.selection_splits`; "selection_folds" in the result says which).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from evals import common
from evals.features import extract
from evals.paired import ERRORS
from evals.probe import GridAdam, cosine, grid, selection_splits
from pipeline.config import Config, DepthProbeConfig
from pipeline.errors import PipelineError
from pipeline.viz import depth_panel

NAME = "eval_depth"
METRICS = ("abs_rel", "rmse", "log10", "d1", "d2", "d3")
LOWER_IS_BETTER = ("abs_rel", "rmse", "log10")
SIG_VARIANCE_FOCUS = 0.85  # DINOv2 SigLoss: Var(g) + (1 - 0.85) mean(g)^2
LOGIT_BUDGET = 2**24  # logits held per training step (B * N * G * K floats), bounds memory
PANEL_IMAGES = 4


# ------------------------------------------------------------------------------------------ metrics


def eval_mask(gt: Tensor, min_depth: float, max_depth: float, eigen: bool = True) -> Tensor:
    """gt (n, H, W) -> bool (n, H, W): valid depth, inside the Eigen crop when `eigen`."""
    from pipeline.data import eigen_mask

    valid = (gt > min_depth) & (gt < max_depth)
    if eigen:
        valid &= torch.from_numpy(eigen_mask(*gt.shape[-2:])).to(gt.device)
    return valid


def depth_metrics(pred: Tensor, gt: Tensor, mask: Tensor, per_image_out: bool = False) -> dict[str, Any]:
    """pred, gt (n, H, W) metres, mask (n, H, W) bool -> the standard metrics, per image then averaged.

    Images without a valid pixel are left out; PipelineError when none has one. With `per_image_out`, also
    `ERRORS`: the AbsRel of each image kept, (n_kept,) (for the paired test of `evals.paired`).
    """
    p, g, m = pred.double(), gt.double(), mask.bool()
    per_image: dict[str, list[float]] = {k: [] for k in METRICS}
    for pi, gi in ((p[i][m[i]], g[i][m[i]]) for i in range(len(p))):
        if gi.numel() == 0:
            continue
        ratio = torch.maximum(pi / gi, gi / pi)
        per_image["abs_rel"].append(((pi - gi).abs() / gi).mean().item())
        per_image["rmse"].append(((pi - gi) ** 2).mean().sqrt().item())
        per_image["log10"].append((pi.log10() - gi.log10()).abs().mean().item())
        for k in (1, 2, 3):
            per_image[f"d{k}"].append((ratio < 1.25**k).double().mean().item())
    if not per_image["rmse"]:
        raise PipelineError("depth metrics: no test image has a valid pixel inside the Eigen crop")
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in per_image.items()}
    if per_image_out:
        out[ERRORS] = torch.tensor(per_image["abs_rel"], dtype=torch.float64)
    return out


def mean_depth_map(depths: Tensor, min_depth: float, max_depth: float) -> Tensor:
    """depths (n, H, W) -> (H, W): per-pixel mean of the valid train depths (global mean where none)."""
    valid = ((depths > min_depth) & (depths < max_depth)).double()
    total, count = (depths.double() * valid).sum(0), valid.sum(0)
    overall = total.sum() / count.sum().clamp_min(1)
    return torch.where(count > 0, total / count.clamp_min(1), overall).float()


# --------------------------------------------------------------------------------------------- head


def patch_prior(depths: Tensor, cfg: DepthProbeConfig, grid_hw: tuple[int, int]) -> Tensor:
    """depths (n, S, S) -> (h * w,) metres: the train-mean depth map averaged over each patch, row-major."""
    mean = mean_depth_map(depths, cfg.min_depth, cfg.max_depth)
    return F.adaptive_avg_pool2d(mean[None, None], grid_hw).flatten().clamp(cfg.min_depth, cfg.max_depth)


def tilted_logits(centres: Tensor, target: Tensor, iters: int = 60) -> Tensor:
    """centres (K,) increasing, target (N,) in [centres[0], centres[-1]] -> logits (N, K) = beta * u,
    u = the centres rescaled to [0, 1]: among distributions over the centres whose mean is `target`, the
    one of maximum entropy (exponential tilting; beta found by bisection, the mean rising with beta)."""
    u = (centres - centres[0]) / (centres[-1] - centres[0])
    t = ((target - centres[0]) / (centres[-1] - centres[0])).clamp(1e-4, 1 - 1e-4)
    lo, hi = torch.full_like(t, -1e4), torch.full_like(t, 1e4)
    for _ in range(iters):
        beta = (lo + hi) / 2
        below = (beta[:, None] * u).softmax(-1) @ u < t
        lo, hi = torch.where(below, beta, lo), torch.where(below, hi, beta)
    return ((lo + hi) / 2)[:, None] * u


class DepthHeads:
    """G linear depth heads trained at once; tokens (B, N, D) standardised -> depth (B, G, S, S).

    `prior` (N,) metres, one a patch (`patch_prior`): where each head starts; None: zero logits, the middle
    of [min_depth, max_depth].
    """

    def __init__(self, dim: int, heads: int, cfg: DepthProbeConfig, grid_hw: tuple[int, int], image_size: int,
                 device: torch.device | str = "cpu", prior: Tensor | None = None):
        self.k = cfg.num_bins if cfg.head == "bins" else 1
        self.cfg, self.grid_hw, self.image_size = cfg, grid_hw, image_size
        n = grid_hw[0] * grid_hw[1]
        self.centres = torch.linspace(cfg.min_depth, cfg.max_depth, self.k, device=device)
        self.w_tok = torch.zeros(heads, dim, self.k, device=device, requires_grad=True)
        self.w_pool = torch.zeros(heads, dim, self.k, device=device, requires_grad=True)
        self.b = torch.zeros(heads, n, self.k, device=device)  # (G, N, K): a bias per patch position
        if prior is not None:
            if prior.shape != (n,):
                raise PipelineError(f"depth head prior has shape {tuple(prior.shape)}; expected ({n},), one a patch")
            prior = prior.to(device).clamp(cfg.min_depth, cfg.max_depth)
            if cfg.head == "bins":
                self.b += tilted_logits(self.centres, prior)
            else:
                lo, hi = cfg.min_depth, cfg.max_depth
                self.b += torch.logit((prior - lo) / (hi - lo), eps=1e-6)[:, None]
        self.b.requires_grad_(True)

    @property
    def params(self) -> list[Tensor]:
        return [self.w_tok, self.w_pool, self.b]

    def __call__(self, x: Tensor) -> Tensor:
        """x (B, N, D) -> depth (B, G, S, S) in (min_depth, max_depth)."""
        bsz, n, d = x.shape
        g, _, k = self.b.shape
        pooled = x.mean(1)  # (B, D): the image's pooled token
        logits = (x.reshape(bsz * n, d) @ self.w_tok.permute(1, 0, 2).reshape(d, g * k)).view(bsz, n, g, k)
        logits = logits + (pooled @ self.w_pool.permute(1, 0, 2).reshape(d, g * k)).view(bsz, 1, g, k)
        logits = logits + self.b.transpose(0, 1)  # (N, G, K) broadcast over the batch
        lo, hi = self.cfg.min_depth, self.cfg.max_depth
        if self.cfg.head == "bins":
            depth = logits.softmax(-1) @ self.centres  # (B, N, G)
        else:
            depth = lo + (hi - lo) * torch.sigmoid(logits[..., 0])
        depth = depth.permute(0, 2, 1).reshape(bsz, g, *self.grid_hw)
        return F.interpolate(depth, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)

    def batch_size(self, tokens_per_image: int) -> int:
        return max(1, min(256, LOGIT_BUDGET // (tokens_per_image * self.b.shape[0] * self.k)))


def sig_loss(pred: Tensor, gt: Tensor, valid: Tensor) -> Tensor:
    """pred (B, G, S, S), gt (B, S, S), valid (B, S, S) -> (G,) SigLoss per head."""
    m = valid[:, None].float()
    n = m.sum((0, 2, 3)).clamp_min(1)
    g = (pred.clamp_min(1e-6).log() - gt.clamp_min(1e-6).log()[:, None]) * m
    mean = g.sum((0, 2, 3)) / n
    var = (g**2).sum((0, 2, 3)) / n - mean**2
    return (var + (1 - SIG_VARIANCE_FOCUS) * mean**2).clamp_min(1e-12).sqrt()


def train_depth_heads(tokens: Tensor, depths: Tensor, points: list[tuple[float, float]], cfg: DepthProbeConfig,
                      grid_hw: tuple[int, int]) -> DepthHeads:
    """tokens (n, N, D) standardised, depths (n, S, S) -> heads trained with Adam + cosine lr, starting
    from the mean depth map of `depths` (`patch_prior`).

    Inputs stay where they are (CPU); each minibatch moves to `common.device()`.
    """
    dev = common.device()
    heads = DepthHeads(tokens.shape[-1], len(points), cfg, grid_hw, depths.shape[-1], dev,
                       prior=patch_prior(depths, cfg, grid_hw))
    wd = torch.tensor([p[1] for p in points], device=dev)
    opt = GridAdam(heads.params, torch.tensor([p[0] for p in points], device=dev))
    bsz = heads.batch_size(tokens.shape[1])
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(tokens)
    per_epoch = math.ceil(n / bsz)
    total, step = cfg.epochs * per_epoch, 0
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            idx = perm[i * bsz:(i + 1) * bsz]
            gt = depths[idx].to(dev)
            valid = (gt > cfg.min_depth) & (gt < cfg.max_depth)
            if valid.any():
                loss = sig_loss(heads(tokens[idx].to(dev).float()), gt, valid).sum()
                loss = loss + 0.5 * (wd * (heads.w_tok.pow(2).sum((1, 2)) + heads.w_pool.pow(2).sum((1, 2)))).sum()
                opt.step(torch.autograd.grad(loss, heads.params), cosine(step, total))
            step += 1
    return heads


@torch.no_grad()
def predict(heads: DepthHeads, tokens: Tensor) -> Tensor:
    """tokens (n, N, D) standardised -> (n, G, S, S) on the CPU, clamped to [min_depth, max_depth]."""
    bsz, dev = heads.batch_size(tokens.shape[1]), heads.b.device
    out = [heads(tokens[i:i + bsz].to(dev).float()).cpu() for i in range(0, len(tokens), bsz)]
    return torch.cat(out).clamp(heads.cfg.min_depth, heads.cfg.max_depth)


def _token_standardizer(tokens: Tensor):
    """Per-dimension mean / std over all train tokens, computed in chunks (tokens may be float16)."""
    d = tokens.shape[-1]
    s, s2, count = torch.zeros(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64), 0
    for i in range(0, len(tokens), 256):
        x = tokens[i:i + 256].reshape(-1, d).double()
        s, s2, count = s + x.sum(0), s2 + (x**2).sum(0), count + len(x)
    mean = s / count
    std = (s2 / count - mean**2).clamp_min(1e-12).sqrt().clamp_min(1e-6)
    mean, std = mean.float(), std.float()
    return lambda z: ((z.float() - mean) / std)


def depth_probe(tok_train: Tensor, d_train: Tensor, tok_test: Tensor, d_test: Tensor, cfg: DepthProbeConfig,
                grid_hw: tuple[int, int]) -> tuple[dict[str, Any], Tensor]:
    """Tokens (n, N, D), depths (n, S, S) -> (test metrics + chosen "lr", "weight_decay" and "selection_folds"
    (as in `evals.probe.linear_probe`), test pred (n, S, S)).

    Runs on torch's thread count, unlike the linear probe: each step here is a few (B*N, D) x (D, G*K)
    matmuls and softmaxes over millions of logits, which two threads run 1.65x faster than one on an idle
    2-core box (the demo's 800 images, 4 heads, 30 epochs: 45 s vs 75 s per encoder at 256 bins).
    """
    points = grid(cfg.lrs, cfg.weight_decays)
    if len(points) == 1:
        (lr, wd), folds = points[0], 0
    else:
        splits = selection_splits(len(tok_train), cfg.val_fraction, cfg.seed)
        preds, held_out = [], []
        for tr, va in splits:
            norm = _token_standardizer(tok_train[tr])
            heads = train_depth_heads(norm(tok_train[tr]), d_train[tr], points, cfg, grid_hw)
            preds.append(predict(heads, norm(tok_train[va])))  # (n_val, G, S, S)
            held_out.append(va)
        pred, gt = torch.cat(preds), d_train[torch.cat(held_out)]  # every val image once, over the folds
        mask = eval_mask(gt, cfg.min_depth, cfg.max_depth)
        rmse = [depth_metrics(pred[:, g], gt, mask)["rmse"] for g in range(len(points))]
        (lr, wd), folds = points[int(np.argmin(rmse))], len(splits)
    norm = _token_standardizer(tok_train)
    heads = train_depth_heads(norm(tok_train), d_train, [(lr, wd)], cfg, grid_hw)
    pred = predict(heads, norm(tok_test))[:, 0]
    metrics = depth_metrics(pred, d_test, eval_mask(d_test, cfg.min_depth, cfg.max_depth), per_image_out=True)
    return {**metrics, "lr": lr, "weight_decay": wd, "selection_folds": folds}, pred


def evaluate_depth(encoder: nn.Module, train: Dataset, test: Dataset, cfg: DepthProbeConfig, *,
                   cache_dir: str | Path | None = None, num_workers: int = 0,
                   panel_path: str | Path | None = None) -> dict[str, Any]:
    """(image (3, S, S), depth (S, S)) datasets -> {"abs_rel", "rmse", "log10", "d1", "d2", "d3", "lr", ...,
    `ERRORS`: per-image AbsRel (n_test,)}; `common.split_results` takes `ERRORS` out before metrics are written.

    With `panel_path`, also a PNG of a few test predictions (`pipeline.viz.depth_panel`).
    """
    kw = {"batch_size": cfg.batch_size, "cache_dir": cache_dir, "num_workers": num_workers}
    ftr = extract(encoder, train, "tokens", desc="tokens train", **kw)
    fte = extract(encoder, test, "tokens", desc="tokens test", **kw)
    grid_hw = tuple(getattr(encoder, "grid_size", (math.isqrt(ftr["tokens"].shape[1]),) * 2))
    metrics, pred = depth_probe(ftr["tokens"], ftr["y"].float(), fte["tokens"], fte["y"].float(), cfg, grid_hw)
    if panel_path is not None:
        _panel(test, pred, fte["y"], panel_path)
    return metrics


def evaluate_mean_depth(train_depths: Tensor, test_depths: Tensor, cfg: DepthProbeConfig) -> dict[str, float]:
    """The train-mean depth map as the prediction for every test image: (n, S, S) depths -> metrics."""
    mean = mean_depth_map(train_depths, cfg.min_depth, cfg.max_depth).clamp(cfg.min_depth, cfg.max_depth)
    pred = mean.expand_as(test_depths)
    return depth_metrics(pred, test_depths, eval_mask(test_depths, cfg.min_depth, cfg.max_depth))


def _panel(test: Dataset, pred: Tensor, gt: Tensor, path: str | Path) -> None:
    n = min(PANEL_IMAGES, len(pred))
    images = torch.stack([test[i][0] for i in range(n)])
    depth_panel(images, pred[:n], gt[:n], path)


def run(cfg: Config, root: str | Path | None = None) -> dict[str, Any]:
    """The eval_depth stage: both encoders + the mean-depth baseline, metrics/eval_depth.json, MLflow."""
    from pipeline.data import NyuDepth, dataset_paths

    ctx = common.prepare(cfg, root)
    nyu = dataset_paths(cfg.data, ctx.root).nyu
    d = cfg.eval_depth
    train = common.limit(NyuDepth(nyu, "train", cfg.data.image_size), d.max_train, d.seed)
    test = common.limit(NyuDepth(nyu, "test", cfg.data.image_size), d.max_test, d.seed)
    common.prefetch(ctx, [train, test], cfg.eval_depth, pooled=False, tokens=True, num_workers=cfg.data.num_workers)
    results, panels = {}, []
    for name, enc in ctx.encoders.items():
        panel = ctx.root / "reports" / f"depth_{name}.png"
        results[name] = {"last": evaluate_depth(enc, train, test, cfg.eval_depth, cache_dir=ctx.cache_dir,
                                                num_workers=cfg.data.num_workers, panel_path=panel)}
        panels.append(panel)
    # The depth maps are the cached "y" of the token features: no second pass over the .mat.
    kw = {"batch_size": cfg.eval_depth.batch_size, "cache_dir": ctx.cache_dir}
    d_train = extract(ctx.encoders["ijepa"], train, "tokens", **kw)["y"].float()
    d_test = extract(ctx.encoders["ijepa"], test, "tokens", **kw)["y"].float()
    metrics, chosen = common.split_results(results)
    metrics["mean_depth"] = evaluate_mean_depth(d_train, d_test, cfg.eval_depth)
    params = {**common.section_params(cfg.eval_depth, NAME), "chosen": chosen, "n_train": len(train),
              "n_test": len(test)}
    common.finish(cfg, ctx, NAME, metrics, params, panels)
    return metrics
