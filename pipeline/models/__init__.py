"""I-JEPA models: the ViT encoder (context and target), the narrow predictor and the I-JEPA module."""

from pipeline.models.checkpoints import load_any_encoder, load_official_checkpoint
from pipeline.models.encoder import Encoder, build_encoder, sincos_pos_embed_2d
from pipeline.models.ijepa import IJEPA, IJEPAOutput, build_ijepa
from pipeline.models.io import load_encoder, save_encoder
from pipeline.models.predictor import Predictor, build_predictor

__all__ = ["IJEPA", "Encoder", "IJEPAOutput", "Predictor", "build_encoder", "build_ijepa", "build_predictor",
           "load_any_encoder", "load_encoder", "load_official_checkpoint", "save_encoder", "sincos_pos_embed_2d"]
