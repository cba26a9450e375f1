"""Text pipeline: documents -> tokenizer (pretrained or trained here) -> blocks -> MLM or CLM batches.

Subclasses only say where documents come from (`load_documents`); tokenisation, packing, caching,
splitting, streaming and masking live here so every text source behaves the same.

Blocks, two modes (`packing`):
  pack      documents concatenated, each ending in the separator, cut into [CLS] + (seq_len - 1)
            tokens: no padding, nothing wasted (the tail of each map batch, < one block, is dropped).
  truncate  the reference study's per-line mode: each document its own block [CLS] doc [SEP],
            truncated to seq_len; the collator pads to seq_len and the attention mask marks padding.
Rows are stored unpadded; the collator pads and derives the attention mask from the row length,
never from the pad id (a tokenizer may reuse its EOS as pad).
"""

import copy
import hashlib
import itertools
import json
import logging
import warnings
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Dataset, DatasetDict, IterableDataset, load_from_disk
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from ethos.data.sampling import EvalBatchSampler, Indexed, StepBatchSampler, run_position, sample_seed
from ethos.errors import ConfigError
from ethos.types import Ge, NonNegativeInt, OpenUnit, PositiveInt

log = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(texts, vocab_size: int, path: Path, kind: str = "wordpiece") -> PreTrainedTokenizerFast:
    """BERT-uncased-style WordPiece, or byte-level BPE, trained with HF `tokenizers` and saved as a
    transformers tokenizer. Both get the same BERT special tokens, so MLM and CLM work with either."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if kind == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    else:  # byte-level BPE (GPT-2 style): no unknown tokens, case kept
        tok = Tokenizer(models.BPE(unk_token="[UNK]"))
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    return fast


def special_ids(tokenizer) -> tuple[int | None, int, int]:
    """(block start, document separator, pad): BERT's [CLS]/[SEP]/[PAD], else BOS/EOS (GPT-2 style)."""
    start = tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    if sep is None:
        raise ConfigError(f"data.tokenizer={tokenizer.name_or_path!r}: has neither a SEP nor an EOS token "
                          "to separate documents")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep  # masked by length, not id
    return start, sep, pad


def word_starts(enc, i: int) -> list[int]:
    """1 where token i begins a word (the tokenizer's pre-tokenizer words: '##' pieces continue one)."""
    wid = enc.word_ids(i)
    return [int(w is None or j == 0 or w != wid[j - 1]) for j, w in enumerate(wid)]


class Blocks:
    """Tokenise documents and cut them into blocks; used by both the cached (map) and streaming paths."""

    def __init__(self, tokenizer, seq_len: int, packing: str = "pack", words: bool = False):
        self.tok, self.seq_len, self.packing, self.words = tokenizer, seq_len, packing, words
        self.start, self.sep, self.pad = special_ids(tokenizer)

    def tokenize(self, batch: dict) -> dict:
        enc = self.tok(batch["text"], add_special_tokens=False)
        out = {"ids": enc["input_ids"], "n_tok": [len(x) for x in enc["input_ids"]]}
        if self.words:
            out["ws"] = [word_starts(enc, i) for i in range(len(enc["input_ids"]))]
        return out

    def group(self, batch: dict) -> dict:
        """Tokenised documents (a batch) -> blocks; empty documents are dropped."""
        docs = [i for i, ids in enumerate(batch["ids"]) if ids]
        head = [] if self.start is None else [self.start]
        ws = batch.get("ws")
        if self.packing == "truncate":  # [CLS] doc [SEP], cut to seq_len (the reference's per-line mode)
            body = self.seq_len - len(head) - 1
            out = {"input_ids": [head + batch["ids"][i][:body] + [self.sep] for i in docs]}
            if ws is not None:
                out["word_start"] = [[1] * len(head) + ws[i][:body] + [1] for i in docs]
            return out
        body = self.seq_len - len(head)
        flat = [t for i in docs for t in batch["ids"][i] + [self.sep]]
        n = len(flat) // body * body  # the tail of each map batch (< one block) is dropped
        out = {"input_ids": [head + flat[i:i + body] for i in range(0, n, body)]}
        if ws is not None:
            wflat = [w for i in docs for w in ws[i] + [1]]
            out["word_start"] = [[1] * len(head) + wflat[i:i + body] for i in range(0, n, body)]
        return out


