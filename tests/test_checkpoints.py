"""Encoders from other people's files: each format written exactly as its makers write it, loaded into
ours, and compared output for output with the model that wrote it."""

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.models.checkpoints import Architecture, detect_format, load_any_encoder
from pipeline.models.encoder import build_encoder
from pipeline.models.io import save_encoder
from pipeline.models.predictor import Predictor

S, P = 32, 8  # image and patch size of every encoder here: a 4 x 4 grid
MICRO = ModelConfig(name="vit_micro", patch_size=P)  # 128 wide, 6 deep, 4 heads


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(0))


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Perturb every tensor so that no default init (LayerNorm 1/0, zero biases) hides a mapping bug."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=gen))
    return model.eval()


def _official(tmp_path: Path, which_present=("encoder", "predictor", "target_encoder")) -> tuple[Path, dict]:
    torch.manual_seed(1)
    encs = {w: _trained_like(build_encoder(MICRO, S)) for w in ("encoder", "target_encoder")}
    pred = Predictor(16, 128, 32, depth=1, num_heads=4)
    parts = {**{w: e.state_dict() for w, e in encs.items()}, "predictor": pred.state_dict()}
    ckpt = {w: {f"module.{k}": v for k, v in parts[w].items()} for w in which_present}
    path = tmp_path / "IN1K-vit.micro.8-300e.pth.tar"
    torch.save({**ckpt, "opt": {}, "scaler": None, "epoch": 300, "loss": 0.1, "batch_size": 2048,
                "world_size": 16, "lr": 1e-3}, path)
    return path, encs


def test_official_checkpoint_both_encoders(tmp_path):
    path, encs = _official(tmp_path)
    x = _images()
    for which in ("target_encoder", "encoder"):
        enc, meta = load_any_encoder(path, which)
        assert meta["format"] == "official" and meta["which"] == which
        assert meta["model"] == {"name": "vit_micro", "patch_size": 8} and meta["image_size"] == S
        torch.testing.assert_close(enc(x), encs[which](x), rtol=0, atol=0)
        assert not any(p.requires_grad for p in enc.parameters()) and not enc.training


def test_timm_weights_pth_and_safetensors(tmp_path):
    import timm
    from safetensors.torch import save_file

    # The options of timm's vit_huge_patch14_gap_224.in1k_ijepa (no class token, avg pool, no fc_norm),
    # at a micro size.
    torch.manual_seed(2)
    src = timm.create_model("vit_huge_patch14_gap_224", pretrained=False, img_size=S, patch_size=P, embed_dim=128,
                            depth=6, num_heads=4, num_classes=10)
    src = _trained_like(src)
    x = _images()
    want = src.forward_features(x)
    torch.save(src.state_dict(), tmp_path / "vit.pth")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, tmp_path / "vit.safetensors")
    for name in ("vit.pth", "vit.safetensors"):
        enc, meta = load_any_encoder(tmp_path / name)
        assert meta["format"] == "timm" and meta["which"] is None  # head.* dropped: features, not classes
        torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)


def test_hugging_face_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.IJepaConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=512, image_size=S, patch_size=P)
    torch.manual_seed(3)
    src = _trained_like(transformers.IJepaModel(config, add_pooling_layer=True))
    src.save_pretrained(tmp_path / "ijepa_micro")
    x = _images()
    with torch.no_grad():
        want = src(pixel_values=x).last_hidden_state
    enc, meta = load_any_encoder(tmp_path / "ijepa_micro")
    assert meta["format"] == "hf" and meta["model"]["name"] == "vit_micro"
    torch.testing.assert_close(enc(x), want, rtol=1e-5, atol=1e-5)
    assert enc.norm.eps == config.layer_norm_eps  # HF's 1e-12, not timm's 1e-6


def test_pipeline_folder_is_one_of_the_formats(tmp_path):
    torch.manual_seed(4)
    src = _trained_like(build_encoder(MICRO, S))
    out = save_encoder(src, MICRO, S, tmp_path / "encoder", extra={"mlflow_run_id": "abc"})
    enc, meta = load_any_encoder(out)
    assert meta["format"] == "pipeline" and meta["mlflow_run_id"] == "abc"
    torch.testing.assert_close(enc(_images()), src(_images()), rtol=0, atol=0)


def test_loaded_tensors_are_the_files_not_a_second_copy(tmp_path):
    """Built on the meta device and assigned: the encoder's tensors are the memory-mapped checkpoint's."""
    path, _ = _official(tmp_path)
    enc, _ = load_any_encoder(path)
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["target_encoder"]
    assert not any(t.is_meta for t in enc.state_dict().values())
    # Same file, mapped twice: equal bytes; and the encoder holds no init of its own (meta construction).
    torch.testing.assert_close(enc.state_dict()["blocks.0.attn.qkv.weight"],
                               mapped["module.blocks.0.attn.qkv.weight"], rtol=0, atol=0)


def _one_line(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, msg


def test_bad_files_fail_in_one_line(tmp_path):
    path, _ = _official(tmp_path, which_present=("encoder", "predictor"))
    with pytest.raises(PipelineError) as e:
        load_any_encoder(path, "target_encoder")  # a which that the file lacks
    _one_line(e, "target_encoder", "['encoder', 'predictor']")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(path, "predictor")
    _one_line(e, "evaluate.which", "predictor")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "notes.txt")  # no known format
    _one_line(e, "'.txt'")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "empty")
    _one_line(e, "no known encoder format")
    good = path.read_bytes()
    (tmp_path / "cut.pth.tar").write_bytes(good[: len(good) // 2])  # corrupt: truncated
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "cut.pth.tar")
    _one_line(e, "corrupt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "junk.safetensors")
    _one_line(e, "corrupt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "other.pt")
    _one_line(e, "neither an official I-JEPA checkpoint")


def test_architecture_mismatches_name_key_and_shapes(tmp_path):
    enc = build_encoder(MICRO, S)
    sd = {k: v.clone() for k, v in enc.state_dict().items()}
    sd["blocks.3.mlp.fc1.weight"] = torch.zeros(256, 128)  # one block's MLP narrower than the others'
    torch.save({"target_encoder": sd}, tmp_path / "odd.pth.tar")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "odd.pth.tar")
    _one_line(e, "blocks.3.mlp.fc1.weight", "(256, 128)", "(512, 128)")
    with pytest.raises(PipelineError) as e:
        Architecture(embed_dim=96, depth=6, mlp_dim=384, patch_size=8, image_size=32).preset("x.pth")
    _one_line(e, "96 wide", "matches no preset", "vit_micro 128x6")
    cls = {**enc.state_dict(), "cls_token": torch.zeros(1, 1, 128)}
    torch.save(cls, tmp_path / "cls.pth")
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "cls.pth")
    _one_line(e, "class token")


def test_hf_config_that_disagrees_with_the_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.IJepaConfig(hidden_size=128, num_hidden_layers=6, num_attention_heads=4,
                                      intermediate_size=512, image_size=S, patch_size=P)
    transformers.IJepaModel(config).save_pretrained(tmp_path / "hf")
    doc = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**doc, "num_attention_heads": 8}))
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "hf")
    _one_line(e, "num_attention_heads is 8", "vit_micro", "has 4")
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**doc, "hidden_act": "relu"}))
    with pytest.raises(PipelineError) as e:
        load_any_encoder(tmp_path / "hf")
    _one_line(e, "hidden_act", "relu")
    assert detect_format(tmp_path / "hf") == "hf"
