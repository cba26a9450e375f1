"""Batches for the prompt objectives (docs/design.md §12): prefix-LM, the mixture of denoisers, encoder–decoder.

Every packed document of a row is laid out anew by the paradigm sampled for it (weights `paradigms`):
  clm     the document as it is, every token a next-token target.
  prefix  split at a prefix boundary: its first k tokens (k / n uniform in `prefix_range`, at least one token on
          each side; or, with `prefix_sep`, up to and including the first separator token, no prefix without
          one) attend bidirectionally among themselves (`prefix`: the span ids of ethos.models.scores.Docs);
          the continuation is the target.
  span    T5 span corruption (ethos/data/spans.py): the corrupted document is the prefix, the sentinels and
          the spans behind them are the continuation.
A target needs a token before it in its document (one at the row's start, or, with document masking, a
document's first token, is not predicted), so with `mode_tokens` (UL2's paradigm tokens) each document opens
with the token of its paradigm, which replaces the block's start token and lets its first token be predicted.
A document grows by its mode token and 2 per span; what no longer fits is cut from the row's end (a span
document is corrupted anew at the length that fits, so its targets are whole); a row that comes out shorter
than seq_len is padded.

The prefix's own loss (`prefix_loss`): `none`; `mlm`: `mlm_probability` of the prefix tokens become the mask
token and are predicted at their own position, under the prefix's bidirectional attention (`mlm_labels`; GLM);
`clm`: the prefix tokens are also predicted by a second, causal pass (`prefix_labels`).

Sampling is seeded per sample by (seed, micro-batch id, position in the global batch), like the MLM masks
(ethos/data/sampling.py): a resumed run, and any world size, lays out every sample as one process would.
Ids past the tokenizer's vocabulary (`PromptTokens`: a mask token of our own, the mode tokens, the sentinels) are
the model's: its vocabulary is the tokenizer's plus `PromptTokens.extra`.
"""

from dataclasses import dataclass, field

import torch

from ethos.data import spans
from ethos.data.collate import document_keys, pad_batch
from ethos.data.sampling import sample_seed
from ethos.data.tokenizer import special_ids
from ethos.errors import ConfigError

PARADIGMS = ("clm", "prefix", "span")


@dataclass(frozen=True)
class PromptTokens:
    """The ids an objective adds after the tokenizer's `vocab` ids (module docstring)."""

    vocab: int
    mask: int
    modes: dict[str, int] = field(default_factory=dict)
    sentinels: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, vocab: int, mask: bool, modes: bool, n_sentinels: int) -> "PromptTokens":
        """A mask token of the model's own (whatever the tokenizer has: the layout is the same for every
        tokenizer), a mode token per paradigm, and n_sentinels sentinels, as asked; -1: not asked."""
        nxt = vocab + int(mask)
        mode_ids = {p: nxt + i for i, p in enumerate(PARADIGMS)} if modes else {}
        nxt += len(mode_ids)
        return cls(vocab, vocab if mask else -1, mode_ids, list(range(nxt, nxt + n_sentinels)))

    @property
    def extra(self) -> int:
        return int(self.mask >= 0) + len(self.modes) + len(self.sentinels)

    def names(self) -> dict[int, str]:
        """How the extra ids read (decoding)."""
        out = {s: f"<extra_id_{i}>" for i, s in enumerate(self.sentinels)}
        out.update({v: f"[{p.upper()}]" for p, v in self.modes.items()})
        if self.mask >= 0:
            out[self.mask] = "[MASK]"
        return out


@dataclass
class Piece:
    """One document laid out: ids, bytes, and per token whether it is in the prefix, a next-token target,
    a prefix token the causal pass predicts, and its masked-token label (-100: none)."""

    ids: list[int]
    bytes: list[int]
    prefix: list[bool]
    target: list[bool]
    prefix_target: list[bool]
    mlm: list[int]
    paradigm: int


