"""k-NN classification on cached pooled features (DINO's protocol): no training, a second opinion.

Each test item votes with its k most cosine-similar train items, each neighbour weighing exp(sim / T)
for its class (DINO: k = 20, T = 0.07); the class with the most weight is the prediction, the 5 heaviest
give top-5. Features are L2-normalised, not centred or standardised (as in DINO).

Memory stays bounded at any scale: similarities are computed for a block of test items against a block
of train items at a time (TEST_BLOCK x TRAIN_BLOCK floats), keeping a running top-k per test item, so
real ImageNet (1.28M x 1280 train features) needs 256 MB of similarities, never 50k x 1.28M.
On a GPU the blocks go there; the features stay where they are (the CPU, as the cache gives them).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from evals import common
from evals.features import VIEWS
from evals.paired import HITS
from evals.probe import topk_accuracy
from pipeline.config import ClassifierProbeConfig
from pipeline.errors import PipelineError

NAME = "knn"  # the section under each encoder in the metrics files: {"knn": {"last": {...}, "last4": {...}}}
TEST_BLOCK = 1024
TRAIN_BLOCK = 65536


def knn_votes(x_train: Tensor, y_train: Tensor, x_test: Tensor, num_classes: int, k: int, temperature: float,
              test_block: int = TEST_BLOCK, train_block: int = TRAIN_BLOCK) -> Tensor:
    """x_train (n, D), y_train (n,) in [0, C), x_test (m, D) -> votes (m, C) float32 on the CPU: for each
    test item, the sum of exp(cos / temperature) over its k nearest train items (by cosine), per class."""
    if len(x_train) == 0 or len(x_test) == 0:
        raise PipelineError(f"k-NN: needs train and test items; got {len(x_train)} and {len(x_test)}")
    dev = common.device()
    k = min(k, len(x_train))
    labels = y_train.long().to(dev)
    out = []
    for t0 in range(0, len(x_test), test_block):
        q = F.normalize(x_test[t0:t0 + test_block].to(dev).float(), dim=1)  # (b, D)
        sims = torch.empty(len(q), 0, device=dev)
        idx = torch.empty(len(q), 0, dtype=torch.long, device=dev)
        for s0 in range(0, len(x_train), train_block):  # normalised block by block: no copy of the train set
            s = q @ F.normalize(x_train[s0:s0 + train_block].to(dev).float(), dim=1).T  # (b, t)
            top = s.topk(min(k, s.shape[1]), dim=1)
            sims, pick = torch.cat([sims, top.values], 1).topk(min(k, sims.shape[1] + top.values.shape[1]), dim=1)
            idx = torch.cat([idx, top.indices + s0], 1).gather(1, pick)
        weights = (sims / temperature).exp()  # (b, k), most similar first
        votes = torch.zeros(len(q), num_classes, device=dev).scatter_add_(1, labels[idx], weights)
        out.append(votes.cpu())
    return torch.cat(out)


def knn_classify(x_train: Tensor, y_train: Tensor, x_test: Tensor, y_test: Tensor, num_classes: int,
                 k: int = 20, temperature: float = 0.07, hits: bool = False, **blocks: int) -> dict[str, Any]:
    """Features (n, D) / (m, D), labels (n,) / (m,) -> {"top1", "top5"} in % on test; with `hits`, also
    "hits": (m,) bool, each test item's top-1 hit (for `evals.paired`). `blocks`: test_block, train_block."""
    y_train, y_test = y_train.long(), y_test.long()
    if int(y_train.max()) >= num_classes or int(y_test.max()) >= num_classes or int(y_train.min()) < 0:
        raise PipelineError(f"k-NN: labels outside 0..{num_classes - 1}")
    votes = knn_votes(x_train, y_train, x_test, num_classes, k, temperature, **blocks)
    out: dict[str, Any] = {"top1": topk_accuracy(votes, y_test, 1), "top5": topk_accuracy(votes, y_test, 5)}
    if hits:
        out[HITS] = votes.topk(1, dim=-1).indices[:, 0] == y_test  # what top1 counts
    return out


def knn_probe(ftr: dict[str, Tensor], fva: dict[str, Tensor], num_classes: int, cfg: ClassifierProbeConfig,
              hits: bool = False) -> dict[str, dict[str, Any]]:
    """Pooled features of train and test ({"last": (n, D), "last4": (n, 4D), "y"}, from `evals.features`) ->
    {"last": {"top1", "top5"}, "last4": {...}} at cfg.knn_k neighbours and cfg.knn_temperature."""
    return {v: knn_classify(ftr[v], ftr["y"], fva[v], fva["y"], num_classes, cfg.knn_k, cfg.knn_temperature,
                            hits=hits) for v in VIEWS}
