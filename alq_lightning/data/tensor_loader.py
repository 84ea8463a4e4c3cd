"""On-device batching of data sets held as tensors: seeded shuffling, DDP shards, crop + flip augmentation.

Everything random is drawn on the CPU from a generator seeded with ``seed + epoch`` and then moved to the
data's device, so an epoch's batches are the same on every device type and on every rank.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor


def shard_indices(indices: Tensor, rank: int, world_size: int) -> Tensor:
    """Rank ``rank``'s shard of ``indices`` ``[N]``: ``indices[rank::world_size]`` cut to ``N // world_size``.

    Shards of different ranks are disjoint and of equal size; at most ``world_size - 1`` entries are left out.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}, world_size={world_size}: need world_size >= 1 and 0 <= rank < world_size")
    return indices[rank::world_size][: indices.shape[0] // world_size]


def crop_and_flip(images: Tensor, offsets: Tensor, flips: Tensor, padding: int, fill: Tensor | None = None) -> Tensor:
    """Pad, crop back to size and mirror a batch, vectorised.

    Args:
        images: ``[B, C, H, W]``.
        offsets: ``[B, 2]`` int64, the crop's top-left corner (row, col) in the padded image, in ``[0, 2 * padding]``.
        flips: ``[B]`` bool, mirror left-right where True.
        padding: pixels added on every side before cropping (0: flip only).
        fill: ``[C]`` value of the padded pixels (default 0).

    Returns:
        ``[B, C, H, W]``.
    """
    b, c, h, w = images.shape
    if padding > 0:
        value = torch.zeros(c, dtype=images.dtype, device=images.device) if fill is None else fill.to(images)
        padded = value.view(1, c, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
        padded[:, :, padding : padding + h, padding : padding + w] = images
        device = images.device
        rows = offsets[:, 0, None] + torch.arange(h, device=device)  # [B, H]
        cols = offsets[:, 1, None] + torch.arange(w, device=device)  # [B, W]
        images = padded[
            torch.arange(b, device=device)[:, None, None, None],
            torch.arange(c, device=device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    return torch.where(flips[:, None, None, None], images.flip(-1), images)


class TensorLoader:
    """Yields ``(images[idx], labels[idx])`` batches from tensors that already lie on the target device.

    Args:
        images: ``[N, C, H, W]`` float.
        labels: ``[N]`` int64, on the same device.
        batch_size: samples per batch (per rank).
        shuffle: draw a new permutation every epoch from a generator seeded with ``seed + epoch``.
        drop_last: leave out the last incomplete batch.
        seed: base seed of shuffling and augmentation.
        rank, world_size: this process's DDP shard of every epoch (see :func:`shard_indices`).
        augment: random crop with ``padding`` (skipped when 0) and horizontal flip, drawn per epoch position.
        padding: crop padding in pixels.
        fill: ``[C]`` value of padded pixels (the normalised value of black, for instance).

    The epoch is the one given to :meth:`set_epoch` (Lightning calls it through :attr:`sampler`); without
    it, every iteration advances an internal counter, so successive epochs still differ deterministically.
    The loader is resumable: :meth:`state_dict` records the epoch and the batches already yielded, and
    after :meth:`load_state_dict` the next iteration continues from there (Lightning saves and restores
    it with mid-epoch checkpoints).
    """

    batch_sampler = None

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        augment: bool = False,
        padding: int = 0,
        fill: Tensor | None = None,
    ) -> None:
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images has {images.shape[0]} samples but labels has {labels.shape[0]}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive int")
        if padding < 0:
            raise ValueError(f"padding={padding} must be >= 0")
        shard_indices(torch.empty(0), rank, world_size)
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.augment, self.padding = augment, padding
        self.fill = fill.to(images) if fill is not None else None
        self.epoch = 0
        self._current = (0, 0)
        self._resume = (0, 0)

    @property
    def sampler(self) -> TensorLoader:
        """The object whose ``set_epoch`` Lightning calls at the start of every epoch: the loader itself."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Use ``epoch``'s permutation and augmentation on the next iteration."""
        self.epoch = int(epoch)

    @property
    def shard_size(self) -> int:
        """Samples this rank sees per epoch."""
        return self.images.shape[0] // self.world_size

    def __len__(self) -> int:
        n = self.shard_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def plan_epoch(self, epoch: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """This rank's sample indices ``[S]`` for ``epoch`` and their crop offsets ``[S, 2]`` and flips ``[S]``.

        The permutation and the augmentation of each epoch position are drawn for the whole epoch, before
        sharding, so they do not depend on ``world_size``.
        """
        n = self.images.shape[0]
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        offsets = flips = None
        if self.augment:
            offsets = torch.randint(0, 2 * self.padding + 1, (n, 2), generator=generator)
            flips = torch.rand(n, generator=generator) < 0.5
        positions = shard_indices(torch.arange(n), self.rank, self.world_size)
        if offsets is not None and flips is not None:
            offsets, flips = offsets[positions], flips[positions]
        return order[positions], offsets, flips

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "position"}``: the epoch being iterated and how many of its batches were yielded."""
        epoch, position = self._current
        return {"epoch": epoch, "position": position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Make the next iteration continue ``state_dict``'s epoch after its yielded batches."""
        self.epoch = int(state_dict["epoch"])
        self._resume = (self.epoch, int(state_dict["position"]))

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch = self.epoch
        start = self._resume[1] if self._resume[0] == epoch else 0
        self.epoch += 1
        self._resume = (0, 0)
        indices, offsets, flips = self.plan_epoch(epoch)
        device = self.images.device
        indices = indices.to(device)
        if offsets is not None and flips is not None:
            offsets, flips = offsets.to(device), flips.to(device)
        for batch in range(start, len(self)):
            self._current = (epoch, batch + 1)
            span = slice(batch * self.batch_size, (batch + 1) * self.batch_size)
            idx = indices[span]
            images = self.images[idx]
            if offsets is not None and flips is not None:
                images = crop_and_flip(images, offsets[span], flips[span], self.padding, self.fill)
            yield images, self.labels[idx]
