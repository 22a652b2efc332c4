"""The pretraining's data: which images it reads, and for every global step this rank's batch and masks.

Data order, a function of (seed, epoch, step) only. Each epoch is a seeded permutation of the dataset,
cut into global batches of `pretrain.batch_size` (the tail that does not fill one is dropped); rank r
takes the r-th slice of `batch_size / world` images of every global batch. So the images of a global
step do not depend on the number of workers, and resuming at step k mid-epoch is exact: the loader
starts at batch k of the same permutation. (DistributedSampler would shard by striding instead and
cannot start mid-epoch.)

Masks: sampled per GLOBAL step, `MaskSampler.sample(batch_size, step)` for the whole global batch, and
each rank keeps its slice; this runs in the DataLoader's collate function, `StepCollate` (in its worker
processes when `data.num_workers > 0`), which learns the step from the batch sampler, `StepBatches`. The
masks are therefore the same whatever the number of Ray workers or DataLoader workers.

    StepLoader(dataset, sampler, batch_size, seed, rank, world)(first, last)
        a DataLoader of (images (b, 3, S, S), masks_enc (b, Kc), masks_pred (b, M, Kt), step), b = batch / world
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.config import Config
from pipeline.errors import PipelineError
from pipeline.masks import MaskSampler


def pretrain_dataset(cfg: Config, root: str | Path) -> Dataset:
    """The pretraining images: ImageNet-format train split (the synthetic export by default), labels ignored."""
    from pipeline.data import ImageNetFolder, dataset_paths, train_transform  # lazy: torchvision, file lists

    return ImageNetFolder(dataset_paths(cfg.data, Path(root)).imagenet, "train",
                          train_transform(cfg.data.image_size), on_corrupt=cfg.data.on_corrupt)


def heldout_images(cfg: Config, root: str | Path) -> Tensor | None:
    """The diagnostics batch: `pretrain.diag_images` val images (n, 3, S, S), a fixed seeded choice, eval
    transform; None when diagnostics are off or the data has no val split."""
    from pipeline.data import ImageNetFolder, dataset_paths, eval_transform  # lazy: torchvision, file lists

    n = cfg.pretrain.diag_images
    if n == 0:
        return None
    try:
        val = ImageNetFolder(dataset_paths(cfg.data, Path(root)).imagenet, "val", eval_transform(cfg.data.image_size),
                             on_corrupt=cfg.data.on_corrupt)
    except PipelineError:
        return None
    return fixed_batch(val, n, cfg.pretrain.seed)


def fixed_batch(dataset: Dataset, n: int, seed: int) -> Tensor:
    """min(n, len) images (k, 3, S, S) of `dataset` (items: image or (image, label)), a seeded choice."""
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed + 7919))  # type: ignore[arg-type]
    items = [dataset[int(i)] for i in order[:n]]
    return torch.stack([x[0] if isinstance(x, (tuple, list)) else x for x in items])


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    if num_images < batch_size:
        raise PipelineError(f"pretrain.batch_size = {batch_size} is larger than the {num_images} training "
                            "images; lower it or add images")
    return num_images // batch_size


def epoch_order(num_images: int, seed: int, epoch: int) -> Tensor:
    """The permutation of epoch `epoch`: (num_images,) int64, the same on every rank."""
    return torch.randperm(num_images, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class StepBatches(Sampler):
    """The batch sampler: yields, for global steps [first, last) of one epoch, this rank's
    [(step, index), ...] slice."""

    def __init__(self, order: Tensor, epoch_start_step: int, first: int, last: int, global_batch: int,
                 rank: int, world: int):
        self.order, self.start, self.first, self.last = order, epoch_start_step, first, last
        self.G, self.b, self.rank = global_batch, global_batch // world, rank

    def __len__(self) -> int:
        return self.last - self.first

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.first, self.last):
            lo = (step - self.start) * self.G + self.rank * self.b
            yield [(step, int(i)) for i in self.order[lo:lo + self.b]]


class StepItems(Dataset):
    """Indexed by (step, i): returns (image, step). Dataset items may be (image, label): label dropped."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, int]:
        step, i = key
        item = self.dataset[i]
        return (item[0] if isinstance(item, (tuple, list)) else item), step


class StepCollate:
    """The collate function: (image, step) items -> images (b, 3, S, S), masks_enc (b, Kc),
    masks_pred (b, M, Kt), step.

    The masks are this rank's rows of the global step's masks, `sampler.sample(global_batch, step)`.
    """

    def __init__(self, sampler: MaskSampler, global_batch: int, rank: int, world: int):
        self.sampler, self.G, self.b, self.rank = sampler, global_batch, global_batch // world, rank

    def __call__(self, items: list[tuple[Tensor, int]]) -> tuple[Tensor, Tensor, Tensor, int]:
        step = items[0][1]
        masks_enc, masks_pred = self.sampler.sample(self.G, step)
        rows = slice(self.rank * self.b, (self.rank + 1) * self.b)
        return torch.stack([x for x, _ in items]), masks_enc[rows], masks_pred[rows], step


class StepLoader:
    """This rank's batches of `dataset` with their masks, for any run of global steps within one epoch."""

    def __init__(self, dataset: Dataset, sampler: MaskSampler, global_batch: int, seed: int, rank: int,
                 world: int, num_workers: int = 0, pin_memory: bool = False):
        self.items = StepItems(dataset)
        self.collate = StepCollate(sampler, global_batch, rank, world)
        self.steps_per_epoch = steps_per_epoch(len(self.items), global_batch)
        self.G, self.seed, self.rank, self.world = global_batch, seed, rank, world
        self.num_workers, self.pin_memory = num_workers, pin_memory

    def __call__(self, first: int, last: int) -> DataLoader:
        """Global steps [first, last), `last` at most the end of the epoch that holds `first`: a DataLoader of
        (images (b, 3, S, S), masks_enc (b, Kc), masks_pred (b, M, Kt), step), b = global_batch / world."""
        epoch_start = first - first % self.steps_per_epoch
        order = epoch_order(len(self.items), self.seed, first // self.steps_per_epoch)
        batches = StepBatches(order, epoch_start, first, last, self.G, self.rank, self.world)
        return DataLoader(self.items, batch_sampler=batches, collate_fn=self.collate, num_workers=self.num_workers,
                          pin_memory=self.pin_memory)
