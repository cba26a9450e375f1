"""Step-indexed sampling: micro-batch b of a run is a pure function of (seed, b).

Pretraining is step-based, so the train loader is one "epoch" as long as the whole run: the sampler
walks through seeded per-pass permutations of the data and starts at the micro-batch the restored
global step points to. Resuming therefore neither repeats nor skips data, with any number of
workers.

Under DDP, rank r of W takes the r-th slice of each global micro-batch, and every key carries the
sample's position in the global batch: MLM masks and augmentation are seeded by (seed, b, position)
(`sample_seed`), so ranks draw different masks and W processes with micro-batch m see exactly what
one process with micro-batch W*m sees, and a resumed run exactly what an uninterrupted one saw.

The per-pass permutation is never materialised: position k of pass p maps to sample
`permute(k, n, pass_key(seed, p))`, a keyed bijection of [0, n) evaluated for the indices of one
batch only, so a micro-batch costs the same at 35M blocks as at 1M (a `randperm(n)` per batch
costs ~1 s at that size).
"""

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Dataset, Sampler

_M64 = (1 << 64) - 1
ROUNDS = 6  # Luby-Rackoff needs 4 for a pseudo-random permutation; 2 more are nearly free


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijective 64-bit hash with full avalanche (uint64, wraps mod 2**64)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def pass_key(seed: int, p: int) -> int:
    """The key of data pass p: distinct (seed, pass) pairs give unrelated permutations."""
    x = np.array([(seed * 0x9E3779B97F4A7C15 + p) & _M64], dtype=np.uint64)
    return int(mix64(mix64(x) ^ np.uint64(0x5851F42D4C957F2D))[0])


def sample_seed(seed: int, b: int, pos: int) -> int:
    """A 63-bit seed for the sample at position `pos` of global micro-batch b (splitmix64 steps in plain
    Python: a call per sample costs ~1 us; stable across processes, unlike hash() of a str)."""
    x = 0
    for v in (seed, b, pos):
        x = (x ^ (v & _M64)) * 0x9E3779B97F4A7C15 & _M64
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & _M64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & _M64
        x ^= x >> 31
    return x >> 1


def split_key(key) -> tuple[int, int, int]:
    """(micro-batch, position in the global batch, sample index) from a sampler's key. A plain index
    (no sampler of ours) has neither; a (batch, index) pair has no position: collators then use the
    row within the batch, which is the global position on one process."""
    if not isinstance(key, tuple):
        return -1, -1, key
    if len(key) == 2:
        return key[0], -1, key[1]
    return key


def _half_bits(n: int) -> int:
    """Half the width of the smallest even power of two >= n (at least 2**2): the Feistel halves."""
    return max(1, ((n - 1).bit_length() + 1) // 2)


def _feistel(x: np.ndarray, half: int, round_keys: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on [0, 4**half): a bijection for any round function."""
    h, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right = x >> h, x & mask
    for k in round_keys:
        left, right = right, left ^ (mix64(right ^ k) & mask)
    return (left << h) | right


def permute(idx, n: int, key: int) -> np.ndarray:
    """Image of positions `idx` (in [0, n)) under the bijection of [0, n) keyed by `key`.

    A Feistel network permutes the next even power of two >= n (< 4n); cycle walking re-applies it
    to values that land outside [0, n) until they land inside, which restricts the permutation to
    [0, n) and keeps it a bijection. Expected walks are < 4 per index, so the cost is per index.
    """
    x = np.asarray(idx, dtype=np.uint64).copy()
    if n <= 1:
        return x
    half = _half_bits(n)
    round_keys = mix64(np.uint64(key) + np.arange(1, ROUNDS + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    todo = np.arange(len(x))
    while len(todo):
        x[todo] = _feistel(x[todo], half, round_keys)
        todo = todo[x[todo] >= n]
    return x


class StepBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """Global micro-batch b: positions of pass p = b // per_pass, through that pass's bijection.

    Yields keys (b, position in the global batch, sample index). Lightning must not wrap it in a
    DistributedSampler (`use_distributed_sampler: false` in ethos/conf/trainer/default.yaml): it splits
    the global batch between ranks itself, from the rank and world size given.
    """

    CHUNK = 64  # micro-batches drawn per call while iterating

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
        return self.batches(b, b + 1)[0].tolist()

    def batches(self, b0: int, b1: int) -> np.ndarray:
        """Sample indices of micro-batches b0..b1-1 on this rank, shape (b1 - b0, batch_size).

        Batch b is this rank's slice of positions [j*g, (j+1)*g) of pass p = b // per_pass; the
        positions go through pass p's bijection. Many batches per call share numpy's per-call cost.
        """
        b = np.arange(b0, b1, dtype=np.int64)
        p, j = np.divmod(b, self.per_pass)
        first = j * self.bs * self.world + self.rank * self.bs
        pos = (first[:, None] + np.arange(self.bs)).astype(np.uint64)
        out = np.empty_like(pos)
        for q in np.unique(p):  # at most two passes in one chunk, unless passes are shorter than it
            rows = p == q
            out[rows] = permute(pos[rows].ravel(), self.n, pass_key(self.seed, int(q))).reshape(-1, self.bs)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        first = self.rank * self.bs  # this rank's first position in the global batch
        for c in range(self.start, self.total, self.CHUNK):
            for b, row in enumerate(self.batches(c, min(c + self.CHUNK, self.total)).tolist(), start=c):
                yield [(b, first + r, i) for r, i in enumerate(row)]


class Indexed(Dataset):
    """Wraps a map-style dataset of dicts so that items fetched by a sampler's key carry the micro-batch
    id and the position in the global batch (what the collator seeds masks with)."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        b, pos, i = split_key(key)
        return {**self.ds[i], "batch_idx": b, "batch_pos": pos}


class EvalBatchSampler(Sampler[list[tuple[int, int, int]]]):
    """In-order batches (keeps the last partial one). Keys (OFFSET, i, i): an evaluation sample's mask
    is a function of the sample alone, so the validation loss depends on neither the world size nor
    the eval batch size; the offset keeps eval masks apart from train's (b < OFFSET)."""

    OFFSET = 1 << 40

    def __init__(self, n_samples: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.idx = list(range(rank, n_samples, world_size))
        self.bs = batch_size

    def __len__(self) -> int:
        return (len(self.idx) + self.bs - 1) // self.bs

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for b in range(len(self)):
            yield [(self.OFFSET, i, i) for i in self.idx[b * self.bs:(b + 1) * self.bs]]


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