def pack(ds: Dataset, tokenizer, seq_len: int, num_proc: int | None = None, packing: str = "pack",
         words: bool = False) -> tuple[Dataset, dict]:
    """Documents -> blocks (see the module docstring), plus the counts for the data-stats log."""
    blocks = Blocks(tokenizer, seq_len, packing, words)
    ds = ds.map(blocks.tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize")
    n_tok = np.asarray(ds["n_tok"], dtype=np.int64)
    ds = ds.remove_columns("n_tok")
    out = ds.map(blocks.group, batched=True, batch_size=2000, remove_columns=ds.column_names,
                 num_proc=num_proc, desc=packing)
    if packing == "truncate":  # row lengths straight from the arrow column (no Python lists)
        real = int(pc.sum(pc.list_value_length(out.data.column("input_ids"))).as_py() or 0)
    else:
        real = len(out) * seq_len
    stats = {"documents": int((n_tok > 0).sum()), "empty_documents": int((n_tok == 0).sum()),
             "tokens": int(n_tok.sum()), "blocks": len(out), "block_tokens": real,
             "padding": 1 - real / max(1, len(out) * seq_len)}
    if packing == "truncate":  # tokens cut off by the per-line truncation
        stats["truncated_tokens"] = int(np.maximum(0, n_tok - (seq_len - 2)).sum())
    return out, stats


def pad_batch(items: list[dict], seq_len: int, pad_id: int, key: str = "input_ids", value: int | None = None):
    """Right-pad rows to seq_len; returns (tensor, attention mask from the row lengths)."""
    out = torch.full((len(items), seq_len), pad_id if value is None else value, dtype=torch.long)
    attn = torch.zeros(len(items), seq_len, dtype=torch.long)
    for r, it in enumerate(items):
        row = it[key]
        out[r, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        attn[r, :len(row)] = 1
    return out, attn


class MLMCollator:
    """transformers' MLM masking (15%, 80/10/10), one row at a time, each seeded by (seed, micro-batch
    id, position in the global batch): resumed runs match exactly, ranks draw different masks, and any
    world size masks a sample as one process would (ethos/data/sampling.py). Items without a batch id
    (no sampler of ours) are masked from the global RNG.

    whole_word_mask: all pieces of a word are masked together (BERT's WWM). transformers 5 finds
    words from `offset_mapping` (a new word where a token does not start at the previous token's
    end); we store the tokenizer's own word starts with each block and hand the collator offsets
    built from them (gap before each word start), which also works across packed documents. With
    WWM transformers replaces every chosen token by [MASK] (no 10% random / 10% kept).
    """

    def __init__(self, tokenizer, mlm_probability: float = 0.15, seed: int = 0, seq_len: int | None = None,
                 whole_word_mask: bool = False):
        if tokenizer.mask_token is None:
            raise ConfigError(f"data.tokenizer={tokenizer.name_or_path!r}: has no mask token, needed for "
                              "masked LM (use task=clm or another tokenizer)")
        extra = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                                        whole_word_mask=whole_word_mask, return_tensors="pt",
                                                        **extra)
        self.seed, self.seq_len, self.wwm = seed, seq_len, whole_word_mask
        self.pad = special_ids(tokenizer)[2]
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, items: list[dict]) -> dict:
        ids, attn = pad_batch(items, self.seq_len or max(len(it["input_ids"]) for it in items), self.pad)
        special = (torch.isin(ids, self.special) | (attn == 0)).long()  # == tokenizer.get_special_tokens_mask
        offsets = None
        if self.wwm:
            ws, _ = pad_batch(items, ids.shape[1], 1, key="word_start")
            start = torch.arange(ids.shape[1]) + ws.cumsum(1)  # gap before every word start
            offsets = torch.stack([start, start + 1], dim=-1)
        if items[0].get("batch_idx", -1) < 0:
            self.collator.generator = None
            inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special, offsets)
            return {"input_ids": inputs, "labels": labels, "attention_mask": attn}
        inputs, labels = ids.clone(), ids.clone()
        for r, it in enumerate(items):
            pos = it.get("batch_pos", -1)
            pos = r if pos < 0 else pos  # no position: the row (= the global position on one process)
            self.collator.generator = torch.Generator().manual_seed(sample_seed(self.seed, it["batch_idx"], pos))
            row = slice(r, r + 1)
            inputs[row], labels[row] = self.collator.torch_mask_tokens(
                ids[row].clone(), special[row], None if offsets is None else offsets[row])
        return {"input_ids": inputs, "labels": labels, "attention_mask": attn}


class CLMCollator:
    """Causal LM: no masking; labels are the inputs with padding -> -100 (the loss shifts them)."""

    def __init__(self, pad_id: int, seq_len: int | None = None):
        self.pad, self.seq_len = pad_id, seq_len

    def __call__(self, items: list[dict]) -> dict:
        ids, attn = pad_batch(items, self.seq_len or max(len(it["input_ids"]) for it in items), self.pad)
        return {"input_ids": ids, "labels": ids.masked_fill(attn == 0, -100), "attention_mask": attn}


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


