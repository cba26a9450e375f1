"""Step-indexed sampling: micro-batch b of a run is a pure function of (seed, b).

Pretraining is step-based, so the train loader is one "epoch" as long as the whole run: the sampler
walks through seeded per-pass permutations of the data and starts at the micro-batch the restored
global step points to. Resuming therefore neither repeats nor skips data, with any number of
workers, and MLM masking is seeded per micro-batch so a resumed run sees exactly the same batches.
"""

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler


class StepBatchSampler(Sampler[list[tuple[int, int]]]):
    def __init__(self, n_samples: int, batch_size: int, total_batches: int, seed: int = 0,
                 start: int = 0, rank: int = 0, world_size: int = 1):
        if n_samples < batch_size * world_size:
            raise ValueError(f"dataset has {n_samples} samples, fewer than one global batch "
                             f"({batch_size} x {world_size})")
        self.n, self.bs, self.total, self.seed = n_samples, batch_size, total_batches, seed
        self.start, self.rank, self.world = start, rank, world_size
        self.per_pass = n_samples // (batch_size * world_size)  # global batches per data pass (drop last)

    def __len__(self) -> int:
        # the whole run, so a resumed progress bar shows the true position; iteration starts at `start`
        return self.total

    def batch(self, b: int) -> list[int]:
        """Sample indices of global micro-batch b on this rank."""
        p, j = divmod(b, self.per_pass)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p))
        g = self.bs * self.world
        return perm[j * g + self.rank * self.bs: j * g + (self.rank + 1) * self.bs].tolist()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(self.start, self.total):
            yield [(b, i) for i in self.batch(b)]


class Indexed(Dataset):
    """Wraps a map-style dataset of dicts so that items fetched by (batch, index) carry the batch id."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        b, i = key if isinstance(key, tuple) else (-1, key)
        return {**self.ds[i], "batch_idx": b}


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """In-order batches (keeps the last partial one); ids offset so eval masks differ from train's."""

    OFFSET = 1 << 40

    def __init__(self, n_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.idx = list(range(rank, n_samples, world_size))
        self.bs = batch_size

    def __len__(self) -> int:
        return (len(self.idx) + self.bs - 1) // self.bs

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for b in range(len(self)):
            yield [(self.OFFSET + b, i) for i in self.idx[b * self.bs:(b + 1) * self.bs]]


def run_position(trainer) -> dict:
    """Where this process's train stream starts and ends, in micro-batches, and its rank.

    The start is the restored global step (times gradient accumulation), so a resumed run continues
    the same stream; without a trainer (scripts, tests) it is a fresh 1000-step run on one process.
    """
    if trainer is None:
        return {"start": 0, "total": 1000, "rank": 0, "world_size": 1}
    accum = trainer.accumulate_grad_batches
    max_steps = trainer.max_steps if trainer.max_steps > 0 else 1000
    return {"start": trainer.global_step * accum, "total": max_steps * accum,
            "rank": trainer.global_rank, "world_size": trainer.world_size}