def block_documents(item: dict) -> list[tuple[list[int], list[int]]]:
    """A block's documents as (token ids, bytes), cut where `doc_start` marks one (a block without it: one)."""
    ids, nb = list(item["input_ids"]), list(item.get("bytes") or [0] * len(item["input_ids"]))
    start = list(item.get("doc_start") or [1] + [0] * (len(ids) - 1))
    cuts = [i for i, s in enumerate(start) if s or i == 0] + [len(ids)]
    return [(ids[a:b], nb[a:b]) for a, b in zip(cuts, cuts[1:])]


def split_point(n: int, lo: float, hi: float, g: torch.Generator) -> int:
    """k prefix tokens of n, k / n uniform in [lo, hi], at least one token on each side (0 when n < 2)."""
    if n < 2:
        return 0
    u = lo + (hi - lo) * float(torch.rand((), generator=g, dtype=torch.float64))
    return min(max(1, round(u * n)), n - 1)


def sep_point(ids: list[int], sep: int) -> int:
    """Up to and including the first `sep` (a prompt/response separator); 0 when there is none."""
    return ids.index(sep) + 1 if sep in ids else 0


class PromptCollator:
    def __init__(self, tokenizer, tokens: PromptTokens, seq_len: int, paradigms: dict[str, float],
                 prefix_range: tuple[float, float] = (0.25, 0.75), prefix_sep: str | None = None,
                 prefix_loss: str = "none", mlm_probability: float = 0.15, span_density: float = 0.15,
                 span_mean: float = 3.0, seed: int = 0, doc_mask: bool = True, reset_positions: bool = True,
                 seq2seq: bool = False):
        if len(tokenizer) != tokens.vocab:
            raise ValueError(f"the model's extra ids start at {tokens.vocab}, but the tokenizer has {len(tokenizer)}")
        if prefix_loss == "mlm" and tokens.mask < 0:
            raise ValueError("prefix_loss=mlm needs a mask id (PromptTokens.build(mask=True))")
        if "span" in paradigms and paradigms["span"] > 0 and not tokens.sentinels:
            raise ValueError("span corruption needs sentinels (PromptTokens.build(n_sentinels > 0))")
        self.tokens, self.seq_len = tokens, seq_len
        self.names = [p for p in PARADIGMS if paradigms.get(p, 0) > 0]
        self.weights = torch.tensor([float(paradigms[p]) for p in self.names], dtype=torch.float64)
        self.lo, self.hi = prefix_range
        self.sep = tokenizer.convert_tokens_to_ids(prefix_sep) if prefix_sep is not None else None
        if prefix_sep is not None and (self.sep is None or self.sep == tokenizer.unk_token_id):
            raise ConfigError(f"task.prefix_sep={prefix_sep!r}: not a token of the tokenizer "
                              f"{tokenizer.name_or_path or '(trained here)'}")
        self.prefix_loss, self.mlm_p = prefix_loss, mlm_probability
        self.density, self.mean = span_density, span_mean
        self.seed, self.doc_mask, self.reset_positions, self.seq2seq = seed, doc_mask, reset_positions, seq2seq
        self.start, self.eos, self.pad = special_ids(tokenizer)
        # the encoder–decoder's decoder opens each document with a start token of its own (T5's shifted targets)
        self.dec_start = self.start if self.start is not None else self.eos

    # ---------------------------------------------------------------- one document
    def piece(self, ids: list[int], nbytes: list[int], paradigm: str, budget: int, g: torch.Generator,
              masks: torch.Generator, first: bool) -> Piece | None:
        """The document laid out by `paradigm` in at most `budget` tokens (None: nothing fits). `first`: it
        opens the row, so it holds the block's start token, which a mode token replaces. `masks` draws the
        MLM masks: a stream of its own, so the splits do not depend on prefix_loss."""
        mode = [self.tokens.modes[paradigm]] if paradigm in self.tokens.modes else []
        if first and mode and ids and ids[0] == self.start:
            ids, nbytes = ids[1:], nbytes[1:]
        room = budget - len(mode)
        if room < 1:
            return None
        if paradigm == "span":
            n = min(len(ids), room)
            while n >= 2 and n + 2 * spans.span_counts(n, self.density, self.mean)[1] > room:
                n -= 1
            if n < 2:  # too short to corrupt: laid out causally
                return self.piece(ids, nbytes, "clm", budget, g, masks, first=False)
            cut = spans.corrupt(n, self.density, self.mean, g)
            inp, tgt, inp_at, tgt_at = spans.apply(ids[:n], cut, self.tokens.sentinels)
            k = len(mode) + len(inp)
            out_ids = mode + inp + tgt
            out_bytes = [0] * k + [nbytes[i] if i >= 0 else 0 for i in tgt_at]
        else:
            k = 0
            if paradigm == "prefix":  # drawn on the whole document, then cut to the room
                k = sep_point(ids, self.sep) if self.sep is not None else split_point(len(ids), self.lo, self.hi, g)
            ids, nbytes = ids[:room], nbytes[:room]
            k = len(mode) + min(k, len(ids)) if paradigm == "prefix" else 0
            out_ids, out_bytes = mode + ids, [0] * len(mode) + nbytes
        L = len(out_ids)
        prefix = [i < k for i in range(L)]
        target = [i >= k and i >= len(mode) for i in range(L)]  # no loss on the mode token or the prefix
        if paradigm == "clm":
            target = [i >= len(mode) for i in range(L)]
        prefix_target = [False] * L
        mlm = [-100] * L
        if k and paradigm == "prefix":
            if self.prefix_loss == "clm":
                prefix_target = [len(mode) <= i < k for i in range(L)]
            elif self.prefix_loss == "mlm":
                pick = torch.rand(k, generator=masks) < self.mlm_p
                for i in range(len(mode), k):
                    if pick[i] and out_ids[i] != self.start:
                        mlm[i], out_ids[i] = out_ids[i], self.tokens.mask
        return Piece(out_ids, out_bytes, prefix, target, prefix_target, mlm, PARADIGMS.index(paradigm))

    # ---------------------------------------------------------------- one row
    def row(self, item: dict, g: torch.Generator) -> list[Piece]:
        pieces, used = [], 0
        masks = torch.Generator().manual_seed(g.initial_seed() ^ 1)
        extra = int(self.seq2seq)  # the decoder's start token of each document: both rows then fit seq_len
        for d, (ids, nb) in enumerate(block_documents(item)):
            paradigm = self.names[int(torch.multinomial(self.weights, 1, generator=g))]
            p = self.piece(ids, nb, paradigm, self.seq_len - used - extra, g, masks, first=d == 0)
            if p is None:
                break
            pieces.append(p)
            used += len(p.ids) + extra
            if used >= self.seq_len:
                break
        return pieces

    def generator(self, item: dict, r: int) -> torch.Generator:
        if item.get("batch_idx", -1) < 0:  # no sampler of ours: the global RNG, as MLMCollator
            return torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        pos = item.get("batch_pos", -1)
        return torch.Generator().manual_seed(sample_seed(self.seed, item["batch_idx"], r if pos < 0 else pos))

    def __call__(self, items: list[dict]) -> dict:
        rows = [self.row(it, self.generator(it, r)) for r, it in enumerate(items)]
        if self.seq2seq:
            return self.encoder_decoder(rows)
        return self.decoder_only(rows)

    def decoder_only(self, rows: list[list[Piece]]) -> dict:
        flat = []
        for pieces in rows:
            cat = {k: sum((getattr(p, k) for p in pieces), []) for k in ("ids", "bytes", "prefix", "target",
                                                                          "prefix_target", "mlm")}
            cat["doc_start"] = sum(([1] + [0] * (len(p.ids) - 1) for p in pieces), [])
            cat["span"] = sum(([d if f else 0 for f in p.prefix] for d, p in enumerate(pieces, 1)), [])
            cat["paradigm"] = sum(([p.paradigm] * len(p.ids) for p in pieces), [])
            cat["input_ids"] = cat.pop("ids")
            flat.append(cat)
        batch = self.batch(flat)
        T = self.seq_len
        batch["prefix"] = pad_batch(flat, T, 0, key="span")[0]
        batch["paradigm"] = pad_batch(flat, T, -1, key="paradigm")[0]
        if self.prefix_loss == "mlm":
            batch["mlm_labels"] = pad_batch(flat, T, -100, key="mlm")[0]
        if self.prefix_loss == "clm":
            keep = pad_batch(flat, T, 0, key="prefix_target")[0].bool() & (batch["labels"] != -100)
            ids = batch["input_ids"]
            # the causal pass reads the unmasked document: its labels are the token ids themselves
            batch["prefix_labels"] = torch.where(keep, ids, -100)
            batch["labels"] = batch["labels"].masked_fill(keep, -100)
        return batch

    def batch(self, flat: list[dict]) -> dict:
        """input_ids, labels (targets with a token before them in their document), attention_mask, bytes and the
        document keys of ethos/data/collate.py, for rows laid out as `flat`."""
        ids, attn = pad_batch(flat, self.seq_len, self.pad)
        docs, _ = document_keys(flat, attn, self.doc_mask, self.reset_positions)
        start = pad_batch(flat, self.seq_len, 0, key="doc_start")[0]
        target = pad_batch(flat, self.seq_len, 0, key="target")[0].bool() | pad_batch(
            flat, self.seq_len, 0, key="prefix_target")[0].bool()
        target[:, 0] = False
        if self.doc_mask:
            target &= ~start.bool()
        labels = ids.masked_fill(~target, -100)
        if "bytes" not in docs:
            docs["bytes"] = pad_batch(flat, self.seq_len, 0, key="bytes")[0]
        return {"input_ids": ids, "labels": labels, "attention_mask": attn, **docs}

    def encoder_decoder(self, rows: list[list[Piece]]) -> dict:
        """Each document's prefix (a span document: its corrupted input) goes to the encoder row and its
        continuation, after a start token, to the decoder row; `enc_doc_ids` and the decoder's `doc_ids` pair
        them for cross-attention."""
        enc, dec = [], []
        for pieces in rows:
            e = {"input_ids": [], "doc_start": [], "bytes": [], "doc": []}
            d = {"input_ids": [], "doc_start": [], "bytes": [], "target": [], "prefix_target": [], "doc": [],
                 "paradigm": []}
            for i, p in enumerate(pieces, 1):
                k = sum(p.prefix)
                e["input_ids"] += p.ids[:k]
                e["doc_start"] += [1] + [0] * (k - 1) if k else []
                e["bytes"] += p.bytes[:k]
                e["doc"] += [i] * k
                rest = len(p.ids) - k
                d["input_ids"] += [self.dec_start] + p.ids[k:]
                d["doc_start"] += [1] + [0] * rest
                d["bytes"] += [0] + p.bytes[k:]
                d["target"] += [False] + [True] * rest
                d["prefix_target"] += [False] * (rest + 1)
                d["doc"] += [i] * (rest + 1)
                d["paradigm"] += [p.paradigm] * (rest + 1)
            enc.append(e)
            dec.append(d)
        T = self.seq_len
        batch = self.batch(dec)
        enc_ids, enc_attn = pad_batch(enc, self.seq_len, self.pad)
        enc_docs, _ = document_keys(enc, enc_attn, self.doc_mask, self.reset_positions)
        batch.update(enc_input_ids=enc_ids, enc_attention_mask=enc_attn,
                     enc_doc_ids=pad_batch(enc, self.seq_len, 0, key="doc")[0],
                     dec_doc_ids=pad_batch(dec, T, 0, key="doc")[0],
                     paradigm=pad_batch(dec, T, -1, key="paradigm")[0])
        if "positions" in enc_docs:
            batch["enc_positions"] = enc_docs["positions"]
        return batch
