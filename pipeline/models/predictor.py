"""The narrow I-JEPA predictor: timm `Block`s predicting all M target blocks in one batched pass."""

from __future__ import annotations

import math

import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.masks import apply_masks
from pipeline.models.encoder import sincos_pos_embed_2d
from pipeline.models.presets import ENCODER_PRESETS


class Predictor(nn.Module):
    """Names follow the official `VisionTransformerPredictor`: predictor_embed, mask_token,
    predictor_pos_embed, predictor_blocks, predictor_norm, predictor_proj. Initialised as it: linear
    weights trunc-normal(0.02), zero biases, each block's attn.proj / mlp.fc2 weights / sqrt(2 * layer)."""

    def __init__(self, num_patches_grid: int | tuple[int, int], embed_dim: int, pred_emb_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        super().__init__()
        gh, gw = (num_patches_grid, num_patches_grid) if isinstance(num_patches_grid, int) else num_patches_grid
        self.grid_size = (gh, gw)
        self.embed_dim, self.pred_emb_dim = embed_dim, pred_emb_dim
        self.predictor_embed = nn.Linear(embed_dim, pred_emb_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, pred_emb_dim))
        on_meta = torch.empty(0).device.type == "meta"  # under `with torch.device("meta")`: skip init
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, gh * gw, pred_emb_dim), requires_grad=False)
        dpr = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.predictor_blocks = nn.ModuleList([
            Block(pred_emb_dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=dpr[i]) for i in range(depth)])
        self.predictor_norm = nn.LayerNorm(pred_emb_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(pred_emb_dim, embed_dim)
        if not on_meta:
            with torch.no_grad():
                self.predictor_pos_embed.copy_(sincos_pos_embed_2d(pred_emb_dim, gh, gw).unsqueeze(0))
            trunc_normal_(self.mask_token, std=0.02)
            self.apply(self._init)
            with torch.no_grad():
                for layer, blk in enumerate(self.predictor_blocks, start=1):
                    blk.attn.proj.weight.div_(math.sqrt(2.0 * layer))
                    blk.mlp.fc2.weight.div_(math.sqrt(2.0 * layer))

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, ctx: Tensor, masks_enc: Tensor, masks_pred: Tensor) -> Tensor:
        """ctx (B, Kc, D) context tokens at patch indices masks_enc (B, Kc); masks_pred (B, M, Kt)
        target patch indices -> predictions (B, M, Kt, D)."""
        B, Kc, _ = ctx.shape
        _, M, Kt = masks_pred.shape
        pos = self.predictor_pos_embed.expand(B, -1, -1)
        x = self.predictor_embed(ctx) + apply_masks(pos, masks_enc)  # (B, Kc, d)
        d = x.size(-1)
        x = x.unsqueeze(1).expand(B, M, Kc, d).reshape(B * M, Kc, d)
        tgt_pos = apply_masks(pos, masks_pred.reshape(B, M * Kt)).reshape(B * M, Kt, d)
        tgt = self.mask_token.to(x.dtype) + tgt_pos
        x = torch.cat([x, tgt], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x[:, Kc:])
        return self.predictor_proj(x).reshape(B, M, Kt, self.embed_dim)


def build_predictor(cfg: ModelConfig, img_size: int, drop_path_rate: float = 0.0) -> Predictor:
    """The predictor for `cfg` (heads: the encoder's, as in the official code)."""
    dim, _, heads, _ = ENCODER_PRESETS[cfg.name]
    if cfg.pred_emb_dim % heads:
        heads = max(h for h in range(1, heads + 1) if cfg.pred_emb_dim % h == 0)
    grid = img_size // cfg.patch_size
    return Predictor(grid, dim, cfg.pred_emb_dim, cfg.pred_depth, heads, drop_path_rate=drop_path_rate)
