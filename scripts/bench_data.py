"""Train-loader cost at corpus scale, and how fast a streaming run resumes deep into its stream.

Part 1 times `TextDataModule.train_dataloader()` (step-indexed sampler + row fetch + MLM collate,
one process) at n = 1M, 10M and 35M blocks, with the seeded bijection sampler and, in the same
process, the previous `randperm(n)`-per-batch sampler as the reference. Blocks come from a
memory-mapped arrow file written here (random token ids; `--source arrow`) or from a synthetic
map-style dataset of the same length that computes each row from its index (`--source synthetic`);
`auto` writes arrow when the data folder has room for it.

Part 2 writes local parquet shards, iterates the streaming train loader for real up to micro-batch
`--stream-steps` (100k), saves the loader state, then times a fresh data module + loader restored
from it until its first batch arrives, and checks that batch against the straight run's. For
reference it also times what the old replay resume did: re-read, tokenise and pack every consumed
document.

    python scripts/bench_data.py                      # ~5 min on 2 cores
    python scripts/bench_data.py --sizes 1e6,35e6 --source synthetic --skip-stream
"""

import argparse
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import write_csv
from ethos.data.hub import TextFilesDataModule
from ethos.data.sampling import StepBatchSampler
from ethos.data.text import TextDataModule
from ethos.data.tokenizer import train_tokenizer
from ethos.files import atomic_path

WORDS = ("the a of and to in is was for on that with as by at from his her it an were are which this be "
         "city river music war school film team album season game station church village player band "
         "county party army island company district league series book king family road club").split()


class RandpermSampler(StepBatchSampler):
    """The previous sampler: a fresh randperm(n) per micro-batch (the reference, same contract)."""

    def batch(self, b: int) -> list[int]:
        p, j = divmod(b, self.per_pass)
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p))
        g = self.bs * self.world
        return perm[j * g + self.rank * self.bs: j * g + (self.rank + 1) * self.bs].tolist()

    def __iter__(self):
        for b in range(self.start, self.total):
            yield [(b, i) for i in self.batch(b)]


class SyntheticBlocks(torch.utils.data.Dataset):
    """n blocks whose tokens are a cheap function of the index: a row costs the same at any n."""

    def __init__(self, n: int, seq_len: int, vocab: int):
        self.n, self.seq_len, self.vocab = n, seq_len, vocab

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": [5 + (i * 7919 + j * 104729) % (self.vocab - 5) for j in range(self.seq_len)]}


def write_arrow(path: Path, n: int, seq_len: int, vocab: int, chunk: int = 1_000_000) -> None:
    """n random blocks as one arrow stream file (fixed-size uint16 lists: no offsets to overflow)."""
    schema = pa.schema([pa.field("input_ids", pa.list_(pa.uint16(), seq_len))])
    rng = np.random.default_rng(0)
    with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as f, pa.ipc.new_stream(f, schema) as w:
        for s in tqdm(range(0, n, chunk), desc=f"write {n:,} blocks", unit="M", leave=False):
            vals = pa.array(rng.integers(5, vocab, size=min(chunk, n - s) * seq_len, dtype=np.uint16))
            w.write_batch(pa.record_batch([pa.FixedSizeListArray.from_arrays(vals, seq_len)], schema=schema))


def blocks_source(kind: str, n: int, seq_len: int, vocab: int, data_dir: Path):
    if kind == "synthetic":
        return SyntheticBlocks(n, seq_len, vocab)
    from datasets import Dataset

    path = data_dir / f"blocks_{n}_{seq_len}.arrow"
    if not path.exists():
        write_arrow(path, n, seq_len, vocab)
    return Dataset.from_file(str(path))  # memory-mapped


def choose_source(arg: str, sizes: list[int], seq_len: int, data_dir: Path) -> str:
    if arg != "auto":
        return arg
    need = sum(sizes) * seq_len * 2
    free = shutil.disk_usage(data_dir).free
    return "arrow" if free > 2 * need else "synthetic"


def text_module(tok, ds, batch_size: int, seq_len: int) -> TextDataModule:
    """The real data module with its blocks in place (no corpus to prepare)."""
    dm = TextDataModule(cache_dir=tempfile.gettempdir(), seq_len=seq_len, batch_size=batch_size)
    dm.tokenizer, dm.splits = tok, {"train": ds}
    return dm


def time_loader(dm: TextDataModule, sampler_cls, batches: int, bar, warmup: int = 2) -> float:
    """Median seconds per micro-batch of train_dataloader() with `sampler_cls` as its sampler."""
    with mock.patch("ethos.data.text.StepBatchSampler", sampler_cls):
        it = iter(dm.train_dataloader())
    for _ in range(warmup):
        next(it)
    times = []
    for _ in range(batches):
        t0 = time.perf_counter()
        next(it)
        times.append(time.perf_counter() - t0)
        bar.update()
    return statistics.median(times)


