"""Batches of the prompt objectives (ethos/data/prompts.py, ethos/data/spans.py): span corruption restores the
original text exactly, sentinels and document boundaries included; prefix splits, the prefix's own losses, the
mixture's sampling and the encoder–decoder's two rows, each checked against the blocks they came from."""

import random

import pytest
import torch
from datasets import Dataset
from test_docs_data import DOCS

from ethos.data import spans
from ethos.data.packing import pack
from ethos.data.prompts import PARADIGMS, PromptCollator, PromptTokens
from ethos.data.tokenizer import train_tokenizer

T = 48


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return train_tokenizer(DOCS * 50, 200, tmp_path_factory.mktemp("wp"))


@pytest.fixture(scope="module")
def blocks(tok) -> list[dict]:
    """Packed blocks of documents of 1 to 40 words: several documents per row, some cut by the block."""
    rng = random.Random(0)
    words = " ".join(DOCS).split()
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(120)]
    ds, _ = pack(Dataset.from_dict({"text": docs}), tok, T)
    return [{**dict(r), "batch_idx": 5, "batch_pos": i} for i, r in enumerate(ds)][:16]


def collator(tok, paradigms, modes=False, sentinels=0, **kw) -> PromptCollator:
    tokens = PromptTokens.build(len(tok), kw.get("prefix_loss") == "mlm", modes, sentinels)
    return PromptCollator(tok, tokens, T, paradigms, **kw)


def documents(item: dict) -> list[list[int]]:
    ids, start = item["input_ids"], item["doc_start"]
    cuts = [i for i, s in enumerate(start) if s or i == 0] + [len(ids)]
    return [ids[a:b] for a, b in zip(cuts, cuts[1:])]


def row_documents(batch: dict, r: int) -> list[list[int]]:
    ids, doc = batch["input_ids"][r].tolist(), batch["doc_ids"][r].tolist()
    return [[t for t, d in zip(ids, doc) if d == i] for i in range(1, max(doc) + 1)]


# -- span corruption ------------------------------------------------------------------------------------
def test_partitions_and_counts_follow_t5():
    g = torch.Generator().manual_seed(0)
    for total, parts in [(1, 1), (5, 1), (5, 5), (30, 7)]:
        for _ in range(20):
            p = spans.partition(total, parts, g)
            assert len(p) == parts and sum(p) == total and min(p) >= 1
    assert spans.span_counts(100, 0.15, 3.0) == (15, 5)  # T5's defaults: 15% noise in spans of mean 3
    assert spans.span_counts(2, 0.15, 3.0) == (1, 1)
    for n in range(2, 60):
        cut = spans.corrupt(n, 0.15, 3.0, g)
        assert cut[0][0] >= 1 and all(a < b <= c for (a, b), (c, _) in zip(cut, cut[1:])) and cut[-1][1] <= n


def test_apply_and_restore_by_hand():
    sentinels = [100, 101, 102]
    inp, tgt, inp_at, tgt_at = spans.apply(list("abcdefgh"), [(1, 3), (5, 7)], sentinels)
    assert inp == ["a", 100, "d", "e", 101, "h"] and tgt == [100, "b", "c", 101, "f", "g"]
    assert inp_at == [0, -1, 3, 4, -1, 7] and tgt_at == [-1, 1, 2, -1, 5, 6]
    assert spans.restore(inp, tgt, sentinels) == list("abcdefgh")
    with pytest.raises(ValueError):
        spans.restore(inp, ["b"], sentinels)


