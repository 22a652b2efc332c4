"""params.yaml -> typed config: the committed file loads, every preset builds, bad values are rejected."""

import functools
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, from_dict, load_config
from pipeline.models.presets import ENCODER_PRESETS
from pipeline.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def committed() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_committed_params_load():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.preset == "demo"
    assert cfg.model.name == "vit_micro" and cfg.data.image_size == 64
    assert cfg.mask.pred_scale == (0.15, 0.2) and cfg.mask.num_targets == 4
    assert isinstance(cfg.ray.resources_per_worker["CPU"], float)


def test_paper_preset_is_one_key_away():
    raw = committed()
    raw["preset"] = "paper"
    cfg = from_dict(raw)
    assert (cfg.model.name, cfg.model.patch_size, cfg.data.image_size) == ("vit_huge", 14, 224)
    assert (cfg.pretrain.epochs, cfg.pretrain.batch_size, cfg.model.pred_emb_dim) == (300, 2048, 384)


def test_explicit_value_beats_preset():
    cfg = from_dict({"preset": "demo", "model": {"name": "vit_small"}})
    assert cfg.model.name == "vit_small" and cfg.model.patch_size == 8


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_sets_exactly_its_keys(preset):
    cfg = from_dict({"preset": preset})
    for dotted, value in PRESETS[preset].items():
        assert functools.reduce(getattr, dotted.split("."), cfg) == value, dotted
    assert cfg == from_dict({}).replace(preset=preset, **PRESETS[preset])  # every other key: the default


@pytest.mark.parametrize("name", sorted(ENCODER_PRESETS))
@pytest.mark.parametrize("patch", [14, 16])
def test_every_encoder_preset_is_accepted(name, patch):
    cfg = from_dict({"preset": "paper", "model": {"name": name, "patch_size": patch},
                     "data": {"image_size": 224}})
    assert cfg.model.embed_dim == ENCODER_PRESETS[name][0]


BAD = [
    ({"mask": {"pred_scle": [0.1, 0.2]}}, "mask.pred_scle"),
    ({"bogus_section": {}}, "bogus_section"),
    ({"mask": {"pred_scale": [0.0, 0.2]}}, "mask.pred_scale"),
    ({"mask": {"pred_scale": [0.15, 1.2]}}, "mask.pred_scale"),
    ({"mask": {"enc_scale": [0.9, 0.8]}}, "mask.enc_scale"),
    ({"mask": {"strategy": "blocky"}}, "mask.strategy"),
    ({"mask": {"num_targets": "four"}}, "mask.num_targets"),
    ({"mask": {"allow_overlap": 1}}, "mask.allow_overlap"),
    ({"optim": {"lr": -0.1}}, "optim.lr"),
    ({"optim": {"loss": "l1"}}, "optim.loss"),
    ({"optim": {"reg": "foo"}}, "optim.reg"),
    ({"optim": {"reg_weight": -0.5}}, "optim.reg_weight"),
    ({"tune": {"reg": []}}, "tune.reg"),
    ({"tune": {"reg": ["none", "barlow"]}}, "tune.reg"),
    ({"model": {"name": "vit_enormous"}}, "model.name"),
    ({"model": {"patch_size": 15}}, "model.patch_size"),
    ({"ray": {"num_workers": 0}}, "ray.num_workers"),
    ({"ray": {"storage_path": "ftp://host/ray_results"}}, "ray.storage_path"),
    ({"ray": {"storage_path": "s3://"}}, "ray.storage_path"),
    ({"data": {"synthetic": {"processes": 0}}}, "data.synthetic.processes"),
    ({"data": {"image_size": 70}}, "data.image_size"),
    ({"eval_depth": {"num_bins": 1}}, "eval_depth.num_bins"),
    ({"tune": {"pred_scale": []}}, "tune.pred_scale"),
    ({"tune": {"pred_scale": [[0.3, 0.2]]}}, "tune.pred_scale[0]"),
    ({"preset": "huge"}, "preset"),
    ({"preset": ["demo"]}, "preset"),
    ({"preset": {"demo": True}}, "preset"),
]


@pytest.mark.parametrize("override,key", BAD, ids=[k for _, k in BAD])
def test_bad_values_are_rejected_naming_key_and_value(override, key):
    raw = committed()
    for section, value in override.items():
        merge = isinstance(value, dict) and isinstance(raw.get(section), dict)  # not for `preset: {demo: true}`
        raw[section] = {**raw[section], **value} if merge else value
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    msg = str(err.value)
    assert err.value.key == key, msg
    assert "\n" not in msg and key in msg and "expected" in msg