def time_sampler(sampler, batches: int) -> float:
    """Seconds per micro-batch of the sampler alone, as the loader iterates it."""
    it = iter(sampler)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return (time.perf_counter() - t0) / batches


def bench_loader(args, tok, vocab: int) -> list[dict]:
    sizes = [int(float(s)) for s in args.sizes.split(",")]
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    source = choose_source(args.source, sizes, args.seq_len, data_dir)
    print(f"part 1: blocks source = {source}" + (f" (memory-mapped arrow under {data_dir})" if source == "arrow"
                                                else " (map-style dataset computing rows from the index)"))
    rows = []
    bar = tqdm(total=len(sizes) * (args.batches + args.old_batches), desc="train loader", unit="batch")
    try:
        for n in sizes:
            bar.set_postfix_str(f"n={n:,}")
            dm = text_module(tok, blocks_source(source, n, args.seq_len, vocab, data_dir), args.batch_size,
                             args.seq_len)
            new = time_loader(dm, StepBatchSampler, args.batches, bar)
            old = time_loader(dm, RandpermSampler, args.old_batches, bar, warmup=1)
            rows.append({"n_blocks": n, "source": source, "new_ms": new * 1e3, "old_ms": old * 1e3,
                         "new_sampler_us": time_sampler(StepBatchSampler(n, args.batch_size, 10**6), 640) * 1e6,
                         "old_sampler_ms": time_sampler(RandpermSampler(n, args.batch_size, 10**6), 2) * 1e3})
    finally:
        bar.close()
        if source == "arrow" and not args.keep_data:
            for f in data_dir.glob("blocks_*.arrow"):
                f.unlink()
    for r in rows:
        r["new_vs_first"] = r["new_ms"] / rows[0]["new_ms"]
        r["old_vs_first"] = r["old_ms"] / rows[0]["old_ms"]
        r["old_over_new"] = r["old_ms"] / r["new_ms"]
    return rows


