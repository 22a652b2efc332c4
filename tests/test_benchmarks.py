"""benchmarks/readouts.py: its readouts pool over the patches (dim 1), per image, per channel; without a saved
encoder it stops in one line. benchmarks/scenes.py's layout flags: a bad range stops in one line, and
demo_quality's scene cache is kept apart per layout."""

import importlib.util
from pathlib import Path

import pytest
import torch


def _load(name: str):
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readouts_pool_over_the_patches_of_each_image():
    bench = _load("readouts")
    # two images, three patches, two channels; image 1 is image 0 shifted by 10 in channel 0
    t = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [6.0, 3.0]],
                      [[11.0, 0.0], [12.0, 0.0], [16.0, 3.0]]]).half()
    assert torch.equal(bench.readout(t, "mean"), torch.tensor([[3.0, 1.0], [13.0, 1.0]]))
    std = bench.readout(t, "std")  # population std: a shift moves the mean, not the spread
    assert torch.allclose(std, torch.tensor([[(14 / 3) ** 0.5, 2**0.5]] * 2))
    assert torch.equal(bench.readout(t, "max"), torch.tensor([[6.0, 3.0], [16.0, 3.0]]))
    both = bench.readout(t, "mean_std")
    assert both.shape == (2, 4) and torch.equal(both[:, :2], bench.readout(t, "mean"))
    assert bench.readout(t, "std").dtype == torch.float32
    with pytest.raises(ValueError, match="expected one of"):
        bench.readout(t, "median")


def test_readouts_without_a_saved_encoder_stop_in_one_line_with_exit_2(monkeypatch, tmp_path, capsys):
    bench = _load("readouts")
    missing = tmp_path / "models" / "encoder"
    monkeypatch.setattr(bench.common, "encoder_source", lambda cfg, root: missing)
    with pytest.raises(SystemExit) as stop:
        bench.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "make repro" in err[0]


def test_scenes_benchmark_refuses_a_bad_layout_in_one_line(capsys):
    bench = _load("scenes")
    import argparse

    ap = argparse.ArgumentParser()
    bench.add_layout_args(ap)
    assert bench.layout_from_args(ap.parse_args([])) == bench.ROOM
    args = ap.parse_args(["--objects", "5", "2"])
    with pytest.raises(SystemExit) as stop:
        bench.layout_from_args(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Layout.count = [5, 2]" in err[0]


def test_scenes_benchmark_object_share_reads_the_object_pixels():
    bench = _load("scenes")
    from pipeline.data.scenes import Layout, render_scene

    room = [render_scene(0, i, 32) for i in range(8)]
    one_small = [render_scene(0, i, 32, layout=Layout(count=(1, 1), size=(0.3, 0.3), depth=(7.0, 7.5)))
                 for i in range(8)]
    assert 0 < bench.object_share(one_small) < bench.object_share(room) < 1


def test_demo_quality_caches_each_layout_apart():
    bench = _load("demo_quality")
    from pipeline.data.scenes import ROOM, Layout

    default = bench.cache_path("x", ".npz")
    assert bench.cache_path("x", ".npz", ROOM) == default
    assert bench.cache_path("x", ".npz", Layout(count=(1, 2))) != default
