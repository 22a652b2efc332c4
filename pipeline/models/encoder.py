"""The I-JEPA ViT encoder on timm's VisionTransformer, with a fixed 2-D sin-cos position embedding.

State-dict names equal the official I-JEPA ones (`patch_embed.proj.*`, `pos_embed`, `blocks.{i}.*`,
`norm.*`), so official checkpoints load after stripping their DDP `module.` prefix.
"""

from __future__ import annotations

import numpy as np
import torch
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.masks import apply_masks
from pipeline.models.presets import ENCODER_PRESETS


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int | None = None) -> Tensor:
    """(grid_h*grid_w, dim) fixed sin-cos embedding, as in MAE / I-JEPA (`get_2d_sincos_pos_embed`)."""
    grid_w = grid_h if grid_w is None else grid_w
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    gh = np.arange(grid_h, dtype=np.float64)
    gw = np.arange(grid_w, dtype=np.float64)
    ww, hh = np.meshgrid(gw, gh)  # official: meshgrid(grid_w, grid_h), first half from w
    emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)
    return torch.from_numpy(emb).float()


class Encoder(VisionTransformer):
    """timm ViT without class token or head; `forward(x, keep_idx)` encodes only the kept patches.

    Initialised as the official I-JEPA encoder: linear weights trunc-normal(0.02) with zero biases, the
    patch-embedding conv too (timm leaves it at PyTorch's uniform default with a non-zero bias), and each
    block's attn.proj / mlp.fc2 weights divided by sqrt(2 * layer) (`fix_init`).
    """

    def __init__(self, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.0):
        on_meta = torch.empty(0).device.type == "meta"  # under `with torch.device("meta")`: skip init
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                         num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, class_token=False,
                         global_pool="avg", num_classes=0, fc_norm=False, drop_path_rate=drop_path_rate,
                         weight_init="skip" if on_meta else "", fix_init=True)
        self.patch_size = patch_size
        self.grid_size = tuple(self.patch_embed.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.pos_embed.requires_grad_(False)
        if not on_meta:
            with torch.no_grad():
                self.pos_embed.copy_(sincos_pos_embed_2d(embed_dim, *self.grid_size).unsqueeze(0))
                trunc_normal_(self.patch_embed.proj.weight, std=0.02)
                nn.init.zeros_(self.patch_embed.proj.bias)

    def _tokens(self, x: Tensor, keep_idx: Tensor | None) -> Tensor:
        x = self.patch_embed(x) + self.pos_embed
        if keep_idx is not None:
            x = apply_masks(x, keep_idx)
        return x

    def forward(self, x: Tensor, keep_idx: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """x (B, 3, H, W); keep_idx (B, K) patch indices or None -> (B, K or N, D)."""
        x = self._tokens(x, keep_idx)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_layers(self, x: Tensor, n: int = 1) -> list[Tensor]:
        """Outputs of the last n blocks, each through the final norm: n tensors (B, N, D)."""
        x = self._tokens(x, None)
        outs = []
        first = len(self.blocks) - n
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= first:
                outs.append(self.norm(x))
        return outs


def build_encoder(cfg: ModelConfig, img_size: int, drop_path_rate: float = 0.0) -> Encoder:
    """The encoder of `cfg.name` / `cfg.patch_size` for square images of `img_size` pixels."""
    if img_size % cfg.patch_size:
        raise PipelineError(f"image size {img_size} is not a multiple of patch size {cfg.patch_size}")
    dim, depth, heads, mlp = ENCODER_PRESETS[cfg.name]
    return Encoder(img_size, cfg.patch_size, dim, depth, heads, mlp, drop_path_rate)


def check_state_dict(sd: dict[str, Tensor], model: torch.nn.Module, source: str = "checkpoint") -> None:
    """PipelineError (one line) naming the first missing / unexpected key or shape mismatch."""
    want = model.state_dict()
    for k, v in want.items():
        if k not in sd:
            raise PipelineError(f"{source}: key '{k}' expected by the model is missing")
        if tuple(sd[k].shape) != tuple(v.shape):
            raise PipelineError(f"{source}: '{k}' has shape {tuple(sd[k].shape)} in the checkpoint but "
                                f"{tuple(v.shape)} in the model")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise PipelineError(f"{source}: key '{extra[0]}' is not in the model ({len(extra)} unexpected)")