@pytest.mark.parametrize("modes", [False, True])
def test_span_corruption_restores_every_row(tok, blocks, modes):
    """From the batch alone (ids, document ids, prefix spans): every document of every row, restored, is the
    block's document (the row's last possibly cut at its end, the block's start token replaced by the mode
    token), the sentinels of its input are those of its targets in the same order, and the documents are
    the block's, in order."""
    c = collator(tok, {"span": 1.0}, modes=modes, sentinels=20)
    b = c(blocks)
    sentinels, modes_ = c.tokens.sentinels, c.tokens.modes
    n_span = 0
    for r, item in enumerate(blocks):
        want = documents(item)
        if modes and want[0][0] == tok.cls_token_id:
            want[0] = want[0][1:]
        got = row_documents(b, r)
        prefix = b["prefix"][r].tolist()
        doc = b["doc_ids"][r].tolist()
        assert 1 <= len(got) <= len(want)
        for i, ids in enumerate(got):
            if int(b["paradigm"][r][b["doc_ids"][r] == i + 1][0]) != PARADIGMS.index("span"):
                # too short to corrupt (under 2 tokens, or the room left at the row's end): laid out causally
                assert len(want[i]) < 2 or i == len(got) - 1, (r, i)
                if modes:
                    assert ids[0] == modes_["clm"]
                    ids = ids[1:]
                assert ids == want[i][:len(ids)]
                continue
            n_span += 1
            k = sum(1 for p, d in zip(prefix, doc) if d == i + 1 and p)
            inp, tgt = ids[:k], ids[k:]
            if modes:
                assert inp[0] == modes_["span"]
                inp = inp[1:]
            assert [t for t in inp if t in sentinels] == [t for t in tgt if t in sentinels] == \
                sentinels[:sum(t in sentinels for t in tgt)]
            restored = spans.restore(inp, tgt, sentinels)
            if i < len(got) - 1:
                assert restored == want[i], (r, i)
            else:  # the row's last document: cut where the row is full
                assert restored == want[i][:len(restored)] and len(restored) >= 2
            # labels: every target token (sentinels too), nothing in the corrupted input
            lab = [t for t, d in zip(b["labels"][r].tolist(), doc) if d == i + 1]
            assert lab[:k] == [-100] * k and lab[k:] == tgt
        assert b["attention_mask"][r].sum() >= T - 2 * 3 - 2  # rows stay nearly full
    assert n_span > 2 * len(blocks)


# -- prefix-LM ------------------------------------------------------------------------------------------
def test_prefix_splits_and_labels(tok, blocks):
    c = collator(tok, {"prefix": 1.0}, prefix_range=(0.25, 0.75))
    b = c(blocks)
    assert torch.equal(b["input_ids"], torch.tensor([it["input_ids"] for it in blocks]))  # no token changes
    fractions = []
    for r, item in enumerate(blocks):
        doc, prefix, labels = b["doc_ids"][r], b["prefix"][r], b["labels"][r]
        for i, ids in enumerate(documents(item), 1):
            at = (doc == i).nonzero().flatten()
            k = int((prefix[at] == i).sum())
            assert torch.equal(prefix[at], torch.where(torch.arange(len(at)) < k, i, 0))  # its first k tokens
            n = len(ids)
            if n >= 2:
                assert 1 <= k <= n - 1
                fractions.append(k / n)
                assert (0.25 * n - 0.5 <= k <= 0.75 * n + 0.5) or k in (1, n - 1)
            else:
                assert k == 0
            # targets: the continuation (with a token before it in the document); never a prefix token
            want = [-100 if j < max(k, 1) else t for j, t in enumerate(ids)]
            assert labels[at].tolist() == want, (r, i)
    assert min(fractions) < 0.4 and max(fractions) > 0.6  # the range is used, not one point


def test_prefix_at_a_separator(tok):
    sep = "hello"
    sid = tok.convert_tokens_to_ids(sep)
    item = {"input_ids": [tok.cls_token_id, 5, 6, sid, 7, 8, tok.sep_token_id, 9, 10, tok.sep_token_id],
            "doc_start": [1, 0, 0, 0, 0, 0, 0, 1, 0, 0], "bytes": [0] + [1] * 9}
    b = collator(tok, {"prefix": 1.0}, prefix_sep=sep)([item])
    assert b["prefix"][0, :10].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # up to and including "hello"
    # the second document has no "hello": no prefix, and its first token is no target
    assert b["labels"][0, :10].tolist() == [-100] * 4 + [7, 8, tok.sep_token_id, -100, 10, tok.sep_token_id]


