"""I-JEPA experiment pipeline: data, masking, models, training, tracking."""
