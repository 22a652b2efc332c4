"""The encoder sizes `model.name` and `model.patch_size` may name.

Plain data with no imports: pipeline/config.py checks params.yaml against it without loading torch.
"""

# name -> (embed_dim, depth, num_heads, mlp_ratio); the I-JEPA repo's vision_transformer.py values.
ENCODER_PRESETS: dict[str, tuple[int, int, int, float]] = {
    "vit_micro": (128, 6, 4, 4.0),  # not in the paper: a CPU demo size (about 1/5 of ViT-Tiny's FLOPs)
    "vit_tiny": (192, 12, 3, 4.0),
    "vit_small": (384, 12, 6, 4.0),
    "vit_base": (768, 12, 12, 4.0),
    "vit_large": (1024, 24, 16, 4.0),
    "vit_huge": (1280, 32, 16, 4.0),
    "vit_giant": (1408, 40, 16, 48 / 11),
}
PATCH_SIZES = (8, 14, 16)
