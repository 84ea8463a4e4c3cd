"""On-device loader: epochs, reshuffling, DDP shards, augmentation; TensorDataModule splits and limits."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from alq_lightning.data import SyntheticDataModule, TensorLoader, crop_and_flip, shard_indices, split_indices


def ids_loader(n: int = 103, batch_size: int = 10, **kwargs) -> TensorLoader:
    """A loader whose images carry their own index in every pixel."""
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return TensorLoader(images, torch.arange(n), batch_size, **kwargs)


def epoch_labels(loader: TensorLoader) -> torch.Tensor:
    return torch.cat([labels for _, labels in loader])


def test_each_training_index_once_per_epoch_and_images_match_labels() -> None:
    loader = ids_loader(shuffle=True, drop_last=False)
    assert len(loader) == 11
    batches = list(loader)
    assert [b[1].shape[0] for b in batches] == [10] * 10 + [3]
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen.sort().values, torch.arange(103))
    assert not torch.equal(seen, torch.arange(103))
    assert all(torch.equal(x[:, 0, 0, 0].long(), y) for x, y in batches)


def test_drop_last_drops_only_the_partial_batch() -> None:
    loader = ids_loader(shuffle=True, drop_last=True)
    seen = epoch_labels(loader)
    assert len(loader) == 10 and seen.shape == (100,) and seen.unique().numel() == 100


def test_reshuffles_across_epochs_deterministically() -> None:
    first, second = ids_loader(shuffle=True), ids_loader(shuffle=True)
    epochs_a = [epoch_labels(first) for _ in range(3)]
    epochs_b = [epoch_labels(second) for _ in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(epochs_a, epochs_b))
    assert not torch.equal(epochs_a[0], epochs_a[1]) and not torch.equal(epochs_a[1], epochs_a[2])
    third = ids_loader(shuffle=True)
    third.set_epoch(2)
    assert torch.equal(epoch_labels(third), epochs_a[2])
    third.set_epoch(0)
    assert torch.equal(epoch_labels(third), epochs_a[0])
    assert third.sampler is third and third.batch_sampler is None
    assert not torch.equal(epoch_labels(ids_loader(shuffle=True, seed=5)), epochs_a[0])


def test_evaluation_order_is_fixed() -> None:
    loader = ids_loader()
    assert torch.equal(epoch_labels(loader), torch.arange(103))
    assert torch.equal(epoch_labels(loader), torch.arange(103))


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("drop_last", [False, True])
def test_ddp_shards_are_disjoint_equal_and_cover_the_epoch(world_size: int, drop_last: bool) -> None:
    loaders = [ids_loader(shuffle=True, drop_last=drop_last, rank=r, world_size=world_size) for r in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    for epoch in (0, 1):
        for loader in loaders:
            loader.set_epoch(epoch)
        shards = [epoch_labels(loader) for loader in loaders]
        assert len({s.numel() for s in shards}) == 1
        union = torch.cat(shards)
        assert union.unique().numel() == union.numel()
        if not drop_last:
            assert union.numel() == 103 - 103 % world_size
            single = ids_loader(shuffle=True)
            single.set_epoch(epoch)
            assert torch.equal(torch.stack(shards, 1).flatten(), epoch_labels(single)[: union.numel()])


def test_shard_indices_validates_its_arguments() -> None:
    assert torch.equal(shard_indices(torch.arange(7), 1, 3), torch.tensor([1, 4]))
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        shard_indices(torch.arange(7), 2, 2)


def crop_oracle(image: torch.Tensor, top: int, left: int, flip: bool, padding: int, fill: torch.Tensor) -> torch.Tensor:
    c, h, w = image.shape
    padded = fill.view(c, 1, 1).repeat(1, h + 2 * padding, w + 2 * padding)
    padded[:, padding : padding + h, padding : padding + w] = image
    out = padded[:, top : top + h, left : left + w]
    return out.flip(-1) if flip else out


def test_crop_and_flip_matches_a_per_image_oracle() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 5, 7, generator=gen)
    offsets = torch.randint(0, 9, (6, 2), generator=gen)
    flips = torch.tensor([True, False, True, False, False, True])
    fill = torch.tensor([-1.0, -2.0, -3.0])
    out = crop_and_flip(images, offsets, flips, 4, fill)
    for i in range(6):
        expected = crop_oracle(images[i], int(offsets[i, 0]), int(offsets[i, 1]), bool(flips[i]), 4, fill)
        assert torch.equal(out[i], expected)
    centre = crop_and_flip(images, torch.full((6, 2), 4), torch.zeros(6, dtype=torch.bool), 4)
    assert torch.equal(centre, images)


def test_augmentation_keeps_shapes_is_seeded_and_varies() -> None:
    images = torch.randn(40, 3, 8, 8, generator=torch.Generator().manual_seed(1))

    def make(seed: int) -> TensorLoader:
        return TensorLoader(images, torch.arange(40), 8, shuffle=True, seed=seed, augment=True, padding=2)

    a, b, c = list(make(0)), list(make(0)), list(make(1))
    assert all(x.shape == (8, 3, 8, 8) for x, _ in a)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
    changed = torch.cat([(x != images[y]).flatten(1).any(1) for x, y in a])
    assert 0.5 < changed.float().mean() <= 1.0


def test_augmentation_does_not_depend_on_world_size() -> None:
    images = torch.randn(20, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    full = TensorLoader(images, torch.arange(20), 20, shuffle=True, augment=True, padding=2)
    x_full, y_full = next(iter(full))
    by_label = {int(y): x for x, y in zip(x_full, y_full)}
    for rank in (0, 1):
        shard = TensorLoader(
            images, torch.arange(20), 10, shuffle=True, augment=True, padding=2, rank=rank, world_size=2
        )
        x, y = next(iter(shard))
        assert all(torch.equal(xi, by_label[int(yi)]) for xi, yi in zip(x, y))


def test_split_is_seeded_disjoint_and_sorted() -> None:
    train, val = split_indices(100, 20, seed=3)
    again_train, again_val = split_indices(100, 20, seed=3)
    assert torch.equal(train, again_train) and torch.equal(val, again_val)
    assert not torch.equal(val, split_indices(100, 20, seed=4)[1])
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(100))
    assert torch.equal(train, train.sort().values)
    with pytest.raises(ValueError, match="val_size=100"):
        split_indices(100, 100, seed=0)


def fake_trainer(rank: int, world_size: int) -> SimpleNamespace:
    strategy = SimpleNamespace(root_device=torch.device("cpu"))
    return SimpleNamespace(global_rank=rank, world_size=world_size, strategy=strategy)


def test_datamodule_shards_by_the_attached_trainer_and_applies_limits() -> None:
    shards = []
    for rank in (0, 1):
        dm = SyntheticDataModule(input_size=4, train_size=64, val_size=16, test_size=30, batch_size=8, test_limit=21)
        dm.trainer = fake_trainer(rank, 2)
        dm.setup()
        loader = dm.train_dataloader()
        assert (loader.rank, loader.world_size, len(loader)) == (rank, 2, 4)
        shards.append(torch.cat([x.flatten(1) for x, _ in loader]))
        assert sum(y.numel() for _, y in dm.test_dataloader()) == 21 // 2
    union = torch.cat(shards)
    assert union.shape[0] == 64 and union.unique(dim=0).shape[0] == 64


def test_datamodule_validates_arguments() -> None:
    with pytest.raises(ValueError, match="batch_size=0"):
        SyntheticDataModule(batch_size=0)
    with pytest.raises(ValueError, match="train_limit=-1"):
        SyntheticDataModule(train_limit=-1)
    with pytest.raises(ValueError, match="val_size=-2"):
        SyntheticDataModule(val_size=-2)


def test_limits_take_the_first_samples() -> None:
    full = SyntheticDataModule(input_size=4, train_size=40, val_size=10, test_size=12)
    small = SyntheticDataModule(input_size=4, train_size=40, val_size=10, test_size=12, train_limit=5, test_limit=3)
    full.setup(), small.setup()
    assert torch.equal(small.split("train")[0], full.split("train")[0][:5])
    assert torch.equal(small.split("test")[1], full.split("test")[1][:3])
    assert torch.equal(small.split("val")[0], full.split("val")[0])


def test_image_padding_is_black_after_normalisation() -> None:
    images = torch.zeros(4, 1, 3, 3)
    out = crop_and_flip(images, torch.zeros(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.bool), 1,
                           torch.tensor([(0 - 0.5) / 0.25]))
    assert out[:, 0, 0, 0].eq(-2.0).all() and out[:, 0, 1, 1].eq(0.0).all()
    assert F.pad(images, (1, 1, 1, 1), value=-2.0)[:, :, :3, :3].equal(out)
