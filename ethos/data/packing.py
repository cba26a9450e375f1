"""Documents -> blocks of token ids, for both the cached (map) and the streaming paths.

Blocks, two modes (`packing`):
  pack      documents concatenated, each ending in the separator, cut into [CLS] + (seq_len - 1)
            tokens: no padding, nothing wasted (the tail of each map batch, < one block, is dropped).
  truncate  the reference study's per-line mode: each document its own block [CLS] doc [SEP],
            truncated to seq_len; the collator pads to seq_len and the attention mask marks padding.
Rows are stored unpadded; the collator pads and derives the attention mask from the row length,
never from the pad id (a tokenizer may reuse its EOS as pad). With `words`, each block also holds the
tokenizer's word starts (`word_start`), which whole-word masking needs.

Every block also holds, per token (what document masking and bits per byte need, docs/design.md §10.3):
  doc_start  1 where a document begins. A document's separator ends it; the block's start token belongs to
             the block's first document (so a block always opens with a 1, and the token after the start
             token never does), whether that document begins in the block or continues from the one before.
  bytes      the UTF-8 bytes of the text the token covers: from its start to the next token's start in its
             document, the last token to the document's end (`token_bytes`). A document's tokens sum to its
             UTF-8 length from its first token on (leading whitespace a tokenizer skips is not counted); a
             token cut off by truncation takes its bytes with it. The separator counts SEP_BYTES = 1: it
             stands for the end of the document, as a newline would in the raw byte stream, so a byte-level
             tokenizer's bits per byte is exactly its loss / ln 2. The start token counts 0: never a target.
"""

import numpy as np
import pyarrow.compute as pc
from datasets import Dataset, Features, List, Value

from ethos.data.tokenizer import special_ids
from ethos.errors import ConfigError

SEP_BYTES, START_BYTES = 1, 0  # what the separator and the block's start token count (module docstring)
MAX_BYTES = 2**16 - 1  # bytes are stored as uint16: only a token followed by 64 KiB the tokenizer skips is clipped


def token_bytes(text: str, offsets: list[tuple[int, int]]) -> list[int]:
    """UTF-8 bytes of `text` each token covers, from the tokenizer's character offsets: from the token's start
    to the next token's start, the last token to the end of the text.

    Tokens that start in the same character (byte-level BPE splitting a multi-byte character) share that
    character's bytes evenly, the last of them also taking the rest up to the next token: exact when each
    covers one byte (a byte-level vocabulary), and the document's sum is exact whatever the split."""
    if not offsets:
        return []
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    if text.isascii():  # one byte per character
        width, at, end = None, starts, len(text)
    else:  # code points -> their UTF-8 lengths -> the byte offset of every character
        cp = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        width = 1 + (cp >= 0x80) + (cp >= 0x800) + (cp >= 0x10000)
        at = np.concatenate(([0], np.cumsum(width)))[starts]
        end = int(width.sum())
    nb = np.diff(at, append=end)
    n = len(starts)
    for i in np.flatnonzero(starts[1:] == starts[:-1]):  # token i starts in the character token i + 1 starts in
        if i > 0 and starts[i - 1] == starts[i]:
            continue  # not the first token of its run
        j = i + 1
        while j + 1 < n and starts[j + 1] == starts[i]:
            j += 1
        # tokens i..j start in one character: i..j-1 got 0 bytes, j everything up to the next token
        share = (1 if width is None else int(width[starts[i]])) // (j - i + 1)
        nb[i:j] = share
        nb[j] -= (j - i) * share
    return np.clip(nb, 0, MAX_BYTES).tolist()


def word_starts(enc, i: int) -> list[int]:
    """1 where token i begins a word (the tokenizer's pre-tokenizer words: '##' pieces continue one)."""
    wid = enc.word_ids(i)
    return [int(w is None or j == 0 or w != wid[j - 1]) for j, w in enumerate(wid)]