def test_prefix_mlm_and_clm_losses(tok, blocks):
    mlm = collator(tok, {"prefix": 1.0}, prefix_loss="mlm", mlm_probability=0.5)(blocks)
    plain = collator(tok, {"prefix": 1.0})(blocks)
    masked = mlm["mlm_labels"] != -100
    assert masked.sum() > 10
    assert torch.all(mlm["prefix"][masked] > 0)  # prefix tokens only
    assert torch.all(mlm["input_ids"][masked] == len(tok))  # the model's own mask id, past the tokenizer's
    assert torch.equal(mlm["mlm_labels"][masked], plain["input_ids"][masked])
    assert torch.equal(mlm["input_ids"][~masked], plain["input_ids"][~masked])
    assert torch.equal(mlm["labels"], plain["labels"])

    clm = collator(tok, {"prefix": 1.0}, prefix_loss="clm")(blocks)
    assert torch.equal(clm["labels"], plain["labels"])
    pl = clm["prefix_labels"]
    # every prefix token with a token before it in its document, and nothing else
    prev_same = torch.zeros_like(clm["doc_ids"], dtype=torch.bool)
    prev_same[:, 1:] = clm["doc_ids"][:, 1:] == clm["doc_ids"][:, :-1]
    want = (clm["prefix"] > 0) & prev_same
    assert torch.equal(pl != -100, want) and torch.equal(pl[want], clm["input_ids"][want])


# -- the mixture ----------------------------------------------------------------------------------------
def test_mixture_samples_per_document_reproducibly(tok, blocks):
    c = collator(tok, {"clm": 1.0, "prefix": 1.0, "span": 1.0}, modes=True, sentinels=20)
    b = c(blocks)
    assert torch.equal(b["input_ids"], c(blocks)["input_ids"])  # seeded by (seed, batch id, position)
    other = c([{**it, "batch_idx": 6} for it in blocks])
    assert not torch.equal(b["input_ids"], other["input_ids"])
    first = c(blocks[:1])  # a sample comes out the same alone as in its batch
    assert torch.equal(first["input_ids"][0], b["input_ids"][0])
    seen = set()
    for r in range(len(blocks)):
        for i, ids in enumerate(row_documents(b, r)):
            p = int(b["paradigm"][r][b["doc_ids"][r] == i + 1][0])
            seen.add(p)
            assert ids[0] == c.tokens.modes[PARADIGMS[p]]  # every document opens with its mode token
            lab = b["labels"][r][b["doc_ids"][r] == i + 1].tolist()
            if PARADIGMS[p] == "clm":  # every token but the mode token is a target
                assert lab == [-100] + ids[1:]
    assert seen == {0, 1, 2}
    assert c.tokens.extra == 3 + 20 and min(c.tokens.modes.values()) == len(tok)


# -- encoder–decoder ------------------------------------------------------------------------------------
@pytest.mark.parametrize("paradigm", ["prefix", "span"])
def test_encoder_decoder_rows(tok, blocks, paradigm):
    """The encoder row holds each document's prefix (or corrupted input), the decoder row a start token and its
    continuation (or targets); together they are the decoder-only layout of the same sample."""
    kw = dict(modes=False, sentinels=20 if paradigm == "span" else 0)
    b = collator(tok, {paradigm: 1.0}, seq2seq=True, **kw)(blocks)
    assert b["input_ids"].shape == b["enc_input_ids"].shape == (len(blocks), T)
    for r in range(len(blocks)):
        enc = [[t for t, d in zip(b["enc_input_ids"][r].tolist(), b["enc_doc_ids"][r].tolist()) if d == i]
               for i in range(1, int(b["dec_doc_ids"][r].max()) + 1)]
        dec = [[t for t, d in zip(b["input_ids"][r].tolist(), b["dec_doc_ids"][r].tolist()) if d == i]
               for i in range(1, int(b["dec_doc_ids"][r].max()) + 1)]
        want = documents(blocks[r])
        for i, (e, d) in enumerate(zip(enc, dec)):
            assert d[0] == tok.cls_token_id  # the decoder's start token
            lab = b["labels"][r][b["dec_doc_ids"][r] == i + 1].tolist()
            assert lab == [-100] + d[1:]
            if int(b["paradigm"][r][b["dec_doc_ids"][r] == i + 1][0]) == PARADIGMS.index("clm"):
                assert e == [] and len(want[i]) < 2 or i == len(enc) - 1  # too short to split: decoder only
                whole = e + d[1:]
            elif paradigm == "span":
                whole = spans.restore(e, d[1:], list(range(len(tok), len(tok) + 20)))
            else:
                whole = e + d[1:]
            assert whole == want[i][:len(whole)] and (i == len(enc) - 1 or whole == want[i])
