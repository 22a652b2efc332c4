"""Frozen feature extraction: views, token shapes, on-disk cache (hits, keys, atomic writes)."""

import torch
from torch.utils.data import Dataset, TensorDataset

from evals.common import limit
from evals.features import cached, dataset_identity, extract, weights_hash
from evals.semi import evaluate_semi
from pipeline.config import ClassifierProbeConfig
from pipeline.models.encoder import Encoder


class Counting(torch.nn.Module):
    """Wraps an encoder and counts the batches it encodes."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.calls = encoder, 0
        self.grid_size = encoder.grid_size

    def forward(self, x):
        self.calls += 1
        return self.encoder(x)

    def forward_layers(self, x, n):
        self.calls += 1
        return self.encoder.forward_layers(x, n)


def tiny_encoder(seed: int = 0):
    torch.manual_seed(seed)
    return Encoder(img_size=16, patch_size=8, embed_dim=32, depth=4, num_heads=2).eval()  # 4 patches


def images(n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.arange(n) % 3)


def test_pooled_views_match_the_encoder():
    enc, ds = tiny_encoder(), images()
    f = extract(enc, ds, "pooled", batch_size=4)
    assert f["last"].shape == (10, 32) and f["last4"].shape == (10, 4 * 32)
    with torch.no_grad():
        ref = enc(ds.tensors[0]).mean(1)
    torch.testing.assert_close(f["last"], ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(f["last4"][:, -32:], f["last"])  # the last of the 4 layers is "last"
    assert torch.equal(f["y"], torch.arange(10) % 3)


def test_tokens_are_float16_patch_tokens():
    enc, ds = tiny_encoder(), images(5)
    f = extract(enc, ds, "tokens", batch_size=2)
    assert f["tokens"].shape == (5, 4, 32) and f["tokens"].dtype == torch.float16


def test_second_extraction_is_a_cache_hit(tmp_path):
    enc, ds = Counting(tiny_encoder()), images()
    first = extract(enc, ds, "pooled", batch_size=4, cache_dir=tmp_path)
    assert enc.calls == 3
    again = extract(enc, ds, "pooled", batch_size=4, cache_dir=tmp_path)
    assert enc.calls == 3  # served from disk
    assert torch.equal(first["last4"], again["last4"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left over
    extract(enc, ds, "tokens", batch_size=4, cache_dir=tmp_path)
    assert enc.calls == 6  # another kind is another entry


def test_cache_key_follows_weights_and_data(tmp_path):
    a, b = Counting(tiny_encoder(0)), Counting(tiny_encoder(1))
    assert weights_hash(a.encoder) != weights_hash(b.encoder)
    extract(a, images(), batch_size=4, cache_dir=tmp_path)
    extract(b, images(), batch_size=4, cache_dir=tmp_path)
    assert b.calls == 3  # other weights: a miss
    extract(a, images(seed=7), batch_size=4, cache_dir=tmp_path)
    assert a.calls == 6  # other images: a miss


class Files(Dataset):
    """A folder dataset like ImageNetFolder: .samples [(path, label)] and .targets."""

    def __init__(self, paths, labels):
        self.samples = list(zip(paths, labels, strict=True))
        self.targets = list(labels)
        self.transform = None

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        g = torch.Generator().manual_seed(int(path.read_text()))
        return torch.randn(3, 16, 16, generator=g), label


def test_labels_are_not_part_of_the_key(tmp_path):
    """Two tasks over the same files (CLEVR count / distance) share features but keep their labels."""
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_text(str(i))
    enc = Counting(tiny_encoder())
    count = extract(enc, Files(paths, [0, 1, 2, 3]), cache_dir=tmp_path / "cache")
    dist = extract(enc, Files(paths, [5, 4, 3, 2]), cache_dir=tmp_path / "cache")
    assert enc.calls == 1
    assert count["y"].tolist() == [0, 1, 2, 3] and dist["y"].tolist() == [5, 4, 3, 2]
    before = dataset_identity(Files(paths, [0] * 4))
    paths[0].write_text("12345")  # a re-exported file changes size / mtime: a new key
    assert dataset_identity(Files(paths, [0] * 4)) != before


def test_cached_never_runs_the_encoder(tmp_path):
    enc, ds = Counting(tiny_encoder()), images()
    assert cached(enc, ds, cache_dir=tmp_path) is None and enc.calls == 0
    f = extract(enc, ds, batch_size=4, cache_dir=tmp_path)
    assert torch.equal(cached(enc, ds, cache_dir=tmp_path)["last"], f["last"]) and enc.calls == 3


def test_semi_encodes_only_the_subset_unless_train_is_cached(tmp_path):
    enc, train, val = Counting(tiny_encoder()), images(12), images(6, seed=1)
    cfg = ClassifierProbeConfig(epochs=2, lrs=(0.1,), weight_decays=(0.0,))  # k-NN on, attentive off: no tokens
    evaluate_semi(enc, train, val, [0, 1, 2, 3, 4, 5], cfg, cache_dir=tmp_path / "a")
    assert enc.calls == 2  # 6 subset images + 6 val images, one batch each (batch_size 256)
    enc.calls = 0
    extract(enc, train, cache_dir=tmp_path / "b")
    evaluate_semi(enc, train, val, [0, 1, 2, 3, 4, 5], cfg, cache_dir=tmp_path / "b")
    assert enc.calls == 2  # the full train pass + val; the subset rows came from the cache


def test_limit_is_a_seeded_ordered_subset():
    ds = images(20)
    a, b = limit(ds, 8, seed=0), limit(ds, 8, seed=0)
    assert list(a.indices) == list(b.indices) == sorted(a.indices) and len(a) == 8
    assert limit(ds, None, 0) is ds and limit(ds, 50, 0) is ds