class Blocks:
    """Tokenise documents and cut them into blocks; used by both the cached (map) and streaming paths."""

    def __init__(self, tokenizer, seq_len: int, packing: str = "pack", words: bool = False):
        if not tokenizer.is_fast:
            raise ConfigError(f"data.tokenizer={tokenizer.name_or_path!r}: a slow (Python) tokenizer has no "
                              "character offsets, which the byte counts need; use its fast version")
        self.tok, self.seq_len, self.packing, self.words = tokenizer, seq_len, packing, words
        self.start, self.sep, self.pad = special_ids(tokenizer)

    def tokenize(self, batch: dict) -> dict:
        enc = self.tok(batch["text"], add_special_tokens=False, return_offsets_mapping=True)
        out = {"ids": enc["input_ids"], "n_tok": [len(x) for x in enc["input_ids"]],
               "nb": [token_bytes(t, o) for t, o in zip(batch["text"], enc["offset_mapping"])]}
        if self.words:
            out["ws"] = [word_starts(enc, i) for i in range(len(enc["input_ids"]))]
        return out

    def group(self, batch: dict) -> dict:
        """Tokenised documents (a batch) -> blocks; empty documents are dropped."""
        docs = [i for i, ids in enumerate(batch["ids"]) if ids]
        head = [] if self.start is None else [self.start]
        ws, nb = batch.get("ws"), batch["nb"]

        def opened(starts: list[int]) -> list[int]:
            # the start token (if any) opens the block's first document; the token after it continues it
            return [1] * len(head) + [0 if head else 1] + starts[1:]

        if self.packing == "truncate":  # [CLS] doc [SEP], cut to seq_len (the reference's per-line mode)
            body = self.seq_len - len(head) - 1
            out = {"input_ids": [head + batch["ids"][i][:body] + [self.sep] for i in docs],
                   "doc_start": [opened([1] + [0] * min(len(batch["ids"][i]), body)) for i in docs],
                   "bytes": [[START_BYTES] * len(head) + nb[i][:body] + [SEP_BYTES] for i in docs]}
            if ws is not None:
                out["word_start"] = [[1] * len(head) + ws[i][:body] + [1] for i in docs]
            return out
        body = self.seq_len - len(head)
        flat = [t for i in docs for t in batch["ids"][i] + [self.sep]]
        n = len(flat) // body * body  # the tail of each map batch (< one block) is dropped
        cuts = range(0, n, body)
        starts = [s for i in docs for s in [1] + [0] * len(batch["ids"][i])]  # the separator ends its document
        fbytes = [b for i in docs for b in nb[i] + [SEP_BYTES]]
        out = {"input_ids": [head + flat[c:c + body] for c in cuts],
               "doc_start": [opened(starts[c:c + body]) for c in cuts],
               "bytes": [[START_BYTES] * len(head) + fbytes[c:c + body] for c in cuts]}
        if ws is not None:
            wflat = [w for i in docs for w in ws[i] + [1]]
            out["word_start"] = [[1] * len(head) + wflat[c:c + body] for c in cuts]
        return out


def pack(ds: Dataset, tokenizer, seq_len: int, num_proc: int | None = None, packing: str = "pack",
         words: bool = False) -> tuple[Dataset, dict]:
    """Documents -> blocks (see the module docstring), plus the counts for the data-stats log."""
    blocks = Blocks(tokenizer, seq_len, packing, words)
    # narrow types: the byte counts and flags add 3 bytes per token to the 4 of its id
    ids, flag, nbytes = List(Value("int32")), List(Value("uint8")), List(Value("uint16"))
    tokenized = Features({"ids": ids, "n_tok": Value("int64"), "nb": nbytes, **({"ws": flag} if words else {})})
    grouped = Features({"input_ids": ids, "doc_start": flag, "bytes": nbytes,
                        **({"word_start": flag} if words else {})})
    ds = ds.map(blocks.tokenize, batched=True, remove_columns=ds.column_names, num_proc=num_proc, desc="tokenize",
                features=tokenized)
    n_tok = np.asarray(ds["n_tok"], dtype=np.int64)
    ds = ds.remove_columns("n_tok")
    out = ds.map(blocks.group, batched=True, batch_size=2000, remove_columns=ds.column_names,
                 num_proc=num_proc, desc=packing, features=grouped)
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