class TextDataModule(L.LightningDataModule):
    """Base for text data. Subclasses implement `load_documents(streaming)` -> DatasetDict with 'text'
    (an IterableDatasetDict when streaming); a 'validation' split is held out when missing."""

    modality = "text"
    supports_streaming = False

    def __init__(self, cache_dir: str, tokenizer: str | None = None,
                 tokenizer_type: Literal["wordpiece", "bpe"] = "wordpiece", vocab_size: PositiveInt = 8192,
                 tokenizer_docs: PositiveInt | None = None, seq_len: Annotated[int, Ge(8)] = 128,
                 packing: Literal["pack", "truncate"] = "pack", batch_size: PositiveInt = 32,
                 eval_batch_size: PositiveInt | None = None, val_fraction: OpenUnit = 0.05,
                 mlm_probability: OpenUnit = 0.15, whole_word_mask: bool = False, streaming: bool = False,
                 val_docs: PositiveInt = 1000, shuffle_buffer: PositiveInt = 10_000,
                 num_workers: NonNegativeInt = 0, num_proc: PositiveInt | None = None, seed: int = 0):
        super().__init__()
        if streaming and not self.supports_streaming:
            raise ConfigError(f"data.streaming=true: {type(self).__name__} has no streaming path (set false)")
        if streaming and num_workers > 1:
            raise ConfigError(f"data.num_workers={num_workers}: streaming reads one ordered stream (whose "
                              "position a checkpoint stores); valid are 0 and 1")
        self.cache_dir, self.tokenizer_name, self.vocab_size_cfg = Path(cache_dir), tokenizer, vocab_size
        self.tokenizer_type, self.tokenizer_docs = tokenizer_type, tokenizer_docs
        self.seq_len, self.packing, self.batch_size = seq_len, packing, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.mlm_probability, self.whole_word_mask = val_fraction, mlm_probability, whole_word_mask
        self.streaming, self.val_docs, self.shuffle_buffer = streaming, val_docs, shuffle_buffer
        self.num_workers, self.num_proc, self.seed = num_workers, num_proc, seed
        self.tokenizer = None
        self.splits: DatasetDict | None = None
        self.stats: dict = {}
        self._saved_beside_run = False

    # -- subclasses --------------------------------------------------------------------------
    def load_documents(self, streaming: bool = False) -> DatasetDict:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What determines the cached data; a change makes a new cache entry."""
        fp = {"source": type(self).__name__, "tokenizer": self.tokenizer_name,
              "vocab_size": self.vocab_size_cfg, "seq_len": self.seq_len,
              "val_fraction": self.val_fraction, "seed": self.seed}
        # options added later enter only when not at their default, so existing caches stay valid
        for k, default in (("tokenizer_type", "wordpiece"), ("tokenizer_docs", None), ("packing", "pack"),
                           ("whole_word_mask", False)):
            if getattr(self, k) != default:
                fp[k] = getattr(self, k)
        if self.streaming:
            fp["streaming"], fp["val_docs"] = True, self.val_docs
        return fp

    # -- pipeline ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        key = hashlib.sha1(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]
        return self.cache_dir / key

    def _tokenizer(self, docs=None):
        path = self.data_dir / "tokenizer"
        if self.tokenizer_name:
            return AutoTokenizer.from_pretrained(self.tokenizer_name)
        if (path / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        limit = self.tokenizer_docs or (100_000 if self.streaming else None)
        log.info(f"training a {self.tokenizer_type} tokenizer (vocab {self.vocab_size_cfg}, "
                 f"{limit or 'all'} documents) -> {path}")
        train = docs["train"]
        if self.streaming:
            texts = (row["text"] for row in train.take(limit))
        else:
            texts = (t for t in (train if limit is None else train.select(range(min(limit, len(train)))))["text"])
        return train_tokenizer(texts, self.vocab_size_cfg, path, self.tokenizer_type)

    def _split(self, docs):
        docs = {k: docs[k] for k in ("train", "validation") if k in docs}  # a 'test' split stays unseen
        if "validation" in docs:
            return docs
        if self.streaming:  # size unknown: the first val_docs documents are held out
            return {"train": docs["train"].skip(self.val_docs), "validation": docs["train"].take(self.val_docs)}
        split = docs["train"].train_test_split(test_size=self.val_fraction, seed=self.seed)
        return {"train": split["train"], "validation": split["test"]}

    def prepare_data(self) -> None:
        if self.streaming:  # only the tokenizer is prepared; blocks are made on the fly
            if not self.tokenizer_name and not (self.data_dir / "tokenizer" / "tokenizer.json").exists():
                self._tokenizer(self._split(self.load_documents(streaming=True)))
            return
        if (self.data_dir / "blocks" / "dataset_dict.json").exists():
            return
        docs = self._split(self.load_documents())
        tok = self._tokenizer(docs)
        blocks, stats = {}, {}
        for k, v in docs.items():
            blocks[k], stats[k] = pack(v, tok, self.seq_len, self.num_proc, self.packing, self.whole_word_mask)
        DatasetDict(blocks).save_to_disk(str(self.data_dir / "blocks"))
        (self.data_dir / "stats.json").write_text(json.dumps(stats, indent=1))

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = self._tokenizer()
            if self.streaming:
                self.splits = self._split(self.load_documents(streaming=True))
                pad = "0.0%" if self.packing == "pack" else "unknown (measured per batch)"
                log.info(f"data (streaming): documents, tokens and blocks unknown until read; blocks of "
                         f"{self.seq_len}, padding {pad}")
            else:
                self.splits = load_from_disk(str(self.data_dir / "blocks"))
                self.stats = json.loads((self.data_dir / "stats.json").read_text())
                for k, s in self.stats.items():
                    log.info(self.describe(k, s))
        self._save_tokenizer_beside_run()

    def describe(self, split: str, s: dict) -> str:
        msg = (f"data {split}: {s['documents']} documents ({s.get('empty_documents', 0)} empty, skipped), "
               f"{s['tokens']} tokens, {s['blocks']} blocks of {self.seq_len} ({self.packing}), "
               f"padding {100 * s.get('padding', 0.0):.1f}%")
        if s.get("truncated_tokens"):
            msg += f", {s['truncated_tokens']} tokens cut by truncation"
        return msg

    def _save_tokenizer_beside_run(self) -> None:
        """The run directory gets its own copy of the tokenizer (the cache copy stays for reuse)."""
        t = self.trainer
        if self._saved_beside_run or t is None or not getattr(t, "default_root_dir", None):
            return
        if t.global_rank == 0:
            self.tokenizer.save_pretrained(str(Path(t.default_root_dir) / "tokenizer"))
        self._saved_beside_run = True

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return special_ids(self.tokenizer)[2]

    def task_kwargs(self) -> dict:
        """What the task needs to know about the data to build its model."""
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id}

    def objective(self) -> str:
        """The task says what batches it needs (CausalLM sets `objective = "clm"`); default masked LM."""
        task = self.trainer.lightning_module if self.trainer is not None else None
        return getattr(task, "objective", "mlm")

    def collate(self):
        if self.objective() == "clm":
            return CLMCollator(self.pad_id, self.seq_len)
        return MLMCollator(self.tokenizer, self.mlm_probability, self.seed, self.seq_len, self.whole_word_mask)

    def _stream(self, split: str, **kw) -> StreamBlocks:
        from datasets.distributed import split_dataset_by_node

        pos = run_position(self.trainer)
        docs = self.splits[split]
        if pos["world_size"] > 1:
            docs = split_dataset_by_node(docs, rank=pos["rank"], world_size=pos["world_size"])
        blocks = Blocks(self.tokenizer, self.seq_len, self.packing, self.whole_word_mask)
        return StreamBlocks(docs, blocks, self.collate(), seed=self.seed, rank=pos["rank"], **kw)

    def train_dataloader(self) -> DataLoader:
        pos = run_position(self.trainer)
        if self.streaming:
            ds = self._stream("train", batch_size=self.batch_size, total=pos["total"], start=pos["start"],
                              window=self.shuffle_buffer, shuffle=True)
            return StreamLoader(ds, self.num_workers, pos["rank"], pos["world_size"])
        sampler = StepBatchSampler(len(self.splits["train"]), self.batch_size, pos["total"], seed=self.seed,
                                   start=pos["start"], rank=pos["rank"], world_size=pos["world_size"])
        return DataLoader(Indexed(self.splits["train"]), batch_sampler=sampler, collate_fn=self.collate(),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        if self.streaming:
            ds = self._stream("validation", batch_size=self.eval_batch_size, id_offset=EvalBatchSampler.OFFSET)
            return DataLoader(ds, batch_size=None, num_workers=self.num_workers)
        pos = run_position(self.trainer)
        sampler = EvalBatchSampler(len(self.splits["validation"]), self.eval_batch_size, pos["rank"],
                                   pos["world_size"])
        return DataLoader(Indexed(self.splits["validation"]), batch_sampler=sampler,
                          collate_fn=self.collate(), num_workers=self.num_workers)
