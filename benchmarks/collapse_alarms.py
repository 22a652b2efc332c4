"""Do the pretraining's collapse alarms fire on a deliberately collapsing run and stay silent on the preset?

    python benchmarks/collapse_alarms.py --steps 148 --every 37

Pretrains the demo preset on the embedded scenes (one process, `demo_quality.pretrain`) in three variants,
and every `--every` steps runs `pipeline.diagnostics.diagnose` on 256 held-out scenes and
`pipeline.diagnostics.alarms` with the thresholds of params.yaml, armed as `pipeline.train` arms them
(once the model has beaten the context-mean guess at an earlier check) and with the init's feature std as
the reference of `pretrain.collapse_std_drop`:

* ``preset``: the demo preset, as `make repro` trains it. Its alarms should stay silent.
* ``no_stop_grad``: the targets come from the CONTEXT encoder with the gradient flowing through them
  (no stop-gradient; the target encoder follows it with EMA momentum 0, so the diagnostics read the same
  weights), no regulariser. Nothing stops the encoder from mapping every image to one vector, the
  collapse the stop-gradient and EMA exist to prevent; the alarms should fire.
* ``ema0``: EMA momentum 0 but the stop-gradient kept, no regulariser (SimSiam-like). It degrades
  (features ~7x smaller than at init, probes at the random level, docs/findings.md) without reaching the
  absolute floor `collapse_std_min`; the init-relative alarm is the one that should catch it.

Prints one JSON object: per variant, the diagnostics at each check, the alarms found there, and the
first step at which any alarm fired (null: silent).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from demo_quality import ROOT, diagnostics, pretrain, scenes, to_tensor  # noqa: E402

from pipeline.config import load_config  # noqa: E402
from pipeline.diagnostics import alarms  # noqa: E402
from pipeline.models.ijepa import select_targets  # noqa: E402

VARIANTS = {
    "preset": {},
    "no_stop_grad": {"optim.reg": "none", "optim.ema": [0.0, 0.0]},
    "ema0": {"optim.reg": "none", "optim.ema": [0.0, 0.0]},
}


def without_stop_gradient(model: torch.nn.Module) -> None:
    """Make `model.targets` the context encoder's output on the full image, WITH its gradient."""
    def targets(images, masks_pred):
        return select_targets(model.encoder(images), masks_pred)
    model.targets = targets


def run(cfg, name: str, xtr: torch.Tensor, xva: torch.Tensor, steps: int, every: int) -> dict:
    p = cfg.pretrain
    checks: dict[int, dict] = {}
    state = {"armed": False, "first": None, "std_init": None}

    def check(model, step):
        row = diagnostics(model, cfg, xva)
        found = alarms(row, p.collapse_std_min, p.collapse_rank_min, state["armed"], state["std_init"],
                       p.collapse_std_drop)
        state["armed"] |= row["heldout_loss"] < row["trivial_loss"]
        if found and state["first"] is None:
            state["first"] = step
        checks[step] = {**row, "alarms": found}

    at = {k: (lambda m, k=k: check(m, k)) for k in range(every, steps + 1, every)}

    def hook(model):
        state["std_init"] = diagnostics(model, cfg, xva)["feature_std"]  # the seeded init, as pipeline.train
        if name == "no_stop_grad":
            without_stop_gradient(model)

    _, stats = pretrain(cfg, xtr, steps, at, model_hook=hook)
    return {**stats, "feature_std_init": state["std_init"], "first_alarm_step": state["first"], "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=148, help="pretraining steps (rounded to whole epochs)")
    ap.add_argument("--every", type=int, default=37, help="diagnostics every this many steps")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.every < 1 or args.every > args.steps:
        ap.error(f"--every {args.every}: expected 1..--steps ({args.steps})")
    torch.set_num_threads(args.threads)
    base = load_config(ROOT / "params.yaml")
    d = scenes(base.data.synthetic.seed, 2400, 800, base.data.image_size, base.data.synthetic.processes)
    xtr, xva = to_tensor(d["xtr"]), to_tensor(d["xva"])
    p = base.pretrain
    out = {"thresholds": {"feature_std": p.collapse_std_min, "rankme": p.collapse_rank_min,
                          "feature_std_drop": p.collapse_std_drop}}
    for name in args.variants:
        out[name] = run(base.replace(**VARIANTS[name]), name, xtr, xva, args.steps, args.every)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
