"""Datasets: the embedded default is procedural 3-D scenes (`pipeline.data.scenes`), numpy + Pillow only."""
