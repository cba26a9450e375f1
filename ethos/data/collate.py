"""Blocks -> batches: right-padding with the attention mask taken from the row lengths, and the masked LM
(seeded transformers masking) and causal LM collators.

Besides input_ids, labels and attention_mask, a batch carries `bytes` (each token's UTF-8 bytes, 0 on padding:
bits per byte) when its blocks have them, and with document masking (`doc_mask`) `doc_ids` (the document of
each token, numbered 1, 2, ... within a row, padding 0) and, with `reset_positions`, `positions` (RoPE
positions restarting at 0 at every document). Document masking also keeps causal LM labels within their
document (CLMCollator). Without it, batches are as they were before document masking existed.
"""

import torch
from transformers import DataCollatorForLanguageModeling

from ethos.data.sampling import sample_seed
from ethos.data.tokenizer import special_ids
from ethos.errors import ConfigError


def pad_batch(items: list[dict], seq_len: int, pad_id: int, key: str = "input_ids", value: int | None = None):
    """Right-pad rows to seq_len; returns (tensor, attention mask from the row lengths)."""
    out = torch.full((len(items), seq_len), pad_id if value is None else value, dtype=torch.long)
    attn = torch.zeros(len(items), seq_len, dtype=torch.long)
    for r, it in enumerate(items):
        row = it[key]
        out[r, :len(row)] = torch.as_tensor(row, dtype=torch.long)
        attn[r, :len(row)] = 1
    return out, attn


def document_keys(items: list[dict], attn: torch.Tensor, doc_mask: bool,
                  reset_positions: bool) -> tuple[dict, torch.Tensor | None]:
    """The batch's `bytes`, `doc_ids` and `positions` (the module docstring), and where its documents start
    (None without doc_mask). A row without `doc_start` (blocks made elsewhere) is one document."""
    T = attn.shape[1]
    out = {"bytes": pad_batch(items, T, 0, key="bytes")[0]} if "bytes" in items[0] else {}
    if not doc_mask:
        return out, None
    start = pad_batch(items, T, 0, key="doc_start")[0] if "doc_start" in items[0] else torch.zeros_like(attn)
    start[:, 0] = 1  # a row opens with its first document
    out["doc_ids"] = start.cumsum(1) * attn  # padding: document 0
    if reset_positions:  # t minus where the token's document began; padding continues the last document's count
        t = torch.arange(T).expand_as(start)
        out["positions"] = t - torch.where(start.bool(), t, 0).cummax(1).values
    return out, start


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
                 whole_word_mask: bool = False, doc_mask: bool = True, reset_positions: bool = True):
        if tokenizer.mask_token is None:
            raise ConfigError(f"data.tokenizer={tokenizer.name_or_path!r}: has no mask token, needed for "
                              "masked LM (use task=clm or another tokenizer)")
        extra = {"mask_replace_prob": 1.0, "random_replace_prob": 0.0} if whole_word_mask else {}
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability,
                                                        whole_word_mask=whole_word_mask, return_tensors="pt",
                                                        **extra)
        self.seed, self.seq_len, self.wwm = seed, seq_len, whole_word_mask
        self.doc_mask, self.reset_positions = doc_mask, reset_positions
        self.pad = special_ids(tokenizer)[2]
        self.special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)

    def __call__(self, items: list[dict]) -> dict:
        ids, attn = pad_batch(items, self.seq_len or max(len(it["input_ids"]) for it in items), self.pad)
        docs, _ = document_keys(items, attn, self.doc_mask, self.reset_positions)  # masking is the same either way
        special = (torch.isin(ids, self.special) | (attn == 0)).long()  # == tokenizer.get_special_tokens_mask
        offsets = None
        if self.wwm:
            ws, _ = pad_batch(items, ids.shape[1], 1, key="word_start")
            start = torch.arange(ids.shape[1]) + ws.cumsum(1)  # gap before every word start
            offsets = torch.stack([start, start + 1], dim=-1)
        if items[0].get("batch_idx", -1) < 0:
            self.collator.generator = None
            inputs, labels = self.collator.torch_mask_tokens(ids.clone(), special, offsets)
            return {"input_ids": inputs, "labels": labels, "attention_mask": attn, **docs}
        inputs, labels = ids.clone(), ids.clone()
        for r, it in enumerate(items):
            pos = it.get("batch_pos", -1)
            pos = r if pos < 0 else pos  # no position: the row (= the global position on one process)
            self.collator.generator = torch.Generator().manual_seed(sample_seed(self.seed, it["batch_idx"], pos))
            row = slice(r, r + 1)
            inputs[row], labels[row] = self.collator.torch_mask_tokens(
                ids[row].clone(), special[row], None if offsets is None else offsets[row])
        return {"input_ids": inputs, "labels": labels, "attention_mask": attn, **docs}


class CLMCollator:
    """Causal LM: no masking; labels are the inputs with padding -> -100 (the loss shifts them). With document
    masking, also the label of every document's first token (but the row's) -> -100: no target is predicted
    from another document (the loss's position t - 1 would predict it from the previous document's end)."""

    def __init__(self, pad_id: int, seq_len: int | None = None, doc_mask: bool = True, reset_positions: bool = True):
        self.pad, self.seq_len = pad_id, seq_len
        self.doc_mask, self.reset_positions = doc_mask, reset_positions

    def __call__(self, items: list[dict]) -> dict:
        ids, attn = pad_batch(items, self.seq_len or max(len(it["input_ids"]) for it in items), self.pad)
        docs, start = document_keys(items, attn, self.doc_mask, self.reset_positions)
        labels = ids.masked_fill(attn == 0, -100)
        if start is not None:
            labels[:, 1:] = labels[:, 1:].masked_fill(start[:, 1:].bool(), -100)
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, **docs}
