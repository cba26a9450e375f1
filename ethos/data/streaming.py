"""Streaming text: documents tokenised and packed on the fly into collated batches (`StreamBlocks`), and
the train loader whose checkpointed state is the stream position (`StreamLoader`)."""

import copy
import itertools
import logging
import warnings

import numpy as np
import torch
from datasets import IterableDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ethos.data.packing import Blocks
from ethos.errors import ConfigError

log = logging.getLogger(__name__)


class StreamBlocks(torch.utils.data.IterableDataset):
    """Streaming: tokenise + pack on the fly and yield whole collated batches; resumable by seeking.

    Documents are read `window` at a time; a train window is shuffled by a permutation seeded by
    (seed, epoch, window index), then tokenised and packed `doc_batch` documents at a time (the tail
    of each doc batch, < one block, is dropped). Micro-batch b is the b-th run of `batch_size`
    consecutive blocks, masked with seed b as in the cached path. Passes repeat until `total`
    micro-batches (train), or the stream is read once (evaluation, `total=None`). Under DDP each rank
    reads its own shards, so its rows take positions rank * batch_size + row of the global batch
    (masks differ across ranks; the data itself depends on the world size, unlike the cached path).

    `state_dict()` is the position after the last yielded micro-batch: b, the epoch, the reader's
    (HF IterableDataset) state at the start of the current window, the window's index, the doc batch
    within it and how many of its blocks were emitted. A resume therefore re-reads one window and
    re-tokenises one doc batch, whatever the step. HF's own `shuffle` is not used: its buffer is not
    part of its state, so a resume from it would not be exact. One ordered stream: 0 or 1 workers.
    """

    def __init__(self, docs: IterableDataset, blocks: Blocks, collate, batch_size: int, total: int | None = None,
                 id_offset: int = 0, window: int = 10_000, shuffle: bool = False, seed: int = 0,
                 doc_batch: int = 256, start: int = 0, rank: int = 0):
        # our own copy: HF keeps a reader's position in its (shared) iterable objects, so reading the
        # validation split (a `take` of the same files) in between would move this stream's position
        self.docs = copy.deepcopy(docs)
        self.blocks, self.collate, self.bs = blocks, collate, batch_size
        self.total, self.id_offset, self.window, self.shuffle = total, id_offset, window, shuffle
        self.seed, self.doc_batch, self.start, self.rank = seed, doc_batch, start, rank
        self._resume: dict | None = None
        self._state: dict | None = None

    def __len__(self) -> int:
        # the whole run, as the map-style sampler: with a length, Lightning does not fetch a batch
        # ahead, so the state it saves with a checkpoint is the one after the last trained batch
        if self.total is None:
            raise TypeError("an evaluation stream has no length until read")
        return self.total

    @staticmethod
    def initial_state() -> dict:
        return {"b": 0, "epoch": 0, "reader": None, "window": 0, "doc_batch": 0, "block": 0}

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state or self._resume or self.initial_state())

    def load_state_dict(self, state: dict) -> None:
        self._resume = copy.deepcopy(state)

    def _windows(self, reader: dict | None):
        """Windows of documents from a reader position (None: the first document)."""
        self.docs.load_state_dict(reader)  # None clears a position loaded for an earlier pass
        return self.docs.iter(self.window)

    def _order(self, texts: list[str], epoch: int, window: int) -> list[str]:
        if not self.shuffle:
            return texts
        perm = np.random.default_rng([self.seed, epoch, window]).permutation(len(texts))
        return [texts[i] for i in perm]

    def _blocks(self, pos: dict):
        """Blocks from position `pos` on; `pos` is kept pointing just after the last yielded block."""
        while True:
            from_start, got = pos["reader"] is None and pos["doc_batch"] == pos["block"] == 0, False
            for window in self._windows(pos["reader"]):
                after = self.docs.state_dict()  # the reader's position after this window
                texts = self._order(window["text"], pos["epoch"], pos["window"])
                for i in range(pos["doc_batch"], -(-len(texts) // self.doc_batch)):
                    chunk = texts[i * self.doc_batch:(i + 1) * self.doc_batch]
                    grouped = self.blocks.group(self.blocks.tokenize({"text": chunk}))
                    for j in range(pos["block"], len(grouped["input_ids"])):
                        pos["doc_batch"], pos["block"], got = i, j + 1, True
                        yield {k: v[j] for k, v in grouped.items()}
                    pos["doc_batch"], pos["block"] = i + 1, 0
                pos.update(reader=after, window=pos["window"] + 1, doc_batch=0, block=0)
            if self.total is None or (from_start and not got):  # evaluation: one pass; an empty stream: stop
                return
            pos.update(epoch=pos["epoch"] + 1, reader=None, window=0, doc_batch=0, block=0)

    def __iter__(self):
        if self._resume is None and self.start > 0:
            log.warning(f"streaming resume at micro-batch {self.start} without a saved stream position (a "
                        "checkpoint from before resumable streaming?): the stream restarts at its beginning")
        pos = copy.deepcopy(self._resume or self.initial_state())  # each iteration starts there
        self._state = dict(pos)
        b = pos.pop("b")
        blocks = self._blocks(pos)
        while self.total is None or b < self.total:
            items = list(itertools.islice(blocks, self.bs))
            if len(items) < self.bs:
                if items and self.total is None:  # evaluation keeps the last partial batch
                    yield self.collate(self._keyed(items, b))
                return
            self._state = {**pos, "b": b + 1}  # set before the yield: a loader saves it right after
            yield self.collate(self._keyed(items, b))
            b += 1

    def _keyed(self, items: list[dict], b: int) -> list[dict]:
        first = self.rank * self.bs  # this rank's rows in the global batch
        return [{**it, "batch_idx": self.id_offset + b, "batch_pos": first + r} for r, it in enumerate(items)]


class StreamLoader(StatefulDataLoader):
    """The streaming train loader. Lightning saves its state_dict() with each checkpoint and loads it
    before iterating. Under DDP each rank reads its own shards but only rank 0's checkpoint is written,
    so the state holds every rank's position (gathered: all ranks save checkpoints together)."""

    def __init__(self, ds: StreamBlocks, num_workers: int = 0, rank: int = 0, world_size: int = 1):
        with warnings.catch_warnings():  # torchdata 0.11 calls a torch API that torch 2.14 deprecates
            warnings.filterwarnings("ignore", message="'set_vital' is deprecated")
            super().__init__(ds, batch_size=None, num_workers=num_workers)
        self.rank, self.world_size = rank, world_size

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.world_size == 1:
            return state
        ranks = [None] * self.world_size
        torch.distributed.all_gather_object(ranks, state)
        return {"ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:
            if len(state["ranks"]) != self.world_size:
                raise ConfigError(f"data.streaming=true: the checkpoint holds the stream positions of "
                                  f"{len(state['ranks'])} processes, this run has {self.world_size}; a stream "
                                  "split by process resumes exactly only on as many processes")
            state = state["ranks"][self.rank]
        super().load_state_dict(state)