def test_moving_out_dir_alone_is_refused_and_moving_both_or_an_external_encoder_is_not():
    raw = committed()
    raw["pretrain"] = {**raw["pretrain"], "out_dir": "out/models"}
    with pytest.raises(ConfigError) as err:  # evaluate.encoder still models/encoder: a stale folder's
        from_dict(raw)
    assert err.value.key == "evaluate.encoder" and "out/models/encoder" in str(err.value)
    for encoder in ("out/models/encoder", "checkpoints/ijepa.pth.tar"):
        assert from_dict({**raw, "evaluate": {**raw["evaluate"], "encoder": encoder}}).evaluate.encoder == encoder


def test_replace_validates():
    cfg = load_config(ROOT / "params.yaml")
    assert cfg.replace(**{"mask.num_targets": 2}).mask.num_targets == 2
    with pytest.raises(ConfigError):
        cfg.replace(**{"mask.num_targets": 0})


def test_hash_is_stable_and_sensitive():
    a = load_config(ROOT / "params.yaml")
    assert a.hash() == load_config(ROOT / "params.yaml").hash()
    assert a.hash() != a.replace(**{"optim.lr": 0.002}).hash()
    assert a.hash("data") == a.replace(**{"optim.lr": 0.002}).hash("data")


def test_stage_exits_nonzero_with_one_line_on_bad_key(tmp_path):
    raw = committed()
    raw["mask"]["pred_scle"] = [0.1, 0.2]
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(raw))
    code = "from pipeline.cli import run_stage; run_stage(lambda cfg: print('WORKED'), 'x')"
    proc = subprocess.run([sys.executable, "-c", code, "--params", str(bad)], capture_output=True, text=True,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert "WORKED" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "mask.pred_scle" in lines[0]


def test_regularizer_is_off_in_the_paper_and_on_within_images_in_the_demo():
    paper = from_dict({"preset": "paper"})
    assert (paper.optim.reg, paper.optim.reg_on, paper.tune.reg) == ("none", "pooled", ("none",))
    assert from_dict({}).optim == paper.optim  # the paper preset is the dataclass defaults
    demo = load_config(ROOT / "params.yaml")
    assert (demo.optim.reg, demo.optim.reg_weight, demo.optim.reg_on, demo.tune.reg) == \
        ("vicreg", 3.0, "patches", ("vicreg",))
    on = from_dict({"optim": {"reg": "sigreg", "reg_weight": 0.05}, "tune": {"reg": ["none", "vicreg", "sigreg"]}})
    assert (on.optim.reg, on.optim.reg_weight, on.tune.reg) == ("sigreg", 0.05, ("none", "vicreg", "sigreg"))


@pytest.mark.parametrize("override,message", [
    ({"optim": {"reg": "foo"}},
     "params: optim.reg = 'foo' is not allowed; expected one of ['none', 'vicreg', 'sigreg']"),
    ({"optim": {"reg_weight": -1}}, "params: optim.reg_weight = -1.0 is not allowed; expected a number >= 0"),
    ({"tune": {"reg": ["none", "foo"]}},
     "params: tune.reg = 'foo' is not allowed; expected each one of ['none', 'vicreg', 'sigreg']"),
    ({"optim": {"reg": "vicreg"}, "pretrain": {"batch_size": 2}},  # 2 workers: 1 image each, no variance
     "params: optim.reg = 'vicreg' is not allowed; expected 'none' with 1 image(s) per worker "
     "(pretrain.batch_size / ray.num_workers); a regulariser needs at least 2"),
])
def test_regularizer_messages(override, message):
    with pytest.raises(ConfigError) as err:
        from_dict({"preset": "demo", **override})
    assert str(err.value) == message


def test_storage_path_is_a_folder_or_an_object_store_uri():
    for ok in ("ray_results", "/shared/ray_results", "s3://bucket/ijepa/ray_results", "gs://bucket/x"):
        assert from_dict({"ray": {"storage_path": ok}}).ray.storage_path == ok
    with pytest.raises(ConfigError) as err:
        from_dict({"ray": {"storage_path": "ftp://host/x"}})
    assert str(err.value) == ("params: ray.storage_path = 'ftp://host/x' is not allowed; expected a local folder "
                              "or an object-store URI s3://bucket/prefix or gs://bucket/prefix")


def test_params_stage_rejects_bad_reg_in_one_line_and_writes_nothing(tmp_path):
    raw = committed()
    raw["optim"]["reg"] = "foo"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.resolve_params"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: params: optim.reg = 'foo' is not allowed; "
                                   "expected one of ['none', 'vicreg', 'sigreg']")
    assert not (tmp_path / "reports").exists()
