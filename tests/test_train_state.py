"""The pretraining state on disk: a missing file is one line; the saved RNG state restores the draws."""

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.models.ijepa import build_ijepa
from pipeline.step import build_optimizer
from pipeline.train_state import load_checkpoint, save_checkpoint, set_rng_state


def test_missing_checkpoint_file(tmp_path: Path):
    with pytest.raises(PipelineError, match="no such checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_round_trip_restores_model_optimizer_and_rng(tiny_cfg, tmp_path: Path):
    model = build_ijepa(tiny_cfg)
    opt = build_optimizer(model, tiny_cfg.optim)
    torch.manual_seed(1)
    save_checkpoint(tmp_path, model, opt, 7, [{"step": 7, "loss": 0.5}], {"wall_s": 2.0})
    draws = (torch.rand(3), np.random.rand(3), random.random())
    state = load_checkpoint(tmp_path)
    assert state["step"] == 7 and state["history"] == [{"step": 7, "loss": 0.5}] and state["wall_s"] == 2.0
    assert all(torch.equal(t, state["model"][k]) for k, t in model.state_dict().items())
    assert state["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    set_rng_state(state["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(draws[0], again[0]) and (draws[1] == again[1]).all() and draws[2] == again[2]
