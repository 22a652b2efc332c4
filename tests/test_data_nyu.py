"""NYU Depth v2 loader on a fabricated MATLAB v7.3 file: axis order, splits, resizing, bad input."""

import h5py
import numpy as np
import pytest
import scipy.io
import torch

from pipeline.data.nyu import NyuDepth, eigen_mask
from pipeline.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pipeline.errors import PipelineError

H, W, N = 6, 8, 5  # not square, so a missed transpose cannot pass


def _frames():
    """N asymmetric frames: a red top-left pixel; depth[r, c] = i + r + 10 c (upright = known values)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 100, (N, H, W, 3), dtype=np.uint8)
    images[:, 0, 0] = (255, 0, 0)
    r, c = np.mgrid[0:H, 0:W]
    depths = np.stack([(i + r + 10 * c).astype(np.float32) for i in range(N)])
    return images, depths


def _write_mat(path, images, depths, userblock=True):
    kw = {"userblock_size": 512} if userblock else {}
    with h5py.File(path, "w", **kw) as f:  # as MATLAB writes it: axes reversed
        f["images"] = images.transpose(0, 3, 2, 1)  # (N, H, W, 3) -> (N, 3, W, H)
        f["depths"] = depths.transpose(0, 2, 1)  # (N, H, W) -> (N, W, H)


@pytest.fixture
def nyu(tmp_path):
    root = tmp_path / "nyu"
    root.mkdir()
    images, depths = _frames()
    _write_mat(root / "nyu_depth_v2_labeled.mat", images, depths)
    scipy.io.savemat(root / "splits.mat", {"trainNdxs": np.array([[1.0], [2.0], [4.0]]),
                                           "testNdxs": np.array([[3.0], [5.0]])})
    return root


def test_raw_comes_back_upright(nyu):
    images, depths = _frames()
    train = NyuDepth(nyu, "train")
    assert len(train) == 3 and train.indices.tolist() == [0, 1, 3]  # 1-based -> 0-based
    img, d = train.raw(2)
    assert img.shape == (H, W, 3) and img.dtype == np.uint8 and d.shape == (H, W) and d.dtype == np.float32
    np.testing.assert_array_equal(img, images[3])
    np.testing.assert_array_equal(d, depths[3])
    assert tuple(img[0, 0]) == (255, 0, 0) and d[0, W - 1] == 3 + 10 * (W - 1)


def test_items_native_and_resized(nyu):
    images, depths = _frames()
    x, d = NyuDepth(nyu, "test")[1]  # file row 4
    assert x.shape == (3, H, W) and x.dtype == torch.float32 and d.shape == (H, W) and d.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x * std + mean, torch.from_numpy(images[4]).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(d, torch.from_numpy(depths[4]))
    x, d = NyuDepth(nyu, "test", image_size=4)[0]
    assert x.shape == (3, 4, 4) and d.shape == (4, 4)
    assert set(d.flatten().tolist()) <= set(depths[2].flatten().tolist())  # nearest: no blended depths
    assert (d[1:] > d[:-1]).all() and (d[:, 1:] - d[:, :-1] >= 10).all()  # upright: rows +1, cols +10


def test_picklable_for_worker_processes(nyu):
    import pickle

    ds = NyuDepth(nyu, "train")
    ds.raw(0)  # opens the handle
    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone.raw(1)[1], ds.raw(1)[1])


def test_eigen_mask():
    m = eigen_mask(480, 640)
    assert m.dtype == bool and m.sum() == (471 - 45) * (601 - 41)
    assert m[45, 41] and m[470, 600] and not m[44, 41] and not m[45, 601]
    half = eigen_mask(240, 320)
    assert half.shape == (240, 320) and half[23:235, 21:300].all() and not half[:22].any()


def test_bad_input(nyu, tmp_path):
    images, depths = _frames()
    with pytest.raises(PipelineError, match="split 'val' is not allowed"):
        NyuDepth(nyu, "val")
    scipy.io.savemat(nyu / "splits.mat", {"trainNdxs": np.array([[1.0], [6.0]]), "testNdxs": np.array([[0.0]])})
    with pytest.raises(PipelineError, match=r"splits.mat: trainNdxs holds index 6, out of range 1..5"):
        NyuDepth(nyu, "train")
    with pytest.raises(PipelineError, match=r"testNdxs holds index 0, out of range 1..5"):
        NyuDepth(nyu, "test")
    scipy.io.savemat(nyu / "splits.mat", {"trainNdxs": np.array([[1.0]])})
    with pytest.raises(PipelineError, match="splits.mat: no 'testNdxs' array"):
        NyuDepth(nyu, "test")
    mat = nyu / "nyu_depth_v2_labeled.mat"
    with h5py.File(mat, "w") as f:
        f["images"] = images.transpose(0, 3, 2, 1)
    with pytest.raises(PipelineError, match=r"labeled.mat: no 'depths' array"):
        NyuDepth(nyu, "train")
    _write_mat(mat, images, depths[:, :, :4], userblock=False)
    with pytest.raises(PipelineError, match=r"labeled.mat: depths has shape \(5, 4, 6\) float32; expected \(5, 8, 6\)"):
        NyuDepth(nyu, "train")
    _write_mat(mat, images[..., :2], depths)
    with pytest.raises(PipelineError, match=r"images has shape \(5, 2, 8, 6\) uint8; expected \(N, 3, W, H\)"):
        NyuDepth(nyu, "train")
    scipy.io.savemat(mat, {"images": images})  # a v5 .mat: scipy's, not HDF5
    with pytest.raises(PipelineError, match=r"labeled.mat: not a MATLAB v7.3 \(HDF5\) file"):
        NyuDepth(nyu, "train")
    with pytest.raises(PipelineError, match="no such NYU folder"):
        NyuDepth(tmp_path / "missing", "train")
