"""Text data: documents -> tokenizer (pretrained or trained here) -> blocks -> MLM or CLM batches.

Subclasses of `TextDataModule` only say where documents come from (`load_documents`); tokenisation,
packing, caching, splitting, streaming and masking are done here and in the modules this one uses
(tokenizer.py, packing.py, collate.py, streaming.py), so every text source behaves the same. This module
holds the data module itself: the cache (one entry per `fingerprint`), the splits and the loaders.
"""

import hashlib
import json
import logging
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
from datasets import DatasetDict, load_from_disk
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from ethos.data.collate import CLMCollator, MLMCollator
from ethos.data.packing import Blocks, pack
from ethos.data.sampling import EvalBatchSampler, Indexed, StepBatchSampler, run_position
from ethos.data.streaming import StreamBlocks, StreamLoader
from ethos.data.tokenizer import special_ids, train_tokenizer
from ethos.errors import ConfigError
from ethos.types import Ge, NonNegativeInt, OpenUnit, PositiveInt

log = logging.getLogger(__name__)


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
                 mlm_probability: OpenUnit = 0.15, whole_word_mask: bool = False, doc_mask: bool = True,
                 reset_positions: bool = True, streaming: bool = False, val_docs: PositiveInt = 1000,
                 shuffle_buffer: PositiveInt = 10_000, num_workers: NonNegativeInt = 0,
                 num_proc: PositiveInt | None = None, seed: int = 0):
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
        # batches only (collate.py), not the cache: every block stores where its documents start
        self.doc_mask, self.reset_positions = doc_mask, reset_positions
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
        else:  # the stored blocks' columns: 2 = + doc_start and bytes (packing.py); older caches are rebuilt
            fp["layout"] = 2
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

    def task(self):
        return self.trainer.lightning_module if self.trainer is not None else None

    def objective(self) -> str:
        """The task says what batches it needs (CausalLM sets `objective = "clm"`); default masked LM."""
        return getattr(self.task(), "objective", "mlm")

    def collate(self):
        if hasattr(self.task(), "collator"):  # the prompt objectives lay batches out themselves (data/prompts.py)
            return self.task().collator(self)
        docs = {"doc_mask": self.doc_mask, "reset_positions": self.reset_positions}
        if self.objective() == "clm":
            return CLMCollator(self.pad_id, self.seq_len, **docs)
        return MLMCollator(self.tokenizer, self.mlm_probability, self.seed, self.seq_len, self.whole_word_mask, **docs)

    def _stream(self, split: str, **kw) -> StreamBlocks:
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
