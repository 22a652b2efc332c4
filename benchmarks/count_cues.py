"""Which cues carry the object count of the embedded scenes? One process, no training.

    python benchmarks/count_cues.py [--train 2400] [--val 800]

The count probe of the demo compares I-JEPA with a random-init encoder. This script measures how far a
linear probe gets on the count (3..10, 8 classes, chance 12.5 %) from cues that need no object-level
features, with the same probe as `benchmarks/demo_quality.py` (standardised features, logistic, C=0.1):

- `colours`: which of the 8 object colours appear in the scene (8 bits) plus how many distinct ones.
  Objects draw their colours independently, so more objects show more colours.
- `random_rgb`: a random-init encoder of the demo preset (mean-pooled last layer), colour images.
- `random_gray`: the same encoder on the grey-level images (the colour cue removed).

Prints one JSON object. If `colours` alone gets close to `random_rgb`, and `random_gray` falls well below
it, the random encoder's count score rests on colour diversity, a cue that masked prediction has no
reason to keep: the colour of a hidden object cannot be predicted from the other objects.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/count_cues.py` from the root

from benchmarks.demo_quality import VAL_OFFSET, grey, logistic_top1, pooled, to_tensor  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.scenes import COLORS, render_many  # noqa: E402
from pipeline.models.encoder import build_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def colour_features(objects: list[dict]) -> np.ndarray:
    """(9,): presence of each of the 8 object colours, then the number of distinct colours."""
    present = np.array([any(o["color"] == c for o in objects) for c in COLORS], dtype=float)
    return np.append(present, present.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=2400)
    ap.add_argument("--val", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0, help="the random encoder's init seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(ROOT / "params.yaml")
    S, seed, procs = cfg.data.image_size, cfg.data.synthetic.seed, cfg.data.synthetic.processes
    tr = render_many(seed, range(args.train), S, processes=procs)
    va = render_many(seed, range(VAL_OFFSET, VAL_OFFSET + args.val), S, processes=procs)
    ya, yb = np.array([s.count for s in tr]), np.array([s.count for s in va])
    ca, cb = (np.stack([colour_features(s.objects) for s in split]) for split in (tr, va))
    out: dict[str, float] = {"colours": logistic_top1(ca, ya, cb, yb)}
    torch.manual_seed(args.seed)
    encoder = build_encoder(cfg.model, S)
    xa, xb = (np.stack([s.image for s in split]) for split in (tr, va))
    for name, convert in (("random_rgb", lambda x: x), ("random_gray", grey)):
        fa = pooled(encoder, to_tensor(convert(xa)), "last")
        fb = pooled(encoder, to_tensor(convert(xb)), "last")
        out[name] = logistic_top1(fa, ya, fb, yb)
    print(json.dumps({"count_top1": out, "chance": 12.5, "train": args.train, "val": args.val}))


if __name__ == "__main__":
    main()
