"""Feature extraction speed: `evals.features.extract` over image files against a bare forward.

    python benchmarks/extract.py                      # the demo encoder (ViT-Micro/8, 64 px), 512 images
    python benchmarks/extract.py --model vit_tiny --patch 16 --image-size 224 --images 256

Writes a small synthetic ImageNet-format folder into a temporary directory, then times, side by side in
one run (this box's speed varies by day; the ratios carry over):

    bare      the encoder's work only: the same images already decoded into batches in memory
    extract   `extract(encoder, dataset)` from the files: decode + transform + forward + pooling
    shared    `extract_many` for two encoders (I-JEPA and its random twin) in one pass over the files,
              against two `extract` calls: the stages decode every image once, not once per encoder

Prints one JSON object: images/s of each, and extract/bare (target >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python benchmarks/extract.py` from the root

from evals.features import extract, extract_many  # noqa: E402
from pipeline.config import ModelConfig, load_config  # noqa: E402
from pipeline.data import ImageNetFolder, eval_transform, export_synthetic  # noqa: E402
from pipeline.models.encoder import build_encoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall times of fn() (the least disturbed by other work on the box)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_micro")
    ap.add_argument("--patch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--kind", default="pooled", choices=["pooled", "tokens"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes decoding (data.num_workers)")
    args = ap.parse_args()

    cfg = load_config(ROOT / "params.yaml").replace(**{
        "data.image_size": args.image_size, "data.synthetic.train_scenes": args.images,
        "data.synthetic.val_scenes": 8})
    with tempfile.TemporaryDirectory() as d, torch.no_grad():
        export_synthetic(cfg.data, d, progress=False)
        ds = ImageNetFolder(Path(d) / "imagenet", "train", eval_transform(args.image_size))
        model = ModelConfig(name=args.model, patch_size=args.patch)
        torch.manual_seed(0)
        encoders = {"ijepa": build_encoder(model, args.image_size).eval(),
                    "random": build_encoder(model, args.image_size).eval()}
        enc = encoders["ijepa"]
        batches = [torch.stack([ds[i][0] for i in range(s, min(s + args.batch, len(ds)))])
                   for s in range(0, len(ds), args.batch)]

        def bare():
            for x in batches:
                if args.kind == "tokens":
                    enc(x).half()
                else:
                    [t.mean(1) for t in enc.forward_layers(x, 4)]

        kw = {"batch_size": args.batch, "desc": "bench", "num_workers": args.workers}
        t_bare = timed(bare, args.repeats)
        t_extract = timed(lambda: extract(enc, ds, args.kind, **kw), args.repeats)
        t_two = timed(lambda: [extract(e, ds, args.kind, **kw) for e in encoders.values()], args.repeats)
        t_many = timed(lambda: extract_many(encoders, ds, args.kind, **kw), args.repeats)
    n = len(ds)
    print(json.dumps({
        "model": f"{args.model}/{args.patch}", "image_size": args.image_size, "images": n, "batch": args.batch,
        "kind": args.kind, "threads": torch.get_num_threads(), "workers": args.workers,
        "bare_images_per_s": round(n / t_bare, 1), "extract_images_per_s": round(n / t_extract, 1),
        "extract_over_bare": round(t_bare / t_extract, 3),
        "two_encoders_separate_s": round(t_two, 3), "two_encoders_one_pass_s": round(t_many, 3),
        "one_pass_speedup": round(t_two / t_many, 3),
    }))


if __name__ == "__main__":
    main()
