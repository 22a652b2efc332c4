"""I-JEPA models: the ViT encoder (context and target), the narrow predictor and the I-JEPA module.

Import from the submodule that defines a name (`pipeline.models.encoder.build_encoder`). This file imports
nothing: pipeline/config.py imports pipeline/models/presets.py, which runs this file first, and the other
submodules import pipeline/config.py (and torch).
"""
