"""Collapse and shortcut diagnostics of an I-JEPA module on a fixed batch of images (held-out by default).

`diagnose(model, images, masks_enc, masks_pred)` returns, for the TARGET encoder (what the evaluations read):

* ``rankme``: RankMe (Garrido et al., 2023), exp of the entropy of the normalised singular values, of the
  average-pooled features CENTRED over the batch. Uncentred on a 32-image training shard, the features'
  shared mean dominated the spectrum: the demo's old alarm read 1.7 where 512 held-out images, centred,
  gave 19.9 (random init 30.8). In [1, min(n, D)]; a constant encoder scores 1.
* ``feature_std``: mean over dimensions of the std across images of the pooled features (0 if constant).
* ``position_share`` / ``image_share``: the share of the patch features' total variance (over images,
  patches and dimensions) explained by the patch position (variance of the per-position mean over
  images) and by the image (variance of the per-image mean over patches); the rest is their interaction,
  what tells patches of one image apart beyond their position. A position share near 1 is a positional
  shortcut: the features say where a patch is, not what it shows.
* ``heldout_loss``: the training loss on these images and masks (no gradient).
* ``trivial_loss``: the same loss for a predictor that guesses every target patch as the mean of the
  context patches' targets. When the model barely beats it, the task is too easy to teach anything.

All are floats; `alarms(diag, std_min, rank_min, ...)` names what reads as collapse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pipeline.masks import apply_masks
from pipeline.metrics import rankme
from pipeline.models.ijepa import select_targets

DIAG_COLUMNS = ("rankme", "feature_std", "position_share", "image_share", "heldout_loss", "trivial_loss")


def variance_shares(h: Tensor) -> tuple[float, float]:
    """Patch features h (n, N, D) -> (position share, image share) of their total variance, each in [0, 1].

    Total: the variance over all n * N patches, summed over D. Position: variance over the N positions of
    the mean over images. Image: variance over the n images of the mean over positions. Both 0 when the
    features do not vary at all.
    """
    h = h.double()
    centred = h - h.mean(dim=(0, 1), keepdim=True)
    total = centred.square().mean(dim=(0, 1)).sum()
    if total <= 1e-12 * max(1.0, float(h.square().mean())):
        return 0.0, 0.0
    position = centred.mean(0).square().mean(0).sum()  # (N, D) per-position means
    image = centred.mean(1).square().mean(0).sum()  # (n, D) per-image means
    return float(position / total), float(image / total)


def representation_stats(h: Tensor) -> dict[str, float]:
    """Patch features h (n, N, D) -> {"rankme", "feature_std", "position_share", "image_share"} (see above)."""
    h = h.float()
    pooled = h.mean(1)
    position, image = variance_shares(h)
    return {"rankme": rankme(pooled - pooled.mean(0)), "feature_std": float(pooled.std(0).mean()),
            "position_share": position, "image_share": image}


@torch.no_grad()
def diagnose(model: torch.nn.Module, images: Tensor, masks_enc: Tensor, masks_pred: Tensor) -> dict[str, float]:
    """The figures of the module docstring for an `IJEPA` model: images (n, 3, S, S), masks_enc (n, Kc),
    masks_pred (n, M, Kt), all on the model's device."""
    was_training = model.training
    model.eval()
    try:
        h = model.target_encoder(images).float()  # (n, N, D): what the evaluations pool
        targets, targets_all = select_targets(h, masks_pred)  # what the predictor is trained to match
        pred = model.predictor(model.encoder(images, keep_idx=masks_enc), masks_enc, masks_pred)
        guess = apply_masks(targets_all, masks_enc).mean(1)[:, None, None, :].expand_as(targets)
        return {**representation_stats(h), "heldout_loss": float(model.prediction_loss(pred, targets)),
                "trivial_loss": float(model.prediction_loss(guess, targets))}
    finally:
        model.train(was_training)


def relative_std_floor(std_init: float | None, std_drop: float) -> float | None:
    """The relative alarm's level, std_drop x the init's feature std; None when it is off (no reference, or
    std_drop 0)."""
    return std_drop * std_init if std_init is not None and std_drop > 0 else None


def alarms(diag: dict[str, float], std_min: float, rank_min: float, armed: bool = False,
           std_init: float | None = None, std_drop: float = 0.0) -> list[str]:
    """What in `diag` reads as collapse (low feature std, low RankMe) or, when `armed` (the model has beaten
    the context-mean guess at an earlier check: an untrained predictor never does), as a task turned
    trivial (the model no better than that guess again, within-image collapse's signature): [] when healthy.

    `std_init` (the random-init encoder's feature_std on the same batch) with `std_drop` > 0 also flags a
    feature std below std_drop * std_init: the features of all images shrinking towards one vector without
    reaching the absolute floor (EMA momentum 0 on the demo: 0.012-0.02, against 0.09 at init and 0.13-0.17
    for the preset).
    """
    out, floor = [], relative_std_floor(std_init, std_drop)
    if diag["feature_std"] < std_min:
        out.append(f"feature_std {diag['feature_std']:.4g} < {std_min:g}")
    elif floor is not None and diag["feature_std"] < floor:
        out.append(f"feature_std {diag['feature_std']:.4g} < {std_drop:g} x its value at init ({std_init:.4g})")
    if diag["rankme"] < rank_min:
        out.append(f"rankme {diag['rankme']:.3g} < {rank_min:g}")
    if armed and diag["heldout_loss"] >= diag["trivial_loss"]:
        out.append(f"held-out loss {diag['heldout_loss']:.4g} >= context-mean guess {diag['trivial_loss']:.4g}")
    return out
