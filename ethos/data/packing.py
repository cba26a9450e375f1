"""Documents -> blocks of token ids, for both the cached (map) and the streaming paths.

Blocks, two modes (`packing`):
  pack      documents concatenated, each ending in the separator, cut into [CLS] + (seq_len - 1)
            tokens: no padding, nothing wasted (the tail of each map batch, < one block, is dropped).
  truncate  the reference study's per-line mode: each document its own block [CLS] doc [SEP],
            truncated to seq_len; the collator pads to seq_len and the attention mask marks padding.
Rows are stored unpadded; the collator pads and derives the attention mask from the row length,
never from the pad id (a tokenizer may reuse its EOS as pad). With `words`, each block also holds the
tokenizer's word starts (`word_start`), which whole-word masking needs.
"""

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset

from ethos.data.tokenizer import special_ids


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
