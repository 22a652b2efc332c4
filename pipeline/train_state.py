"""The pretraining state on disk: one file, `CHECKPOINT_FILE`, in a checkpoint directory.

It holds the whole IJEPA state dict (encoder, predictor, target encoder), the optimiser, the step (the
number of optimiser steps done), the RNG states of torch, numpy and Python, the logged history and what
the loop adds (`wall_s`, `epoch_loss`). `pipeline.train.train_worker(restore=load_checkpoint(d))` continues
from it exactly.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.models.ijepa import IJEPA

CHECKPOINT_FILE = "state.pt"


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def save_checkpoint(directory: Path, model: IJEPA, opt: torch.optim.Optimizer, step: int,
                    history: list[dict[str, float]], extra: dict[str, Any]) -> Path:
    path = Path(directory) / CHECKPOINT_FILE
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng_state(),
                "history": history, **extra}, path)
    return path


def load_checkpoint(directory: str | Path) -> dict[str, Any]:
    """The state saved by `save_checkpoint` (on the CPU)."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        raise PipelineError(f"{path}: no such checkpoint file; expected a folder written by the pretrain loop")
    return torch.load(path, map_location="cpu", weights_only=False)
