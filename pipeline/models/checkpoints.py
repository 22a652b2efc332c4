"""Encoders from files made elsewhere: official I-JEPA checkpoints, timm weights, Hugging Face folders.

    format    on disk                                                   tensor names
    pipeline  <dir>/model.json + weights.pt (`save_encoder`)            ours
    official  *.pth.tar: {"encoder", "predictor", "target_encoder",     ours, behind DDP's `module.`
              "opt", "epoch", ...} (facebookresearch/ijepa)
    timm      a state dict (.pth, .pt, .bin or .safetensors) of         ours (+ `head.*`, dropped)
              vit_*_gap_* (no class token, avg pool, no fc_norm)
    hf        <dir>/config.json (model_type "ijepa") + model.safetensors IJepaModel's (query/key/value, ...),
              (or shards + model.safetensors.index.json, or            mapped onto ours
              pytorch_model.bin), `save_pretrained` of an IJepaModel

The format is told from the files, never from the name alone. The architecture (width, depth, MLP
width, patch, image size) is read from the tensor shapes (and the config for HF), matched against
ENCODER_PRESETS, and every mismatch is one PipelineError line naming the key and both shapes.

The encoder is built on the meta device and the checkpoint's tensors are assigned into it (torch.load
with mmap, safetensors one tensor at a time), so a ViT-H/14 is in memory once, not twice.
Which encoder a file holds: official files hold the context encoder ("encoder") and its EMA
("target_encoder", the one the paper evaluates: `which`); timm's and Hugging Face's conversions of the
released checkpoints took "encoder", and such files hold that one encoder only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.encoder import Encoder, build_encoder, check_state_dict
from pipeline.models.io import META, WEIGHTS, encoder_meta
from pipeline.models.presets import ENCODER_PRESETS, PATCH_SIZES

FORMATS = ("pipeline", "official", "timm", "hf")
WHICH = ("target_encoder", "encoder")  # official files also hold "predictor": not an encoder
OFFICIAL_KEYS = ("encoder", "target_encoder", "predictor")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar", ".ckpt")
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
DROPPED_PREFIXES = ("head.", "pooler.")  # a classifier / HF pooler on top of the encoder: not features

# Hugging Face IJepaModel names -> ours. `save_pretrained` writes the legacy ViT names (first group);
# transformers >= 5 names its modules as the second group, which a raw `state_dict()` holds.
_HF_RULES = [(re.compile(p), r) for p, r in [
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$", r"patch_embed.proj.\1"),
    (r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.(weight|bias)$", r"blocks.\1.norm1.\2"),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.(weight|bias)$", r"blocks.\1.norm2.\2"),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc1.\2"),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$", r"blocks.\1.mlp.fc2.\2"),
    (r"^layers\.(\d+)\.attention\.(q|k|v)_proj\.(weight|bias)$", r"blocks.\1.attn.\2.\3"),
    (r"^layers\.(\d+)\.attention\.o_proj\.(weight|bias)$", r"blocks.\1.attn.proj.\2"),
    (r"^layers\.(\d+)\.layernorm_(before|after)\.(weight|bias)$", r"blocks.\1.\2.\3"),
    (r"^layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$", r"blocks.\1.mlp.\2.\3"),
    (r"^layernorm\.(weight|bias)$", r"norm.\1"),
]]
_QKV = {"query": 0, "key": 1, "value": 2, "q": 0, "k": 1, "v": 2}
_NORMS = {"before": "norm1", "after": "norm2"}


@dataclass(frozen=True)
class Architecture:
    """What the tensors say: ViT width, depth, MLP width, patch and image size (+ heads / eps from a config)."""

    embed_dim: int
    depth: int
    mlp_dim: int
    patch_size: int
    image_size: int
    num_heads: int | None = None
    norm_eps: float = 1e-6

    def preset(self, source: str) -> str:
        """The ENCODER_PRESETS name of this architecture; PipelineError naming what matched nothing."""
        for name, (dim, depth, heads, ratio) in ENCODER_PRESETS.items():
            if (dim, depth, int(dim * ratio)) == (self.embed_dim, self.depth, self.mlp_dim):
                if self.num_heads is not None and self.num_heads != heads:
                    raise PipelineError(f"{source}: num_attention_heads is {self.num_heads} but {name} "
                                        f"({dim} wide, {depth} deep) has {heads}")
                if self.patch_size not in PATCH_SIZES:
                    raise PipelineError(f"{source}: patch size {self.patch_size} is not supported; "
                                        f"expected one of {list(PATCH_SIZES)}")
                return name
        known = ", ".join(f"{n} {d}x{k} MLP {int(d * r)}" for n, (d, k, _, r) in ENCODER_PRESETS.items())
        raise PipelineError(f"{source}: an encoder {self.embed_dim} wide, {self.depth} deep with MLP "
                            f"{self.mlp_dim} matches no preset (width x depth: {known})")


# ------------------------------------------------------------------------------------------ reading


def detect_format(path: Path) -> str:
    """One of FORMATS from what lies at `path`; PipelineError when it is none of them."""
    if path.is_dir():
        if (path / META).is_file() and (path / WEIGHTS).is_file():
            return "pipeline"
        if (path / "config.json").is_file() and any((path / w).is_file() for w in HF_WEIGHTS):
            return "hf"
        raise PipelineError(f"{path}: a folder of no known encoder format; expected {META} + {WEIGHTS} "
                            f"(this pipeline) or config.json + one of {list(HF_WEIGHTS)} (Hugging Face)")
    if not path.is_file():
        raise PipelineError(f"{path}: no such file or folder")
    if path.suffix == ".safetensors":
        return "timm"
    if path.suffix not in TORCH_SUFFIXES:
        raise PipelineError(f"{path}: unknown encoder file type '{path.suffix}'; expected a folder, "
                            f".safetensors or a torch file ({', '.join(TORCH_SUFFIXES)})")
    return "torch"  # official or timm: told apart by the contents (`read_state_dict`)


def _torch_load(path: Path) -> Any:
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # a legacy (pre-zip) torch file cannot be mapped; read it whole
            if "mmap" not in str(e):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, truncated or not a torch file at all
        raise PipelineError(f"{path}: could not be read as a torch file ({type(e).__name__}); "
                            "the file is corrupt or not a checkpoint") from None


def _safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as e:
        raise PipelineError(f"{path}: could not be read as safetensors ({type(e).__name__}); "
                            "the file is corrupt or not a safetensors file") from None


def _strip(sd: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, Tensor) for v in obj.values())


def read_state_dict(path: Path, which: str = "target_encoder") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Our names -> tensors of the encoder at `path`, and {"format", "which", "hf_config"?}.

    `which` picks the encoder of an official or pipeline checkpoint; timm and HF files hold one encoder
    (recorded as which = null). Tensors stay memory-mapped where the format allows.
    """
    if which not in WHICH:
        raise PipelineError(f"evaluate.which = {which!r} is not allowed; expected one of {list(WHICH)}")
    fmt = detect_format(path)
    if fmt == "pipeline":
        if which != "target_encoder":
            raise PipelineError(f"{path}: this pipeline saves the target encoder only; evaluate.which = "
                                f"{which!r} is not in it (expected 'target_encoder')")
        sd = _torch_load(path / WEIGHTS)
        if not _is_state_dict(sd):
            raise PipelineError(f"{path / WEIGHTS}: not a state dict of tensors")
        return sd, {"format": fmt, "which": which}
    if fmt == "hf":
        return _read_hf(path)
    sd = _safetensors(path) if fmt == "timm" else _torch_load(path)
    if isinstance(sd, dict) and any(isinstance(sd.get(k), dict) for k in OFFICIAL_KEYS):
        present = [k for k in OFFICIAL_KEYS if isinstance(sd.get(k), dict)]
        if which not in present:
            raise PipelineError(f"{path}: official checkpoint has no '{which}' (it holds {present}); "
                                f"set evaluate.which to one of {[w for w in WHICH if w in present]}")
        return _strip(sd[which], "module."), {"format": "official", "which": which}
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):  # a timm training checkpoint
        sd = sd["state_dict"]
    if not _is_state_dict(sd) or not any(k.endswith("patch_embed.proj.weight") for k in sd):
        keys = sorted(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise PipelineError(f"{path}: neither an official I-JEPA checkpoint (no {list(OFFICIAL_KEYS)}) nor "
                            f"timm ViT weights (no patch_embed.proj.weight); it holds {keys}")
    sd = _strip(sd, "module.")
    if "cls_token" in sd:
        raise PipelineError(f"{path}: the ViT has a class token; I-JEPA encoders have none "
                            "(timm: the vit_*_gap_* models)")
    sd = {k: v for k, v in sd.items() if not k.startswith(DROPPED_PREFIXES)}
    return sd, {"format": "timm", "which": None}


def _read_hf(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path / 'config.json'}: not readable JSON ({type(e).__name__})") from None
    if config.get("model_type") != "ijepa":
        raise PipelineError(f"{path / 'config.json'}: model_type is {config.get('model_type')!r}; expected 'ijepa'")
    for key, want in (("hidden_act", "gelu"), ("qkv_bias", True), ("num_channels", 3)):
        if config.get(key, want) != want:
            raise PipelineError(f"{path / 'config.json'}: {key} is {config[key]!r}; our ViT needs {want!r}")
    if (path / "model.safetensors").is_file():
        raw = _safetensors(path / "model.safetensors")
    elif (path / "model.safetensors.index.json").is_file():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        raw = {}
        for shard in sorted(set(index.get("weight_map", {}).values())):
            raw.update(_safetensors(path / shard))
    else:
        raw = _torch_load(path / "pytorch_model.bin")
        if not _is_state_dict(raw):
            raise PipelineError(f"{path / 'pytorch_model.bin'}: not a state dict of tensors")
    return hf_to_ours(_strip(raw, "ijepa."), str(path)), {"format": "hf", "which": None, "hf_config": config}


def hf_to_ours(raw: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """IJepaModel tensor names -> ours; q, k, v concatenated into timm's fused qkv (3D, D)."""
    out: dict[str, Tensor] = {}
    qkv: dict[str, list[Tensor | None]] = {}
    for key, value in raw.items():
        if key.startswith(DROPPED_PREFIXES):
            continue
        for pattern, repl in _HF_RULES:
            if pattern.match(key):
                name = pattern.sub(repl, key)
                break
        else:
            raise PipelineError(f"{source}: tensor '{key}' is not part of an IJepaModel encoder")
        m = re.match(r"^blocks\.(\d+)\.attn\.(query|key|value|q|k|v)\.(weight|bias)$", name)
        if m:
            slots = qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", [None, None, None])
            slots[_QKV[m[2]]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(before|after)\.(weight|bias)$", name)
        out[f"blocks.{m[1]}.{_NORMS[m[2]]}.{m[3]}" if m else name] = value
    for name, parts in qkv.items():
        if any(p is None for p in parts):
            raise PipelineError(f"{source}: '{name}' lacks one of query / key / value")
        out[name] = torch.cat(parts, 0)  # type: ignore[arg-type]
    return out


# ------------------------------------------------------------------------------------- architecture


def infer_architecture(sd: dict[str, Tensor], source: str, hf_config: dict | None = None) -> Architecture:
    """Width, depth, MLP width, patch and image size from the shapes of `sd` (our names)."""
    for key in ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight"):
        if key not in sd:
            raise PipelineError(f"{source}: key '{key}' is missing; not a ViT encoder of the I-JEPA kind")
    proj, pos = sd["patch_embed.proj.weight"], sd["pos_embed"]
    if proj.dim() != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise PipelineError(f"{source}: 'patch_embed.proj.weight' has shape {tuple(proj.shape)}; expected "
                            "(D, 3, p, p)")
    dim, patch = int(proj.shape[0]), int(proj.shape[2])
    n = int(pos.shape[-2]) if pos.dim() == 3 else -1
    grid = int(round(n ** 0.5)) if n > 0 else 0
    if pos.dim() != 3 or grid * grid != n or pos.shape[-1] != dim:
        raise PipelineError(f"{source}: 'pos_embed' has shape {tuple(pos.shape)}; expected (1, g*g, {dim}) "
                            "for a square grid of patches without a class token")
    depth = 1 + max(int(m[1]) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k)))
    arch = Architecture(dim, depth, int(sd["blocks.0.mlp.fc1.weight"].shape[0]), patch, grid * patch)
    if hf_config is not None:
        for key, got in (("hidden_size", dim), ("num_hidden_layers", depth), ("intermediate_size", arch.mlp_dim),
                         ("patch_size", patch), ("image_size", arch.image_size)):
            if key in hf_config and hf_config[key] != got:
                raise PipelineError(f"{source}: config.json says {key} = {hf_config[key]} but the weights "
                                    f"have {got}")
        arch = Architecture(dim, depth, arch.mlp_dim, patch, arch.image_size, hf_config.get("num_attention_heads"),
                            float(hf_config.get("layer_norm_eps", 1e-6)))
    return arch


# ---------------------------------------------------------------------------------------- loading


def build_on_meta(arch: Architecture, source: str) -> tuple[Encoder, ModelConfig]:
    """The encoder of `arch` on the meta device (no memory, no init) and the model config it matches."""
    model = ModelConfig(name=arch.preset(source), patch_size=arch.patch_size)
    with torch.device("meta"):
        encoder = build_encoder(model, arch.image_size)
    return encoder, model


def assign(encoder: Encoder, sd: dict[str, Tensor], source: str, norm_eps: float = 1e-6) -> Encoder:
    """Load `sd` into a meta-device `encoder` by assignment (no copy), checked key by key; eval mode, frozen."""
    check_state_dict(sd, encoder, source)
    encoder.load_state_dict({k: v.float() for k, v in sd.items()}, assign=True)
    left = [k for k, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if left:
        raise PipelineError(f"{source}: '{left[0]}' was not in the checkpoint ({len(left)} tensors left unset)")
    for m in encoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = norm_eps
    return encoder.eval().requires_grad_(False)


def load_official_checkpoint(path: str | Path, which: str = "target_encoder",
                             model: nn.Module | None = None) -> dict[str, Tensor]:
    """The `which` state dict ("encoder", "target_encoder" or "predictor") of an official I-JEPA `.pth.tar`,
    `module.` prefix stripped. With `model`, check keys and shapes against it (one line) and load it."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist")
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get(which), dict):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise PipelineError(f"checkpoint {path} has no '{which}'; it has {keys}")
    sd = _strip(ckpt[which], "module.")
    if model is not None:
        check_state_dict(sd, model, str(path))
        model.load_state_dict(sd)
    return sd


def load_any_encoder(path: str | Path, which: str = "target_encoder") -> tuple[Encoder, dict[str, Any]]:
    """The frozen encoder at `path` in any of FORMATS, and its description (model.json's shape):

        {"model": {"name", "patch_size", ...}, "image_size": S, "format": ..., "which": ..., ...}

    For this pipeline's own folders the description is its model.json (with its `mlflow_run_id`).
    """
    path = Path(path)
    sd, info = read_state_dict(path, which)
    source = str(path)
    arch = infer_architecture(sd, source, info.get("hf_config"))
    encoder, model = build_on_meta(arch, source)
    encoder = assign(encoder, sd, source, arch.norm_eps)
    meta: dict[str, Any] = {"model": {"name": model.name, "patch_size": model.patch_size},
                            "image_size": arch.image_size}
    if info["format"] == "pipeline":
        try:
            meta = encoder_meta(path)
        except (OSError, ValueError) as e:
            raise PipelineError(f"{path / META}: not readable JSON ({type(e).__name__})") from None
        said = (meta.get("model", {}).get("name"), meta.get("model", {}).get("patch_size"), meta.get("image_size"))
        if said != (model.name, model.patch_size, arch.image_size):
            raise PipelineError(f"{path / META} describes {said} but {WEIGHTS} holds "
                                f"{(model.name, model.patch_size, arch.image_size)}")
    return encoder, {**meta, "format": info["format"], "which": info["which"]}
