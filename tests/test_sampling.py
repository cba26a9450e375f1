"""Step-indexed sampling at any corpus size, and exact resume across data passes (map-style and streaming)."""

import os
import shutil
import signal
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from test_text_data import sentences, stream_position

from conftest import assert_same_training_state, compose
from ethos.config import instantiate
from ethos.data import sampling
from ethos.data.sampling import StepBatchSampler, pass_key, permute
from ethos.study import train

M64 = (1 << 64) - 1


def ref_permute(i: int, n: int, key: int) -> int:
    """The same keyed Feistel + cycle walk, one Python int at a time (no numpy wrap-around to get wrong)."""
    def mix(x):
        x ^= x >> 30
        x = x * 0xBF58476D1CE4E5B9 & M64
        x ^= x >> 27
        x = x * 0x94D049BB133111EB & M64
        return x ^ (x >> 31)

    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    keys = [mix((key + r * 0x9E3779B97F4A7C15) & M64) for r in range(1, sampling.ROUNDS + 1)]
    x = i
    while True:
        left, right = x >> half, x & mask
        for k in keys:
            left, right = right, left ^ (mix(right ^ k) & mask)
        x = (left << half) | right
        if x < n:
            return x


def all_batches(s: StepBatchSampler) -> list[list[int]]:
    return [[i for *_, i in batch] for batch in s]  # keys (micro-batch, global position, sample index)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 16, 17, 1000, 4097, 2**16 + 3, 2**20 - 1])
def test_permute_is_a_bijection_of_0_n(n):
    for seed, p in ((0, 0), (5, 3)):
        out = permute(np.arange(n), n, pass_key(seed, p))
        assert np.array_equal(np.sort(out), np.arange(n))
        some = np.random.default_rng(n).integers(0, n, size=min(n, 50))
        assert out[some].tolist() == [ref_permute(int(i), n, pass_key(seed, p)) for i in some]


