"""This rank's batches and masks per global step: the same images and masks whatever the world size,
and a loader started mid-epoch continues the epoch's order."""

import torch

from pipeline.batches import StepBatches, StepCollate, StepItems, StepLoader, epoch_order
from pipeline.config import MaskConfig
from pipeline.data.random_images import RandomImages
from pipeline.masks import MaskSampler


def test_global_batches_do_not_depend_on_world_size():
    order = epoch_order(40, seed=3, epoch=1)
    assert sorted(order.tolist()) == list(range(40))
    assert not torch.equal(order, epoch_order(40, seed=3, epoch=2))
    # Epoch starting at global step 10, steps 11..12: the two ranks' slices form the one-worker batch.
    one = list(StepBatches(order, 10, 11, 13, 8, rank=0, world=1))
    two = [list(StepBatches(order, 10, 11, 13, 8, rank=r, world=2)) for r in range(2)]
    for i in range(2):
        assert one[i] == two[0][i] + two[1][i]
        assert {s for s, _ in one[i]} == {11 + i}
    assert [i for s, i in one[0]] == order[8:16].tolist()


def test_collate_takes_this_ranks_rows_of_the_global_masks(tiny_cfg):
    sampler = MaskSampler(tiny_cfg.mask, (4, 4), seed=0)
    items = StepItems(RandomImages(8, 32))
    enc, pred = sampler.sample(8, 5)
    for rank in range(2):
        images, me, mp, step = StepCollate(sampler, 8, rank, 2)([items[(5, i)] for i in range(4)])
        assert step == 5 and images.shape == (4, 3, 32, 32)
        assert torch.equal(me, enc[rank * 4:(rank + 1) * 4]) and torch.equal(mp, pred[rank * 4:(rank + 1) * 4])


def test_collate_stacks_the_images_drops_labels_and_adds_the_steps_masks():
    sampler = MaskSampler(MaskConfig(), (14, 14))
    items = StepItems([(torch.zeros(3, 4, 4), i) for i in range(6)])
    images, enc, pred, step = StepCollate(sampler, 6, 0, 1)([items[(7, i)] for i in range(6)])
    assert images.shape == (6, 3, 4, 4) and step == 7
    e2, p2 = sampler.sample(6, 7)
    assert torch.equal(enc, e2) and torch.equal(pred, p2)


def test_loader_started_mid_epoch_continues_the_epoch_on_every_rank(tiny_cfg):
    data, sampler = RandomImages(40, 8), MaskSampler(tiny_cfg.mask, (4, 4), seed=0)
    one = StepLoader(data, sampler, 8, seed=3, rank=0, world=1)  # 5 steps per epoch
    two = [StepLoader(data, sampler, 8, seed=3, rank=r, world=2) for r in range(2)]
    epoch = list(one(5, 10))  # the second epoch: global steps 5..9
    assert [s for *_, s in epoch] == list(range(5, 10))
    assert torch.equal(torch.cat([x for x, *_ in epoch]), data.images[epoch_order(40, 3, 1)])
    for want, got in zip(epoch[2:], one(7, 10), strict=True):  # resumed at step 7
        assert all(torch.equal(a, b) for a, b in zip(want[:3], got[:3], strict=True)) and want[3] == got[3]
    for want, *halves in zip(epoch[2:], *(loader(7, 10) for loader in two), strict=True):
        for k in range(3):  # images, masks_enc, masks_pred: the two ranks' rows make the global batch
            assert torch.equal(want[k], torch.cat([h[k] for h in halves]))
