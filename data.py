"""Data for object-centric learning: built-in synthetic sets, real datasets from
local files, a deterministic step-indexed loader, and the sample-grid writer.

A batch is a dict of tensors (see DESIGN.md):
  image  float32 (B, 3, H, W) in [0, 1]
  mask   int64   (B, H, W) entity id per pixel; ids < dataset.num_background are
         background, -1 means "ignore" (unlabelled or overlapping pixels)
  optional per-entity ground truth aligned with mask ids (entry e describes mask
  id e, background entities included): visible bool (B, E), shape int64 (B, E),
  color float32 (B, E, 3), scale / x / y float32 (B, E).

Every dataset has `name`, `num_background`, `max_objects`, and implements
`__getitems__(indices)`, returning a whole batch as one dict, so a DataLoader
built by `make_loader` fetches a batch with one vectorised call.
"""
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")


class DataError(Exception):
    """A dataset is missing, malformed or asked for impossibly. main() prints the
    message as one line and exits non-zero, without a traceback."""


def _collate_batch(batch):
    """`__getitems__` already returns a batched dict: pass it through."""
    return batch


# --- Synthetic sets


# --- Real datasets


# --- Dispatch


def make_dataset(name_or_path, split, resolution=None, seed=0, **options):
    """Return the Dataset for a built-in name or a local path.

    name_or_path: one of BUILTIN, or a path to a real dataset (see module docstring
    of the real-data section). split: "train" | "val" | "test". resolution: output
    side length in pixels (None: the dataset's native size). seed: the seed of the
    built-in generators (image i of a split is a pure function of seed, split, i).
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if resolution is not None and resolution < 4:
        raise DataError(f"resolution {resolution} is too small; expected at least 4 pixels")
    if name_or_path in BUILTIN:
        return make_synthetic(name_or_path, split, resolution, seed, **options)
    path = Path(name_or_path)
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; expected a built-in set "
                        f"({', '.join(BUILTIN)}) or a dataset path")
    return open_real(path, split, resolution, **options)


# --- Loading


class StepBatchSampler(torch.utils.data.Sampler):
    """Index lists for a DataLoader, addressed by training step.

    shuffle=True: an endless stream; epoch e is a permutation drawn from
    (seed, e), dealt round-robin to the DDP ranks, batch `b` of the stream is
    step `b`, and the stream starts at `start_step`. So a run resumed at step s
    sees exactly the batches an uninterrupted run would have seen.
    shuffle=False: one ordered pass over this rank's share (the last batch may be short).
    """

    def __init__(self, n, batch_size, shuffle, seed=0, rank=0, world=1, start_step=0):
        if n < world or (shuffle and n // world < batch_size):
            raise DataError(f"dataset of {n} items is too small for batch size {batch_size} "
                            f"on {world} process(es)")
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.seed, self.rank, self.world, self.start_step = seed, rank, world, start_step
        self.per_rank = n // world  # equal shares, so every rank runs the same number of steps
        self.steps_per_epoch = self.per_rank // batch_size

    def _epoch_indices(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(self.n, generator=g)
        return order[self.rank: self.per_rank * self.world: self.world]  # (per_rank,)

    def __iter__(self):
        if not self.shuffle:
            idx = torch.arange(self.rank, self.n, self.world)
            for i in range(0, len(idx), self.batch_size):
                yield idx[i: i + self.batch_size].tolist()
            return
        epoch, b = divmod(self.start_step, self.steps_per_epoch)
        while True:
            idx = self._epoch_indices(epoch)
            for j in range(b, self.steps_per_epoch):
                yield idx[j * self.batch_size: (j + 1) * self.batch_size].tolist()
            epoch, b = epoch + 1, 0

    def __len__(self):
        if self.shuffle:
            raise TypeError("a shuffling StepBatchSampler is endless")
        return math.ceil(len(range(self.rank, self.n, self.world)) / self.batch_size)


def make_loader(dataset, batch_size, shuffle, seed=0, workers=0, distributed=False, start_step=0):
    """A DataLoader of batched dicts, deterministic given `seed`.

    shuffle=True gives an endless training stream starting at `start_step`
    (for exact resumption); shuffle=False one ordered evaluation pass.
    distributed=True shards the indices across the torch.distributed ranks.
    """
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sampler = StepBatchSampler(len(dataset), batch_size, shuffle, seed, rank, world, start_step)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=_collate_batch, num_workers=workers,
        persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
        # its own generator: creating an iterator must not draw from the global RNG, or a
        # resumed run's model noise would differ from an uninterrupted run's
        generator=torch.Generator().manual_seed(seed))


# --- Sample grid
