"""Per-batch seeding of loading and augmentation: a batch comes out the same whichever worker
loads it, whether or not the run was resumed, and loading leaves training's RNG alone."""

import random

import numpy as np
import torch

from mmkit.data import DistributedBatchSampler, ImageTextDataModule, SyntheticShapes
from mmkit.data.workers import IndexBatch


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()


def _random_augment(image):
    """Noise from all three global generators, as torchvision / timm augmentations draw."""
    return _to_tensor(image) + torch.rand(()) + float(np.random.rand()) + random.random()


class _AugmentingPreprocessing:
    def image_transform(self, train: bool):
        return _random_augment

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t), 1] for t in texts])


def _datamodule(num_workers=0):
    return ImageTextDataModule(train=SyntheticShapes(24, seed=0, image_size=16), batch_size=4, seed=3,
                               num_workers=num_workers, preprocessing=_AugmentingPreprocessing())


def test_every_batch_carries_a_seed_of_its_epoch_position_and_rank():
    def seeds(epoch, rank, seed=0):
        s = DistributedBatchSampler(40, 5, rank=rank, world_size=2, seed=seed)
        s.set_epoch(epoch)
        batches = list(s)
        assert all(isinstance(b, IndexBatch) for b in batches)
        return [b.seed for b in batches]

    assert seeds(0, 0) == seeds(0, 0)
    everything = seeds(0, 0) + seeds(1, 0) + seeds(0, 1) + seeds(0, 0, seed=1)
    assert len(set(everything)) == len(everything)


def test_augmented_batches_do_not_depend_on_workers_or_the_callers_rng():
    torch.manual_seed(0)
    main = [b["images"] for b in _datamodule(num_workers=0).train_dataloader()]
    torch.manual_seed(1)  # a different caller state changes nothing
    again = [b["images"] for b in _datamodule(num_workers=0).train_dataloader()]
    workers = [b["images"] for b in _datamodule(num_workers=2).train_dataloader()]
    assert len(main) == len(again) == len(workers) == 6
    assert all(torch.equal(a, b) for a, b in zip(main, again))
    assert all(torch.equal(a, b) for a, b in zip(main, workers))
    assert not torch.equal(main[0] - main[0].floor(), main[1] - main[1].floor())  # the noise is random


def test_loading_in_the_main_process_leaves_the_training_rng_alone():
    def reseed():
        torch.manual_seed(0), np.random.seed(0), random.seed(0)

    loader = _datamodule(num_workers=0).train_dataloader()
    reseed()
    iter(loader)  # torch's DataLoader draws one seed from torch's RNG per iterator: not ours
    expected = torch.rand(3), np.random.rand(3), random.random()
    reseed()
    batches = list(loader)  # loading and augmenting six batches draws nothing more
    assert len(batches) == 6
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_a_resumed_epoch_gives_the_remaining_batches_augmented_identically():
    full = list(_datamodule().train_dataloader())
    dm = _datamodule(num_workers=1)
    dm.load_state_dict({"train_sampler": {"epoch": 0, "batches_consumed": 4, "size": 24, "batch_size": 4,
                                          "world_size": 1, "seed": 3, "num_batches": 6}})
    rest = list(dm.train_dataloader())
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[4:]]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(rest, full[4:]))
