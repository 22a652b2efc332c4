"""I-JEPA models: the ViT encoder (context and target) and the narrow predictor."""

from pipeline.models.encoder import Encoder, build_encoder, load_official_checkpoint, sincos_pos_embed_2d
from pipeline.models.predictor import Predictor, build_predictor

__all__ = ["Encoder", "Predictor", "build_encoder", "build_predictor", "load_official_checkpoint",
           "sincos_pos_embed_2d"]
