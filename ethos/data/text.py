"""Text pipeline: documents -> tokenizer (pretrained or trained here) -> packed blocks -> MLM batches.

Subclasses only say where documents come from (`load_documents`); tokenisation, packing, caching,
splitting and masking live here so every text source behaves the same.
"""

import hashlib
import json
import logging
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, DatasetDict, load_from_disk
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, DataCollatorForLanguageModeling, PreTrainedTokenizerFast

from ethos.data.sampling import EvalBatchSampler, Indexed, StepBatchSampler
from ethos.errors import ConfigError

log = logging.getLogger(__name__)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts, vocab_size: int, path: Path) -> PreTrainedTokenizerFast:
    """BERT-uncased-style WordPiece trained with HF `tokenizers`, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(path))
    return fast


def pack(ds: Dataset, tokenizer, seq_len: int, num_proc: int | None = None) -> Dataset:
    """Concatenate documents (each ending in [SEP]) and cut into [CLS] + (seq_len - 1) tokens: no padding."""
    sep, cls, body = tokenizer.sep_token_id, tokenizer.cls_token_id, seq_len - 1

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"ids": [x + [sep] for x in ids if x]}

    def group(batch):
        flat = [t for ids in batch["ids"] for t in ids]
        n = len(flat) // body * body  # the tail of each map batch (< one block) is dropped
        return {"input_ids": [[cls] + flat[i:i + body] for i in range(0, n, body)]}

    cols = ds.column_names
    ds = ds.map(tokenize, batched=True, remove_columns=cols, num_proc=num_proc, desc="tokenize")
    return ds.map(group, batched=True, batch_size=2000, remove_columns=["ids"], num_proc=num_proc, desc="pack")


class MLMCollator:
    """transformers' MLM masking (15%, 80/10/10), seeded per batch id so resumed runs match exactly."""

    def __init__(self, tokenizer, mlm_probability: float = 0.15, seed: int = 0):
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                                        return_tensors="pt")
        self.seed = seed

    def __call__(self, items: list[dict]) -> dict:
        b = items[0].get("batch_idx", -1)
        if b >= 0:
            self.collator.generator = torch.Generator().manual_seed(hash((self.seed, b)) & ((1 << 62) - 1))
        ids = torch.tensor([it["input_ids"] for it in items], dtype=torch.long)
        out = self.collator.torch_mask_tokens(ids.clone())
        attn = (ids != self.collator.tokenizer.pad_token_id).long()
        return {"input_ids": out[0], "labels": out[1], "attention_mask": attn}


class TextDataModule(L.LightningDataModule):
    """Base for masked-LM text data. Subclasses implement `load_documents` -> DatasetDict('text')."""

    modality = "text"

    def __init__(self, cache_dir: str, tokenizer: str | None = None, vocab_size: int = 8192,
                 seq_len: int = 128, batch_size: int = 32, eval_batch_size: int | None = None,
                 val_fraction: float = 0.05, mlm_probability: float = 0.15, num_workers: int = 0,
                 num_proc: int | None = None, seed: int = 0):
        super().__init__()
        if seq_len < 8:
            raise ConfigError(f"data.seq_len={seq_len}: must be at least 8")
        if not 0 < mlm_probability < 1:
            raise ConfigError(f"data.mlm_probability={mlm_probability}: must be in (0, 1)")
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
        if batch_size < 1:
            raise ConfigError(f"data.batch_size={batch_size}: must be a positive integer")
        self.cache_dir, self.tokenizer_name, self.vocab_size_cfg = Path(cache_dir), tokenizer, vocab_size
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.mlm_probability = val_fraction, mlm_probability
        self.num_workers, self.num_proc, self.seed = num_workers, num_proc, seed
        self.tokenizer = None
        self.splits: DatasetDict | None = None

    # -- subclasses --------------------------------------------------------------------------
    def load_documents(self) -> DatasetDict:
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """What determines the cached data; a change makes a new cache entry."""
        return {"source": type(self).__name__, "tokenizer": self.tokenizer_name,
                "vocab_size": self.vocab_size_cfg, "seq_len": self.seq_len,
                "val_fraction": self.val_fraction, "seed": self.seed}

    # -- pipeline ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        key = hashlib.sha1(json.dumps(self.fingerprint(), sort_keys=True).encode()).hexdigest()[:10]
        return self.cache_dir / key

    def _tokenizer(self, docs: DatasetDict | None):
        path = self.data_dir / "tokenizer"
        if self.tokenizer_name:
            return AutoTokenizer.from_pretrained(self.tokenizer_name)
        if (path / "tokenizer.json").exists():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        log.info(f"training a WordPiece tokenizer (vocab {self.vocab_size_cfg}) -> {path}")
        texts = (t for t in docs["train"]["text"])
        return train_wordpiece(texts, self.vocab_size_cfg, path)

    def prepare_data(self) -> None:
        if (self.data_dir / "blocks" / "dataset_dict.json").exists():
            return
        docs = self.load_documents()
        if "validation" not in docs:
            split = docs["train"].train_test_split(test_size=self.val_fraction, seed=self.seed)
            docs = DatasetDict(train=split["train"], validation=split["test"])
        tok = self._tokenizer(docs)
        blocks = DatasetDict({k: pack(v, tok, self.seq_len, self.num_proc) for k, v in docs.items()})
        stats = {k: {"documents": len(docs[k]), "blocks": len(blocks[k]),
                     "tokens": len(blocks[k]) * self.seq_len} for k in blocks}
        blocks.save_to_disk(str(self.data_dir / "blocks"))
        (self.data_dir / "stats.json").write_text(json.dumps(stats, indent=1))

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        self.tokenizer = self._tokenizer(None)
        self.splits = load_from_disk(str(self.data_dir / "blocks"))
        stats = json.loads((self.data_dir / "stats.json").read_text())
        for k, s in stats.items():
            log.info(f"data {k}: {s['documents']} documents, {s['tokens']} tokens, {s['blocks']} blocks "
                     f"of {self.seq_len}, padding 0.0%")
        self.stats = stats

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def task_kwargs(self) -> dict:
        """What the task needs to know about the data to build its model."""
        return {"vocab_size": self.vocab_size, "pad_id": self.pad_id}

    def collate(self):
        return MLMCollator(self.tokenizer, self.mlm_probability, self.seed)

    def _rank(self) -> tuple[int, int]:
        t = self.trainer
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        t = self.trainer
        accum = t.accumulate_grad_batches if t is not None else 1
        max_steps = t.max_steps if t is not None and t.max_steps > 0 else 1000
        start = t.global_step * accum if t is not None else 0  # restored global step on resume
        rank, world = self._rank()
        sampler = StepBatchSampler(len(self.splits["train"]), self.batch_size, max_steps * accum,
                                   seed=self.seed, start=start, rank=rank, world_size=world)
        return DataLoader(Indexed(self.splits["train"]), batch_sampler=sampler, collate_fn=self.collate(),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank()
        sampler = EvalBatchSampler(len(self.splits["validation"]), self.eval_batch_size, rank, world)
        return DataLoader(Indexed(self.splits["validation"]), batch_sampler=sampler,
                          collate_fn=self.collate(), num_workers=self.num_workers)
