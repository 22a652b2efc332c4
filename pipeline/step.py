"""One I-JEPA optimisation step, shared by the Ray training loop, the Tune trials and the benchmark.

No host-device synchronisation happens here: the loss comes back as a tensor, and the caller decides
when to read it (at logging steps).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from pipeline.config import OptimConfig
from pipeline.models.ijepa import IJEPA, IJEPAOutput
from pipeline.schedules import Schedules


def unwrap(model: nn.Module) -> IJEPA:
    """The IJEPA module inside a DistributedDataParallel wrapper (or the module itself)."""
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed weights, and biases / 1-D params (norms) without decay.

    The second group carries `WD_exclude=True`, so per-step wd updates leave it at 0.
    """
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, "WD_exclude": True}]


def build_optimizer(model: IJEPA, optim: OptimConfig, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over encoder + predictor; biases and 1-D params (norms) without weight decay.

    `fused` defaults to True on CUDA (one kernel for all parameters), False on the CPU.
    """
    groups = param_groups(model.encoder, optim.weight_decay) + param_groups(model.predictor, optim.weight_decay)
    if fused is None:
        fused = next(model.encoder.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=optim.start_lr, betas=optim.betas, fused=fused)


def set_schedules(opt: torch.optim.Optimizer, sched: Schedules, step: int) -> tuple[float, float]:
    """Write this step's lr (all groups) and weight decay (groups not tagged WD_exclude); return them."""
    lr, wd = sched.lr(step), sched.wd(step)
    for g in opt.param_groups:
        g["lr"] = lr
        if not g.get("WD_exclude", False):
            g["weight_decay"] = wd
    return lr, wd


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked (no GradScaler needed for bf16); a no-op elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_step(model: nn.Module, opt: torch.optim.Optimizer, sched: Schedules, step: int, images: Tensor,
               masks_enc: Tensor, masks_pred: Tensor, bf16: bool = False,
               grad_clip: float | None = None) -> IJEPAOutput:
    """Schedules, forward, backward, optimiser step and EMA update for step `step` (0-based).

    model: IJEPA or DDP(IJEPA); images (B, 3, H, W); masks_enc (B, Kc); masks_pred (B, M, Kt), all on the
    model's device. Returns the detached output (loss tensors, collapse stats) without syncing.
    """
    set_schedules(opt, sched, step)
    with autocast(images.device, bf16):
        out = model(images, masks_enc, masks_pred, step)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    if grad_clip is not None:
        inner = unwrap(model)
        params = [p for m in (inner.encoder, inner.predictor) for p in m.parameters()]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    opt.step()
    unwrap(model).update_target(sched.momentum(step))
    out.loss = out.loss.detach()
    return out
