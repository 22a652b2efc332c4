"""Peak memory of loading a released-size encoder: ours (meta device + assign) vs build-then-load.

    python benchmarks/load_memory.py                               # ViT-H/14 at 224 px, as the official file
    python benchmarks/load_memory.py --model vit_base --patch 16   # quicker

Writes an official-format checkpoint ({"encoder", "target_encoder"} behind DDP's `module.`, as
facebookresearch/ijepa saves them) of random weights into a temporary folder, then, each in a fresh
process, loads the target encoder and runs one image through it:

    ours   `load_any_encoder`: built on the meta device, the memory-mapped tensors assigned (one copy)
    naive  build the encoder (random init: one copy), torch.load the whole file (every tensor of both
           encoders: two more), load_state_dict (copies into the first)

Prints one JSON object: the encoder's size, and each way's peak RSS above the process's RSS before
loading (VmHWM; memory-mapped pages that were read count as resident).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.config import ModelConfig  # noqa: E402
from pipeline.models.encoder import build_encoder  # noqa: E402

CHILD = """
import json, sys, torch
sys.path.insert(0, {root!r})
def hwm_kib():  # the peak RSS of this process (ru_maxrss would carry the parent's peak across exec)
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM")))
from pipeline.config import ModelConfig
from pipeline.models.checkpoints import load_any_encoder
from pipeline.models.encoder import build_encoder
path, way, name, patch, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
before = hwm_kib()
if way == "ours":
    enc, _ = load_any_encoder(path)
else:
    enc = build_encoder(ModelConfig(name=name, patch_size=patch), size)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    enc.load_state_dict({{k[len("module."):]: v for k, v in ckpt["target_encoder"].items()}})
with torch.no_grad():
    enc.eval()(torch.zeros(1, 3, size, size))
peak = hwm_kib()
print(json.dumps({{"peak_above_start_mib": round((peak - before) / 1024)}}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vit_huge")
    ap.add_argument("--patch", type=int, default=14)
    ap.add_argument("--image-size", type=int, default=224)
    args = ap.parse_args()
    model = ModelConfig(name=args.model, patch_size=args.patch)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "checkpoint.pth.tar"
        enc = build_encoder(model, args.image_size)
        sd = {f"module.{k}": v for k, v in enc.state_dict().items()}
        size_mib = sum(v.numel() * v.element_size() for v in sd.values()) / 2**20
        torch.save({"encoder": sd, "target_encoder": {k: v.clone() for k, v in sd.items()}, "epoch": 300}, path)
        del enc, sd
        out = {"model": f"{args.model}/{args.patch}", "image_size": args.image_size,
               "encoder_mib": round(size_mib), "file_mib": round(path.stat().st_size / 2**20)}
        for way in ("ours", "naive"):
            proc = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT)), str(path), way, args.model,
                                   str(args.patch), str(args.image_size)], capture_output=True, text=True, check=True)
            out[f"{way}_peak_mib"] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_above_start_mib"]
    out["ours_over_encoder"] = round(out["ours_peak_mib"] / out["encoder_mib"], 2)
    out["naive_over_encoder"] = round(out["naive_peak_mib"] / out["encoder_mib"], 2)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
