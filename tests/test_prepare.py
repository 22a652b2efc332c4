"""prepare: synthetic scenes -> real formats -> the real loaders; determinism, atomicity, real-data mode."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipeline.config import load_config
from pipeline.data import dataset_paths
from pipeline.data.clevr import ClevrDataset, distance_label
from pipeline.data.export import export_synthetic, wnid
from pipeline.data.imagenet import ImageNetFolder
from pipeline.data.manifest import validate_real
from pipeline.data.nyu import NyuDepth
from pipeline.data.scenes import SHAPES, render_scene
from pipeline.errors import PipelineError

ROOT = Path(__file__).resolve().parents[1]
TINY = {"data.image_size": 32, "data.synthetic.train_scenes": 24, "data.synthetic.val_scenes": 16,
        "data.synthetic.processes": 1, "data.synthetic.subset_fraction": 0.3}


def _cfg(root: Path, **extra):
    return load_config(ROOT / "params.yaml").replace(**{**TINY, "data.root": str(root), **extra})


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn") / "data"
    cfg = _cfg(root)
    return root, cfg, export_synthetic(cfg.data, root, progress=False)


def test_round_trip_through_real_loaders(exported):
    root, cfg, manifest = exported
    paths = dataset_paths(cfg.data)
    scenes = [render_scene(0, i, 32) for i in range(40)]
    train = ImageNetFolder(paths.imagenet, "train")
    assert train.classes == [wnid(c) for c in range(8)] and len(train) == 24
    for k, (path, label) in enumerate(train.samples):  # sorted wnids keep the renderer's label order
        index = int(path.stem.split("_")[1])
        assert label == scenes[index].label and manifest["classes"][path.parent.name] == SHAPES[label]
        # JPEG q95 with 4:2:0 chroma at 32 px: up to 6.3 grey levels on these scenes; any other scene is >= 20 away
        assert np.abs(np.asarray(train[k][0], float) - scenes[index].image).mean() < 7
    val = ImageNetFolder(paths.imagenet, "val")
    assert len(val) == 16 and sorted(val.targets) == sorted(s.label for s in scenes[24:])
    subset = ImageNetFolder(paths.imagenet, "train", subset_file=paths.imagenet_subset)
    assert sorted(subset.targets) == list(range(8))  # 30% of 3 per class rounds to 1
    count = ClevrDataset(paths.clevr, "val", "count_all")
    assert count.targets == [s.count - 3 for s in scenes[24:]]
    np.testing.assert_array_equal(np.asarray(count[5][0]), scenes[29].image)  # PNG is lossless
    dist = ClevrDataset(paths.clevr, "train", "closest_object_distance")
    assert dist.thresholds == tuple(manifest["distance_thresholds"])
    assert dist.targets == [distance_label(s.closest, dist.thresholds) for s in scenes[:24]]
    assert np.bincount(dist.targets, minlength=6).tolist() == [4] * 6  # sextile edges: balanced
    nyu_train, nyu_test = NyuDepth(paths.nyu, "train"), NyuDepth(paths.nyu, "test")
    assert len(nyu_train) == 24 and len(nyu_test) == 16
    for ds, i, index in ((nyu_train, 3, 3), (nyu_test, 0, 24)):
        img, depth = ds.raw(i)
        np.testing.assert_array_equal(img, scenes[index].image)
        np.testing.assert_array_equal(depth, scenes[index].depth)
    assert (root / "nyu" / "nyu_depth_v2_labeled.mat").read_bytes()[:10] == b"MATLAB 7.3"


def test_manifest_counts(exported):
    root, _, manifest = exported
    assert json.loads((root / "manifest.json").read_text()) == manifest
    im = manifest["imagenet"]
    assert im["train"]["count"] == 24 and im["val"]["count"] == 16 and im["num_corrupt"] == 0
    assert set(im["train"]["per_class"].values()) == {3} and im["subset"]["count"] == 8
    assert im["image_size"]["width"] == {"min": 32, "median": 32.0, "max": 32}
    assert manifest["clevr"]["train"]["count"] == 24 and sum(manifest["clevr"]["val"]["count_all"]) == 16
    assert manifest["nyu"]["num_images"] == 40 and manifest["nyu"]["train"] == 24
    assert not list(root.glob(".prepare-*"))


def test_deterministic_and_atomic(exported, tmp_path, monkeypatch):
    root, cfg, manifest = exported
    again = tmp_path / "data"
    (again).mkdir()
    (again / "notes.txt").write_text("mine")  # a user's file next to the generated folders survives
    export_synthetic(_cfg(again).data, again, progress=False)
    assert (again / "notes.txt").read_text() == "mine"
    before = _digests(again)
    assert {k: v for k, v in before.items() if k != "notes.txt"} == _digests(root)  # byte-identical

    from pipeline.data import export

    def boom(*a, **k):
        raise RuntimeError("killed")

    monkeypatch.setattr(export, "render_scene", boom)
    with pytest.raises(RuntimeError):
        export_synthetic(_cfg(again, **{"data.synthetic.seed": 1}).data, again, progress=False)
    assert _digests(again) == before and not list(again.glob(".prepare-*"))  # old output untouched


def test_dataset_paths(tmp_path):
    cfg = _cfg("data")
    p = dataset_paths(cfg.data, root=tmp_path)
    assert p.imagenet == tmp_path / "data" / "imagenet" and p.nyu == tmp_path / "data" / "nyu"
    assert p.clevr == tmp_path / "data" / "clevr" / "CLEVR_v1.0"
    real = cfg.replace(**{"data.source": "real", "data.imagenet_root": "/x/imagenet"})
    p = dataset_paths(real.data, root=tmp_path)
    assert p.imagenet == Path("/x/imagenet") and p.imagenet_subset == Path("/x/imagenet/1percent.txt")
    with pytest.raises(PipelineError, match="data.clevr_root is null"):
        p.clevr  # noqa: B018


def test_prepare_stage_real_mode(exported, tmp_path, capsys, monkeypatch):
    """Real mode on a copy of the export: manifest, corrupt skip/fail, bad paths; stage exits 2 on error."""
    from pipeline.cli import run_stage

    monkeypatch.syspath_prepend(str(ROOT))
    from stages.prepare import main

    src, _, _ = exported
    real = tmp_path / "real"
    shutil.copytree(src, real)
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())

    def write(**data):
        raw["data"].update({"source": "real", "root": str(tmp_path / "out"), "image_size": 32,
                            "imagenet_root": str(real / "imagenet"), "clevr_root": str(real / "clevr/CLEVR_v1.0"),
                            "nyu_root": str(real / "nyu"), **data})
        params.write_text(yaml.safe_dump(raw))

    write()
    run_stage(main, "prepare", ["--params", str(params)])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["source"] == "real" and m["imagenet"]["train"]["count"] == 24 and m["nyu"]["test"] == 16
    victim = sorted((real / "imagenet" / "val").rglob("*.JPEG"))[0]
    victim.write_bytes(victim.read_bytes()[:200])
    run_stage(main, "prepare", ["--params", str(params)])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["num_corrupt"] == 1 and m["imagenet"]["val"]["count"] == 15
    write(on_corrupt="fail")
    with pytest.raises(SystemExit) as e:
        run_stage(main, "prepare", ["--params", str(params)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and victim.name in err and "corrupt" in err
    write(on_corrupt="skip", clevr_root=None, nyu_root=None)
    run_stage(main, "prepare", ["--params", str(params)])
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["clevr"] is None and m["nyu"] is None
    inside = load_config(params).replace(**{"data.root": str(real)})
    with pytest.raises(PipelineError, match="lies inside data.root"):
        validate_real(inside.data)


def test_prepare_stage_synthetic_cli(tiny_cfg, tmp_path, exported):
    """`python -m stages.prepare --params ...`: 24 + 16 scenes at 32 px in 2 processes, root relative."""
    params = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["data"].update({"root": "data", "image_size": 32})
    raw["data"]["synthetic"].update({"train_scenes": 24, "val_scenes": 16, "processes": 2,
                                  "subset_fraction": 0.3})
    params.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.prepare", "--params", str(params)], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert proc.returncode == 0, proc.stderr
    assert "prepare ok (synthetic)" in proc.stdout and proc.stderr == ""  # no progress bar in a pipe
    m = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert m["imagenet"]["train"]["count"] == 24 and m["clevr"]["val"]["count"] == 16
    assert m["image_size"] == 32 and m["num_corrupt"] == 0
    paths = dataset_paths(tiny_cfg.data, root=tmp_path)  # tiny_cfg.data.root is tmp_path / "data"
    assert ImageNetFolder(paths.imagenet, "val").targets.count(0) == 2
    assert m["files_sha256"] == exported[2]["files_sha256"]  # 2 processes write what 1 process wrote
