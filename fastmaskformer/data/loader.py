"""Batching: samplers that carry a per-sample augmentation seed, ``collate``, ``pad_images``
and the two loader builders.

Reproducibility guarantee: the training sampler yields ``(index, seed)`` pairs; the dataset
augments each sample with ``numpy.random.default_rng(seed)``. Seeds depend only on the base
seed, the epoch and the sample's position in the global stream, so for a given seed and
world size a run produces the same batches (same images, same augmentation, same order) for
any ``num_workers``, and again after a restart. ``worker_init_fn`` additionally seeds Python's
``random`` and NumPy's global RNG in each worker from torch's per-worker seed (the loader's
seeded base seed + worker id) for code outside our transforms; those global streams do depend
on the worker count.
"""
from __future__ import annotations

import random
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .catalog import build_dataset


def sample_seed(base_seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the sample at ``position`` of ``epoch``'s global stream."""
    return int(np.random.SeedSequence([base_seed, epoch, position]).generate_state(2, np.uint64)[0] >> np.uint64(1))


class TrainingSampler(Sampler):
    """Shuffled ``(index, seed)`` pairs for training, sharded over ranks.

    Each epoch is a fresh permutation of ``range(size)`` (``shuffle``) drawn from
    ``(seed, epoch)``; global position ``p`` goes to rank ``p % world_size``. With
    ``infinite=True`` (iteration-based training, detectron2's TrainingSampler) it never
    stops, advancing the epoch itself; otherwise it yields one epoch of
    ``ceil(size / world_size)`` samples per rank (wrapping, like DistributedSampler) and
    ``set_epoch`` selects the epoch.
    """

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True, infinite: bool = True,
                 rank: int = 0, world_size: int = 1):
        if size <= 0:
            raise ValueError(f"TrainingSampler needs a non-empty dataset, got size {size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.size, self.seed, self.shuffle, self.infinite = size, int(seed), shuffle, infinite
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.size)
        return np.random.default_rng([self.seed, epoch]).permutation(self.size)

    def __iter__(self) -> Iterator:
        epoch = self.epoch
        while True:
            order = self._order(epoch)
            per_rank = -(-self.size // self.world_size)
            positions = range(self.rank, per_rank * self.world_size, self.world_size)
            for p in positions:
                yield int(order[p % self.size]), sample_seed(self.seed, epoch, p)
            if not self.infinite:
                return
            epoch += 1

    def __len__(self) -> int:
        if self.infinite:
            raise TypeError("an infinite TrainingSampler has no length")
        return -(-self.size // self.world_size)


class InferenceSampler(Sampler):
    """Each rank gets a contiguous shard of ``range(size)`` (in order, no padding), so the
    union over ranks is exactly the dataset."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1):
        shard = -(-size // world_size)
        self.indices = range(rank * shard, min(size, (rank + 1) * shard))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` and NumPy's global RNG in a worker from torch's per-worker seed
    (the loader's base seed + worker id)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


_LIST_KEYS = {"file_name": "file_names", "image_id": "image_ids", "height": "heights", "width": "widths",
              "sem_seg": "sem_segs", "pan_seg": "pan_segs", "segments_info": "segments_infos"}


def collate(batch: Sequence[dict]) -> dict:
    """Items -> ``{"images": list of uint8 [3, H_i, W_i], "targets": list[Target],
    "file_names", "image_ids", "heights", "widths"}`` (+ ``"sem_segs"`` / ``"pan_segs"``,
    ``"segments_infos"`` when the items carry them). Images keep their own sizes: the model
    normalises and pads (see ``pad_images``)."""
    out = {"images": [b["image"] for b in batch], "targets": [b["target"] for b in batch]}
    for key, plural in _LIST_KEYS.items():
        if key in batch[0]:
            out[plural] = [b[key] for b in batch]
    if any("bad_samples" in b for b in batch):  # replaced unreadable samples (data.on_bad_sample: skip)
        out["bad_samples"] = [x for b in batch for x in b.get("bad_samples", ())]
    return out


def padded_size(image_sizes: Sequence[tuple[int, int]], size_divisibility: int) -> tuple[int, int]:
    """(H, W) of a batch of ``image_sizes``: the largest size, rounded up to a multiple of
    ``size_divisibility`` when it is > 1 (0 or 1: not rounded; detectron2's ``ImageList``)."""
    if size_divisibility < 0:
        raise ValueError(f"size_divisibility must be >= 0 (0: pad to the largest image only), got {size_divisibility}")
    h = max(int(s[0]) for s in image_sizes)
    w = max(int(s[1]) for s in image_sizes)
    if size_divisibility > 1:
        h = -(-h // size_divisibility) * size_divisibility
        w = -(-w // size_divisibility) * size_divisibility
    return h, w


def pad_images(images: Sequence[torch.Tensor], size_divisibility: int = 32, pad_value: float = 0):
    """Stack ``[3, H_i, W_i]`` images into ``[B, 3, H, W]`` padded bottom/right with
    ``pad_value`` to :func:`padded_size` (size_divisibility 0: the largest image, unrounded).

    Returns ``(batch, image_sizes)`` with ``image_sizes = [(H_i, W_i), ...]``; keeps the dtype.
    """
    if not images:
        raise ValueError("pad_images needs at least one image")
    sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
    batch = images[0].new_full((len(images), images[0].shape[0], *padded_size(sizes, size_divisibility)), pad_value)
    for i, im in enumerate(images):
        batch[i, :, : im.shape[-2], : im.shape[-1]].copy_(im)
    return batch, sizes


def _seed(cfg, seed):
    return cfg.solver.seed if seed is None else int(seed)


def _dist(rank, world_size):
    # default to the initialised process group, else a single process
    if world_size is None:
        ready = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if ready else 1
        if rank is None:
            rank = torch.distributed.get_rank() if ready else 0
    return (0 if rank is None else rank), world_size


def build_train_loader(cfg, dataset=None, batch_size: int | None = None, num_workers: int | None = None,
                       seed: int | None = None, rank: int | None = None, world_size: int | None = None,
                       infinite: bool = True, epoch: int = 0) -> DataLoader:
    """Training loader for a ``Config``: dataset ``build_dataset(cfg.data, cfg.data.train_split,
    train=True)`` unless given, per-rank batch ``cfg.solver.batch_size // world_size``,
    ``TrainingSampler`` (infinite for iteration-based training), ``collate``, last partial
    batch dropped. Seeds default to ``cfg.solver.seed``; rank / world size to the initialised
    ``torch.distributed`` group (else 0 / 1)."""
    seed = _seed(cfg, seed)
    rank, world_size = _dist(rank, world_size)
    if dataset is None:
        dataset = build_dataset(cfg.data, cfg.data.train_split, train=True, seed=seed)
    if batch_size is None:
        if cfg.solver.batch_size % world_size:
            raise ValueError(f"solver.batch_size {cfg.solver.batch_size} is not divisible by world_size {world_size}")
        batch_size = cfg.solver.batch_size // world_size
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    sampler = TrainingSampler(len(dataset), seed, shuffle=True, infinite=infinite, rank=rank, world_size=world_size)
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate,
        drop_last=True,
        worker_init_fn=worker_init_fn,
        generator=torch.Generator().manual_seed(seed + 1000003 * epoch + rank),
        persistent_workers=num_workers > 0 and infinite,
        pin_memory=torch.cuda.is_available(),
    )


def build_test_loader(cfg, dataset=None, split: str | None = None, batch_size: int = 1,
                      num_workers: int | None = None, rank: int | None = None,
                      world_size: int | None = None) -> DataLoader:
    """Evaluation loader: ``build_dataset(cfg.data, split or cfg.data.val_split, train=False)``
    unless given (test-time resize, items carry the original ground truth), in order, sharded
    contiguously over ranks by ``InferenceSampler`` (rank / world size as in
    ``build_train_loader``)."""
    rank, world_size = _dist(rank, world_size)
    if dataset is None:
        dataset = build_dataset(cfg.data, split or cfg.data.val_split, train=False)
    num_workers = cfg.data.num_workers if num_workers is None else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=InferenceSampler(len(dataset), rank, world_size),
        num_workers=num_workers,
        collate_fn=collate,
        worker_init_fn=worker_init_fn,
    )