def test_huge_n_matches_reference_and_costs_per_index():
    n = 10**12 + 39  # no O(n) array could be made: the map is evaluated per index
    idx = np.array([0, 1, 2, n // 2, n - 1], dtype=np.uint64)
    out = permute(idx, n, pass_key(1, 2)).tolist()
    assert out == [ref_permute(int(i), n, pass_key(1, 2)) for i in idx]
    assert len(set(out)) == 5 and all(0 <= x < n for x in out)


def test_passes_and_seeds_give_different_orders():
    n, bs = 1000, 10
    s = StepBatchSampler(n, bs, 300, seed=0)
    assert s.per_pass == 100
    flat = [i for b in all_batches(s) for i in b]
    passes = [flat[p * 1000:(p + 1) * 1000] for p in range(3)]
    for p in passes:  # every pass is a permutation of the whole data set
        assert sorted(p) == list(range(n))
    assert passes[0] != passes[1] != passes[2] != passes[0]
    other = [i for b in all_batches(StepBatchSampler(n, bs, 100, seed=1)) for i in b]
    assert other != passes[0]
    # the order is not the identity or a shift of it: neighbours in position are not neighbours in data
    assert np.mean(np.abs(np.diff(passes[0])) == 1) < 0.05


def test_first_position_is_spread_over_the_data():
    n = 7
    counts = np.bincount([permute(np.array([0]), n, pass_key(seed, 0))[0] for seed in range(7000)], minlength=n)
    assert counts.min() > 800 and counts.max() < 1200, counts  # 1000 each if uniform


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_make_the_single_process_global_batch(world):
    n, bs, total = 1000, 8, 150  # passes of 1000 // (8 * world) batches: the run crosses pass boundaries
    glob = all_batches(StepBatchSampler(n, bs * world, total, seed=3))
    ranks = [all_batches(StepBatchSampler(n, bs, total, seed=3, rank=r, world_size=world)) for r in range(world)]
    assert total > StepBatchSampler(n, bs, total, world_size=world).per_pass
    for b in range(total):
        assert [i for r in range(world) for i in ranks[r][b]] == glob[b]


@pytest.mark.parametrize("start", [1, 37, 64, 99, 100, 101, 150])
def test_start_resumes_exactly_across_passes_and_chunks(start):
    kw = {"n_samples": 803, "batch_size": 8, "total_batches": 230, "seed": 11}  # 100 batches per pass
    full = list(StepBatchSampler(**kw))
    tail = list(StepBatchSampler(**kw, start=start))
    assert tail == full[start:]
    assert [b for b, *_ in tail[0]] == [start] * 8  # the batch id (MLM mask seed) is the global one
    s = StepBatchSampler(**kw)
    assert [[i for *_, i in x] for x in full] == [s.batch(b) for b in range(230)]


@pytest.mark.parametrize("n", [10**6, 35 * 10**6, 2**26 + 1, 10**12])
def test_cost_per_batch_does_not_grow_with_the_corpus(n, monkeypatch):
    """Counted work, not time: Feistel evaluations per micro-batch stay a few per sample at any n."""
    evaluated = []
    feistel = sampling._feistel

    def counting(x, *args):
        evaluated.append(len(x))
        return feistel(x, *args)

    monkeypatch.setattr(sampling, "_feistel", counting)
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: pytest.fail("randperm called"))
    bs, batches = 32, 256
    s = StepBatchSampler(n, bs, batches, seed=1, start=0)
    rows = [[i for *_, i in b] for b in s]
    assert len(rows) == batches and all(0 <= i < n for r in rows for i in r)
    assert len({i for r in rows for i in r}) == bs * batches  # one pass: no repeats
    # the Feistel domain is < 4n, so a cycle walk takes < 4 evaluations on average
    assert sum(evaluated) / (bs * batches) < 5


# -- end to end: training resumed across a data pass equals training straight through ----------------
class SignalAt(L.Callback):
    """Sends SIGINT after the validation at step `step` (ModelCheckpoint has saved; GracefulStop saves after
    the next training step) and keeps a copy of the checkpoint GracefulStop wrote then, before on_train_end
    overwrites last.ckpt. (A signal during the validation itself would save at once, without a best-step*.)"""

    def __init__(self, step: int, dirpath: str):
        self.step, self.dir = step, Path(dirpath)

    def on_validation_end(self, trainer, pl_module):
        if trainer.state.fn == "fit" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1 and trainer.should_stop:
            shutil.copy(self.dir / "last.ckpt", self.dir / f"stop{trainer.global_step}.ckpt")


def write_corpus(root: Path, files: int, lines: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"part{i}.txt").write_text("\n".join(sentences(lines, 30 + i)))
    return f"{root}/*.txt"


def text_cfg(tmp: Path, glob: str, out: Path, steps: int, extra=()) -> object:
    return compose(["debug=tiny", "logger=csv", "data=text_files", f"data.data_files='{glob}'",
                    "data.vocab_size=200", "data.seq_len=32", f"data.cache_dir={tmp}/cache",
                    f"trainer.max_steps={steps}", "trainer.val_check_interval=4",
                    "callbacks.checkpoint.every_n_train_steps=4", "optim.schedule=constant", "optim.warmup=0",
                    "print_config=false", *extra], output_dir=out)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_map_style_resume_across_a_pass_boundary(tmp_path):
    glob = write_corpus(tmp_path / "corpus", 1, 200)
    dm = instantiate(text_cfg(tmp_path, glob, tmp_path / "probe", 10).data)
    dm.prepare_data()
    dm.setup("fit")
    per_pass = len(dm.splits["train"]) // dm.batch_size
    stop, steps = 4, 10
    assert 0 < per_pass < stop and stop % per_pass and stop // per_pass < steps // per_pass, per_pass

    train(text_cfg(tmp_path, glob, tmp_path / "straight", steps))
    train(text_cfg(tmp_path, glob, tmp_path / "split", stop))
    assert torch.load(tmp_path / "split/checkpoints/last.ckpt", weights_only=True)["global_step"] == stop
    train(text_cfg(tmp_path, glob, tmp_path / "split", steps))
    assert_same_training_state(tmp_path / "straight/checkpoints/last.ckpt", tmp_path / "split/checkpoints/last.ckpt")


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_resume_from_every_kind_of_checkpoint(tmp_path, workers):
    """Straight vs stopped by a signal (GracefulStop's save) and vs resumed from ModelCheckpoint's
    step-4 save: identical weights and AdamW state at step 10, with the stream past a pass boundary.

    A pass is ~5 steps and windows are 10 documents, so the validation at step 4 reads the same files
    mid-pass, several windows before the save at step 5: the saved position must not move with it."""
    glob = write_corpus(tmp_path / "corpus", 3, 150)  # three shards
    stream = ["data.streaming=true", "data.val_docs=10", "data.shuffle_buffer=10", f"data.num_workers={workers}"]
    steps = 10
    train(text_cfg(tmp_path, glob, tmp_path / "straight", steps, stream))
    straight = tmp_path / "straight/checkpoints/last.ckpt"
    state = torch.load(straight, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    pos = stream_position(state[-1])
    assert pos["b"] == steps and pos["epoch"] >= 1, pos  # the run went past the end of one pass

    split = tmp_path / "split"
    stopper = ["+callbacks.stopper._target_=test_sampling.SignalAt", "+callbacks.stopper.step=4",
               f"+callbacks.stopper.dirpath={split}/checkpoints"]
    with pytest.raises(SystemExit) as stopped:
        train(text_cfg(tmp_path, glob, split, steps, stream + stopper))
    assert stopped.value.code == 130
    stop_ckpt = split / "checkpoints" / "stop5.ckpt"
    every_n = shutil.copy(split / "checkpoints" / "best-step4.ckpt", tmp_path)  # ModelCheckpoint's save at step 4
    at4, at5 = (stream_position(torch.load(p, weights_only=True)["loops"]["fit_loop"]["state_dict"]
                                ["combined_loader"][-1]) for p in (every_n, stop_ckpt))
    assert (at4["b"], at5["b"]) == (4, 5)
    assert at4["epoch"] == at5["epoch"] and at5["window"] > at4["window"] + 1  # as the docstring says
    train(text_cfg(tmp_path, glob, split, steps, stream + [f"ckpt_path={stop_ckpt}"]))
    assert_same_training_state(straight, split / "checkpoints" / "last.ckpt")

    train(text_cfg(tmp_path, glob, tmp_path / "from4", steps, stream + [f"ckpt_path={every_n}"]))
    assert_same_training_state(straight, tmp_path / "from4" / "checkpoints" / "last.ckpt")

