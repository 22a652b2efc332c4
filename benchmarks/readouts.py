"""Does the pretrained encoder beat random init under readouts other than the paper's mean pooling?

    make repro && python benchmarks/readouts.py          # the pipeline's encoder and data, params.yaml

The paper reads a frozen encoder out by mean-pooling its last layer's patch tokens, and the pipeline's
linear and 1 % probes do the same for both encoders. A random-init ViT's mean-pooled tokens are mostly
the image's mean colour, so that baseline may be weak for a reason that has nothing to do with what its
tokens hold. This script fits the pipeline's own probes (`evals.probe.linear_probe` with the eval_linear
and eval_semi sections: the same weight-decay grid, selection folds and seeds) on four label-free
readouts of the last layer's tokens (n, N, D), for the pretrained encoder and its random-init twin:

    mean      (n, D)   the paper's readout (equals the pipeline's "last" view)
    std       (n, D)   per-channel std over the patches
    mean_std  (n, 2D)  both
    max       (n, D)   per-channel max over the patches

and prints, per readout, top-1 of both encoders on the full train set and on the 1 % list, with the
paired margin and McNemar p (`evals.paired`). The tokens come from the evaluations' feature cache when
the linear probe's attentive head has filled it (the demo preset does), else they are extracted
(ImageNet-sized train sets: (n, N, D) float16 must fit in memory). It writes nothing but that cache and
opens no MLflow run. Prints one JSON object.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/readouts.py` from the root

from evals import common  # noqa: E402
from evals.features import extract  # noqa: E402
from evals.linear import imagenet_splits, num_classes  # noqa: E402
from evals.paired import paired_margin  # noqa: E402
from evals.probe import linear_probe  # noqa: E402
from evals.semi import subset_indices  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data import ImageNetFolder, dataset_paths  # noqa: E402
from pipeline.models.checkpoints import load_any_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
READOUTS = ("mean", "std", "mean_std", "max")


def readout(tokens: Tensor, name: str) -> Tensor:
    """tokens (n, N, D) -> (n, D) or (n, 2D) float32, one of READOUTS."""
    t = tokens.float()
    if name == "mean":
        return t.mean(1)
    if name == "std":
        return t.std(1, correction=0)
    if name == "mean_std":
        return torch.cat([t.mean(1), t.std(1, correction=0)], 1)
    if name == "max":
        return t.amax(1)
    raise ValueError(f"readout {name!r}: expected one of {READOUTS}")


def main() -> None:
    cfg = load_config(ROOT / "params.yaml")
    source = common.encoder_source(cfg, ROOT)
    if not source.exists():
        print(f"readouts: {source}: no saved encoder; run `make repro` first (or set evaluate.encoder)",
              file=sys.stderr)
        sys.exit(2)
    encoder, meta = load_any_encoder(source, cfg.evaluate.which)
    common.check_architecture(meta, cfg, str(source))
    encoders = {"ijepa": encoder, "random": common.random_encoder(cfg)}
    train, val = imagenet_splits(cfg, ROOT)
    val = common.limit(val, cfg.eval_linear.max_test, cfg.eval_linear.seed)
    subset_file = dataset_paths(cfg.data, ROOT).imagenet_subset
    few = torch.as_tensor(subset_indices(train, ImageNetFolder(train.root, "train", subset_file=subset_file)))
    capped = common.limit(train, cfg.eval_linear.max_train, cfg.eval_linear.seed)  # the linear stage's rows
    full = torch.as_tensor(capped.indices) if capped is not train else slice(None)
    cache = ROOT / common.CACHE_DIR
    hits: dict[tuple[str, str, str], Tensor] = {}
    out: dict[str, dict] = {r: {} for r in READOUTS}
    for name, enc in encoders.items():
        tr = extract(enc, train, "tokens", cache_dir=cache, batch_size=cfg.eval_linear.batch_size)
        va = extract(enc, val, "tokens", cache_dir=cache, batch_size=cfg.eval_linear.batch_size)
        classes = num_classes(train, tr["y"])
        for r in READOUTS:
            xtr, xva = readout(tr["tokens"], r), readout(va["tokens"], r)
            for probe, rows, pcfg in (("full", full, cfg.eval_linear), ("1pct", few, cfg.eval_semi)):
                res = linear_probe(xtr[rows], tr["y"][rows], xva, va["y"], classes, pcfg, hits=True)
                out[r].setdefault(probe, {})[name] = round(res["top1"], 2)
                hits[(r, probe, name)] = res["hits"]
    for r in READOUTS:
        for probe in ("full", "1pct"):
            pm = paired_margin(hits[(r, probe, "ijepa")], hits[(r, probe, "random")])
            out[r][probe].update(margin=round(pm["margin"], 2), p_value=float(f"{pm['p_value']:.3g}"))
    print(json.dumps({"encoder": str(source), "n_train": len(train), "n_1pct": len(few), "n_val": len(val),
                      "readouts": out}))


if __name__ == "__main__":
    main()