# -- part 2: streaming resume deep into the stream -------------------------------------------------------
def write_shards(root: Path, shards: int, docs: int, words: int) -> str:
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    for s in tqdm(range(shards), desc="write parquet shards", unit="shard", leave=False):
        text = [" ".join(rng.choices(WORDS, k=rng.randint(words // 2, 3 * words // 2))) + " ." for _ in range(docs)]
        pq.write_table(pa.table({"text": text}), root / f"train-{s:05d}.parquet")
    return str(root / "*.parquet")


VAL_DOCS = 100  # held out of the stream for validation


def stream_module(files: str, cache: Path, args) -> TextFilesDataModule:
    dm = TextFilesDataModule(cache_dir=str(cache), data_files=files, vocab_size=1000, tokenizer_docs=2000,
                             seq_len=args.stream_seq_len, batch_size=args.stream_batch_size, streaming=True,
                             val_docs=VAL_DOCS, shuffle_buffer=args.shuffle_buffer)
    dm.prepare_data()
    dm.setup("fit")
    # a stand-in trainer at step 0 of a run long enough to reach the target micro-batch
    dm.trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, max_steps=args.stream_steps + 10,
                                 global_rank=0, world_size=1, lightning_module=None)
    return dm


def bench_stream_resume(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="ethos_bench_stream_", dir=args.data_dir))
    try:
        # ~40 tokens a document; enough documents that micro-batch `stream_steps` lies inside the first pass,
        # after the validation documents the stream holds out
        need = args.stream_steps * args.stream_batch_size * args.stream_seq_len / 40 * 1.3 + VAL_DOCS
        shards = 8
        files = write_shards(work / "corpus", shards, int(need / shards) + 1, 36)
        dm = stream_module(files, work / "cache", args)
        dl = dm.train_dataloader()
        it = iter(dl)
        t0 = time.perf_counter()
        for _ in tqdm(range(args.stream_steps), desc="straight stream", unit="batch", mininterval=1):
            next(it)
        straight_s = time.perf_counter() - t0
        state = dl.state_dict()
        expected = next(it)
        del it
        pos = state["dataset_state"]

        t0 = time.perf_counter()
        fresh = stream_module(files, work / "cache", args)
        resumed = fresh.train_dataloader()
        resumed.load_state_dict(state)
        first = next(iter(resumed))
        resume_s = time.perf_counter() - t0
        same = first.keys() == expected.keys() and all(torch.equal(first[k], expected[k]) for k in first)

        # what the replay resume did: read, tokenise and pack every consumed block, without collating
        blocks = dl.dataset._blocks({k: v for k, v in dl.dataset.initial_state().items() if k != "b"})
        t0 = time.perf_counter()
        for _ in tqdm(range(args.stream_steps * args.stream_batch_size), desc="replay (old resume)",
                      unit="block", mininterval=1):
            next(blocks)
        replay_s = time.perf_counter() - t0
        return {"micro_batch": args.stream_steps, "batch_size": args.stream_batch_size,
                "seq_len": args.stream_seq_len, "shards": shards, "epoch": pos["epoch"], "window": pos["window"],
                "straight_s": straight_s, "resume_s": resume_s, "replay_s": replay_s, "first_batch_equal": same}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1e6,10e6,35e6", help="corpus sizes in blocks, comma list")
    ap.add_argument("--source", default="auto", choices=["auto", "arrow", "synthetic"])
    ap.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "ethos_bench_data"),
                    help="where arrow blocks and parquet shards are written (removed afterwards)")
    ap.add_argument("--keep-data", action="store_true", help="keep the arrow files for the next run")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--batches", type=int, default=300, help="timed micro-batches per size, new sampler")
    ap.add_argument("--old-batches", type=int, default=4, help="timed micro-batches per size, randperm sampler")
    ap.add_argument("--stream-steps", type=int, default=100_000)
    ap.add_argument("--stream-batch-size", type=int, default=2)
    ap.add_argument("--stream-seq-len", type=int, default=16)
    ap.add_argument("--shuffle-buffer", type=int, default=10_000)
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--out", default="bench_results", help="folder for bench_data.csv / .png")
    args = ap.parse_args()
    torch.set_num_threads(1)  # the loader runs in one process; keeps numbers stable on a shared machine
    from rich.console import Console
    from rich.table import Table

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ethos_bench_tok_") as tok_dir:
        tok = train_tokenizer([" ".join(random.Random(i).choices(WORDS, k=30)) for i in range(300)], 1000,
                              Path(tok_dir))
    rows = bench_loader(args, tok, len(tok))
    table = Table(title=f"train loader, one process, batch {args.batch_size} x {args.seq_len} tokens, MLM "
                        f"collate, median of {args.batches} (bijection) / {args.old_batches} (randperm) batches")
    first = f"x vs {rows[0]['n_blocks'] / 1e6:g}M"
    for col in ("blocks", "source", "bijection ms/batch", first, "randperm ms/batch", first + " ",
                "randperm / bijection", "sampler alone: bijection us", "randperm ms"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for r in rows:
        table.add_row(f"{r['n_blocks']:,}", r["source"], f"{r['new_ms']:.2f}", f"{r['new_vs_first']:.2f}",
                      f"{r['old_ms']:.1f}", f"{r['old_vs_first']:.1f}", f"{r['old_over_new']:.0f}",
                      f"{r['new_sampler_us']:.1f}", f"{r['old_sampler_ms']:.1f}")
    Console(width=160).print(table)
    write_csv(rows, out / "bench_data.csv")

    resume = None
    if not args.skip_stream:
        resume = bench_stream_resume(args)
        t = Table(title=f"streaming resume at micro-batch {resume['micro_batch']:,} (batch {resume['batch_size']} x "
                        f"{resume['seq_len']}, {resume['shards']} local parquet shards, one process)")
        for col in ("straight run to it s", "fresh loader to 1st batch s", "old replay resume s", "same batch"):
            t.add_column(col, justify="right")
        t.add_row(f"{resume['straight_s']:.1f}", f"{resume['resume_s']:.2f}", f"{resume['replay_s']:.1f}",
                  "yes" if resume["first_batch_equal"] else "NO")
        Console(width=160).print(t)
        write_csv([resume], out / "bench_data_resume.csv")
    _plot(rows, resume, out / "bench_data.png")
    print(f"wrote {out / 'bench_data.csv'}" + (f", {out / 'bench_data_resume.csv'}" if resume else "")
          + f" and {out / 'bench_data.png'}")
    if resume and not resume["first_batch_equal"]:
        sys.exit("streaming resume: the first resumed batch differs from the straight run's")


def _plot(rows, resume, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if resume else 1, figsize=(11 if resume else 6, 4), squeeze=False)
    ax = axes[0][0]
    n = [r["n_blocks"] for r in rows]
    ax.plot(n, [r["new_ms"] for r in rows], "o-", label="bijection sampler")
    ax.plot(n, [r["old_ms"] for r in rows], "s-", label="randperm per batch")
    ax.set(xscale="log", yscale="log", xlabel="corpus (blocks)", ylabel="train loader ms / micro-batch")
    ax.legend(fontsize=8)
    if resume:
        ax = axes[0][1]
        labels = ["fresh loader\nto 1st batch", "old replay\nresume", "straight run\nto it"]
        ax.bar(labels, [resume["resume_s"], resume["replay_s"], resume["straight_s"]])
        ax.set(yscale="log", ylabel="seconds", title=f"streaming resume at micro-batch {resume['micro_batch']:,}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
