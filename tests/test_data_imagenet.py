"""ImageNet folder loader on fabricated real-format fixtures: labels, 1% list, odd JPEGs, bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.imagenet import CorruptImageError, ImageNetFolder, load_rgb, scan_images
from pipeline.data.manifest import describe_imagenet
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform, to_tensor, train_transform
from pipeline.errors import PipelineError

WNIDS = ("n01440764", "n01443537", "n02102040")  # deliberately written out of sorted order below


def _jpeg(path, rgb=(200, 30, 40), size=(20, 12), mode="RGB"):
    img = Image.new("RGB", size, rgb)
    img = img.convert(mode) if mode != "RGB" else img
    img.save(path, "JPEG", quality=95)


@pytest.fixture
def imagenet(tmp_path):
    """train: 3 classes x 2 images (one CMYK, one grayscale, one PNG-in-.JPEG); val: 1 per class."""
    root = tmp_path / "imagenet"
    for wnid in reversed(WNIDS):
        for split in ("train", "val"):
            (root / split / wnid).mkdir(parents=True)
        _jpeg(root / "train" / wnid / f"{wnid}_1.JPEG")
        _jpeg(root / "train" / wnid / f"{wnid}_2.JPEG")
        _jpeg(root / "val" / wnid / f"ILSVRC2012_val_0000000{WNIDS.index(wnid) + 1}.JPEG")
    _jpeg(root / "train" / WNIDS[0] / f"{WNIDS[0]}_1.JPEG", mode="CMYK")
    _jpeg(root / "train" / WNIDS[1] / f"{WNIDS[1]}_1.JPEG", mode="L")
    buf = io.BytesIO()
    Image.new("RGBA", (20, 12), (1, 2, 3, 128)).save(buf, "PNG")
    (root / "train" / WNIDS[2] / f"{WNIDS[2]}_2.JPEG").write_bytes(buf.getvalue())
    (root / "1percent.txt").write_text(f"{WNIDS[2]}_1.JPEG\n{WNIDS[0]}_2.JPEG\n\n")
    return root


def test_classes_labels_and_rgb(imagenet):
    ds = ImageNetFolder(imagenet, "train")
    assert ds.classes == sorted(WNIDS) and ds.class_to_idx == {w: i for i, w in enumerate(sorted(WNIDS))}
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 2, 2]
    for (path, label), target in zip(ds.samples, ds.targets, strict=True):
        assert path.parent.name == ds.classes[label] and label == target
    for i in range(len(ds)):
        img, label = ds[i]
        assert img.mode == "RGB" and img.size == (20, 12) and label == ds.targets[i]
    cmyk, _ = ds[0]
    assert np.abs(np.asarray(cmyk, int) - (200, 30, 40)).max() < 12  # CMYK converted, colour kept
    val = ImageNetFolder(imagenet, "val", transform=eval_transform(16))
    x, y = val[2]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 2


def test_subset_list(imagenet):
    ds = ImageNetFolder(imagenet, "train", subset_file=imagenet / "1percent.txt")
    assert [p.name for p, _ in ds.samples] == [f"{WNIDS[2]}_1.JPEG", f"{WNIDS[0]}_2.JPEG"]
    assert ds.targets == [2, 0] and len(ds.classes) == 3  # classes still from every train folder


def test_subset_naming_missing_file(imagenet):
    lst = imagenet / "bad.txt"
    lst.write_text(f"{WNIDS[0]}_1.JPEG\n{WNIDS[0]}_99.JPEG\n")
    with pytest.raises(PipelineError, match=r"bad.txt:2: names n01440764_99.JPEG, but .* does not exist"):
        ImageNetFolder(imagenet, "train", subset_file=lst)
    lst.write_text("n99999999_1.JPEG\n")
    with pytest.raises(PipelineError, match=r"bad.txt:1: .*known class"):
        ImageNetFolder(imagenet, "train", subset_file=lst)
    with pytest.raises(PipelineError, match="split 'val' cannot use it"):
        ImageNetFolder(imagenet, "val", subset_file=lst)


def test_layout_errors_name_the_folder(tmp_path, imagenet):
    with pytest.raises(PipelineError, match="no such ImageNet folder"):
        ImageNetFolder(tmp_path / "nope", "train")
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(PipelineError, match=r"empty/train: empty"):
        ImageNetFolder(tmp_path / "empty", "train")
    with pytest.raises(PipelineError, match=r"empty/val: no such folder"):
        ImageNetFolder(tmp_path / "empty", "val")
    (imagenet / "train" / "n09999999").mkdir()
    (imagenet / "train" / "n09999999" / "notes.txt").write_text("not an image")
    with pytest.raises(PipelineError, match=r"n09999999: class folder holds no images"):
        ImageNetFolder(imagenet, "train")
    with pytest.raises(PipelineError, match="split 'test' is not allowed"):
        ImageNetFolder(imagenet, "test")
    with pytest.raises(PipelineError) as e:
        ImageNetFolder(tmp_path / "nope", "train")
    assert "\n" not in str(e.value) and str(tmp_path / "nope") in str(e.value)


def _corrupt(imagenet):
    good = imagenet / "train" / WNIDS[1] / f"{WNIDS[1]}_2.JPEG"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        good, "JPEG", quality=95)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated mid-stream: header fine, decode fails
    (imagenet / "train" / WNIDS[1] / f"{WNIDS[1]}_3.JPEG").write_bytes(b"\x00garbage" * 10)
    return good


def test_corrupt_skip_counts_and_returns_next_good(imagenet):
    bad = _corrupt(imagenet)
    with pytest.raises(CorruptImageError, match=bad.name):
        load_rgb(bad)
    ds = ImageNetFolder(imagenet, "train", on_corrupt="skip")
    i = [p for p, _ in ds.samples].index(bad)
    img, label = ds[i]  # the two bad files in a row are skipped: the next good item is class 2
    assert img.mode == "RGB" and label == 2 and ds.num_corrupt == 2
    ds[i]
    assert ds.num_corrupt == 2  # counted once per file
    assert sum(1 for _ in (ds[j] for j in range(len(ds)))) == len(ds)


def test_corrupt_fail_stops_and_manifest_counts(imagenet):
    bad = _corrupt(imagenet)
    ds = ImageNetFolder(imagenet, "train", on_corrupt="fail")
    with pytest.raises(CorruptImageError, match=r"corrupt or truncated image") as e:
        ds[[p for p, _ in ds.samples].index(bad)]
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    sizes = scan_images([p for p, _ in ds.samples])
    assert sum(s is None for s in sizes) == 2 and (20, 12) in sizes
    m = describe_imagenet(imagenet, imagenet / "1percent.txt", "skip", base=imagenet)
    assert m["num_corrupt"] == 2 and m["train"]["count"] == 5 and m["val"]["count"] == 3
    assert f"train/{WNIDS[1]}/{bad.name}" in m["corrupt"]
    with pytest.raises(CorruptImageError, match=r"\(2 in all\)"):
        describe_imagenet(imagenet, imagenet / "1percent.txt", "fail")


def test_transforms_shapes_and_identity_geometry():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    img = Image.fromarray(arr)
    x = eval_transform(32)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    torch.testing.assert_close(x, to_tensor()(img))  # S x S input: exact pixels, no resampling
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x * std + mean, torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    wide = Image.fromarray(rng.integers(0, 255, (30, 50), dtype=np.uint8))  # grayscale, not square
    assert eval_transform(16)(wide).shape == (3, 16, 16)
    torch.manual_seed(0)
    views = [train_transform(16)(img) for _ in range(4)]
    assert all(v.shape == (3, 16, 16) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])  # random crops differ
