"""The I-JEPA module: context encoder + predictor (trained) and an EMA target encoder (not trained).

One forward computes the loss of a batch:

    targets  = LN(target_encoder(images))              (B, N, D), layer norm without affine, no grad
    targets  = gather(targets, masks_pred)             (B, M, Kt, D)
    context  = encoder(images, keep_idx=masks_enc)     (B, Kc, D)
    preds    = predictor(context, masks_enc, masks_pred)  (B, M, Kt, D)
    loss     = smooth_l1(preds, targets)  (official code)  or  mse (the paper's text: L2)
    loss    += reg_weight * reg(reg_input(context), step)   only when reg is not "none" (not in the paper)

The regulariser (pipeline/regularizers.py: "vicreg" or "sigreg") reads the context encoder's outputs
average-pooled over its kept tokens (B, D), as C-JEPA and LeJEPA do (reg_on "pooled"), or every context
token minus its image's mean (B * Kc, D) (reg_on "patches"); with reg "none" nothing is added and the
loss is the paper's, bit for bit.

`update_target(m)` moves the target toward the context encoder: target <- m * target + (1 - m) * online.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import Config
from pipeline.masks import apply_masks
from pipeline.models.encoder import Encoder, build_encoder
from pipeline.models.predictor import Predictor, build_predictor
from pipeline.regularizers import BY_NAME, reg_loss


@dataclass
class IJEPAOutput:
    loss: Tensor  # () scalar, with grad: pred_loss + reg_weight * reg_loss
    target_std: Tensor  # () detached: mean over dims of the std across the batch of pooled targets (collapse)
    pred_loss: Tensor  # () detached: the prediction loss alone
    reg_loss: Tensor  # () detached: the regulariser before its weight (0 when reg is "none")


class IJEPA(nn.Module):
    def __init__(self, encoder: Encoder, predictor: Predictor, loss: str = "smooth_l1", reg: str = "none",
                 reg_weight: float = 1.0, reg_on: str = "pooled"):
        super().__init__()
        if loss not in ("smooth_l1", "l2"):
            raise ValueError(f"loss {loss!r} is not allowed; expected smooth_l1 or l2")
        if reg != "none" and reg not in BY_NAME:
            raise ValueError(f"reg {reg!r} is not allowed; expected none or one of {sorted(BY_NAME)}")
        if reg_on not in ("pooled", "patches"):
            raise ValueError(f"reg_on {reg_on!r} is not allowed; expected pooled or patches")
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)
        self.loss_name = loss
        self.reg, self.reg_weight, self.reg_on = reg, reg_weight, reg_on

    def train(self, mode: bool = True) -> IJEPA:
        super().train(mode)
        self.target_encoder.eval()  # no dropout/drop-path in the teacher, ever
        return self

    @torch.no_grad()
    def targets(self, images: Tensor, masks_pred: Tensor) -> tuple[Tensor, Tensor]:
        """images (B, 3, H, W), masks_pred (B, M, Kt) -> targets (B, M, Kt, D) and all patches (B, N, D)."""
        return select_targets(self.target_encoder(images), masks_pred)

    def prediction_loss(self, pred: Tensor, tgt: Tensor) -> Tensor:
        """The I-JEPA loss (`loss_name`) of predictions against targets, both (B, M, Kt, D), in float32."""
        if self.loss_name == "smooth_l1":
            return F.smooth_l1_loss(pred.float(), tgt.float())
        return F.mse_loss(pred.float(), tgt.float())

    def forward(self, images: Tensor, masks_enc: Tensor, masks_pred: Tensor, step: int = 0) -> IJEPAOutput:
        """images (B, 3, H, W); masks_enc (B, Kc); masks_pred (B, M, Kt) -> loss and collapse statistics.

        `step` (the 0-based training step) seeds the regulariser's random directions (sigreg) only.
        """
        tgt, h = self.targets(images, masks_pred)
        ctx = self.encoder(images, keep_idx=masks_enc)
        pred = self.predictor(ctx, masks_enc, masks_pred)
        loss = self.prediction_loss(pred, tgt)
        pred_loss = loss.detach()
        if self.reg == "none":
            reg = torch.zeros((), device=loss.device)
        else:
            reg = reg_loss(self.reg, self.reg_input(ctx), step)
            loss = loss + self.reg_weight * reg
        pooled = h.float().mean(dim=1)
        return IJEPAOutput(loss=loss, target_std=pooled.std(dim=0).mean(), pred_loss=pred_loss,
                           reg_loss=reg.detach())

    def reg_input(self, ctx: Tensor) -> Tensor:
        """Context tokens (B, Kc, D) -> what the regulariser sees: pooled (B, D), or patches centred on their
        image's mean (B * Kc, D), so that only the spread within each image counts."""
        if self.reg_on == "pooled":
            return ctx.mean(dim=1)
        return (ctx - ctx.mean(dim=1, keepdim=True)).reshape(-1, ctx.size(-1))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * encoder, over every parameter, in one fused call."""
        ema_update(self.target_encoder.parameters(), self.encoder.parameters(), momentum)


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], online_params: Iterable[Tensor], m: float) -> None:
    """target <- m * target + (1 - m) * online, parameter by parameter (same shapes), in one fused call."""
    t = list(target_params)
    o = [p.detach() for p in online_params]
    if len(t) != len(o):
        raise ValueError(f"ema_update: {len(t)} target params but {len(o)} online params")
    if t:
        torch._foreach_lerp_(t, o, 1.0 - m)


def select_targets(h: Tensor, masks_pred: Tensor) -> tuple[Tensor, Tensor]:
    """Target-encoder outputs h (B, N, D), masks_pred (B, M, Kt) -> the layer-normed (no affine) targets
    (B, M, Kt, D) and all layer-normed patches (B, N, D)."""
    h = F.layer_norm(h, (h.size(-1),))
    B, M, Kt = masks_pred.shape
    return apply_masks(h, masks_pred.reshape(B, M * Kt)).reshape(B, M, Kt, h.size(-1)), h


def build_ijepa(cfg: Config) -> IJEPA:
    """The I-JEPA module for `cfg.model` at `cfg.data.image_size`, loss `cfg.optim.loss`, regulariser
    `cfg.optim.reg` at `cfg.optim.reg_weight` on `cfg.optim.reg_on`."""
    size = cfg.data.image_size
    o = cfg.optim
    return IJEPA(build_encoder(cfg.model, size), build_predictor(cfg.model, size), o.loss, o.reg, o.reg_weight,
                 o.reg_on)
