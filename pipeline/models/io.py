"""The pretrain stage's model output, read by every evaluation: `<out_dir>/encoder/`.

    encoder/weights.pt   the TARGET encoder's state dict (official names, no `module.` prefix)
    encoder/model.json   {"model": {name, patch_size, ...}, "image_size": S, "params_hash": ...}

Written into a temporary sibling folder and renamed into place, so a killed stage never leaves a
half-written encoder that an evaluation would take as complete.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.atomic import atomic_dir
from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.encoder import Encoder

ENCODER_DIR = "encoder"
WEIGHTS = "weights.pt"
META = "model.json"


def save_encoder(encoder: Encoder, model: ModelConfig, image_size: int, out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """Write `encoder` to `out_dir` (the folder itself is replaced atomically); return it."""
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        torch.save(state, tmp / WEIGHTS)
        meta = {"model": asdict(model), "image_size": int(image_size), **(extra or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def load_encoder(path: str | Path) -> Encoder:
    """The encoder saved by `save_encoder`, in eval mode without gradients (built on the meta device and
    assigned the saved tensors: one copy in memory)."""
    from pipeline.models.checkpoints import load_any_encoder

    path = Path(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise PipelineError(f"encoder {path} is missing {META} or {WEIGHTS}; run the pretrain stage first")
    return load_any_encoder(path)[0]


def encoder_meta(path: str | Path) -> dict:
    """The model.json of a saved encoder."""
    return json.loads((Path(path) / META).read_text())
