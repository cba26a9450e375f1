"""Document masking, the data side, and bits per byte: each block's document starts and per-token UTF-8 byte
counts (cached and streaming paths alike), the batches' doc_ids / positions / labels, val/bpb against a hand
computation, and a packed, document-masked causal LM loss equal to each document's loss run alone."""

import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from hydra.utils import get_class
from omegaconf import OmegaConf
from test_clm import tiny_decoder
from test_text_data import sentences
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from ethos.config import CONF_DIR
from ethos.data.collate import CLMCollator, MLMCollator
from ethos.data.hub import TextFilesDataModule
from ethos.data.packing import Blocks, pack, token_bytes
from ethos.data.streaming import StreamBlocks
from ethos.data.text import TextDataModule
from ethos.data.tokenizer import SPECIAL, train_tokenizer
from ethos.optim import OptimConfig
from ethos.tasks.clm import CausalLM
from ethos.tasks.mlm import MaskedLM

LN2 = math.log(2)
# non-ASCII on purpose: é and ï are 2 UTF-8 bytes, the emoji 4; leading and trailing whitespace
DOCS = ["the café is naïve 😀 ok", "  hello naïve world  ", "ok", "😀 the café 😀", "world hello the ok café"]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A vocabulary of the 256 bytes (GPT-2's printable stand-ins) plus BERT's specials, no merges: every
    non-special token covers exactly one byte of the text."""
    tok = Tokenizer(models.BPE(vocab={**{s: i for i, s in enumerate(SPECIAL)},
                                      **{c: len(SPECIAL) + i for i, c in enumerate(sorted(
                                          pre_tokenizers.ByteLevel.alphabet()))}},
                               merges=[], unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    """Trained on DOCS many times over: every word of DOCS is one token."""
    return train_tokenizer(DOCS * 50, 200, tmp_path_factory.mktemp("wp"))


@pytest.fixture(scope="module")
def bytes_tok():
    return byte_level_tokenizer()


def slice_bytes(text: str, offsets) -> list[int]:
    """The rule written out on the string: the text from a token's start to the next one's (the last: to the end)."""
    starts = [s for s, _ in offsets] + [len(text)]
    return [len(text[a:b].encode("utf-8")) for a, b in zip(starts, starts[1:])]


def rows_of(ds) -> list[dict]:
    return [dict(r) for r in ds]


# -- per-token byte counts ------------------------------------------------------------------------
def test_byte_counts_equal_a_hand_count_of_the_text(wordpiece, bytes_tok):
    enc = wordpiece(DOCS[0], add_special_tokens=False, return_offsets_mapping=True)
    assert wordpiece.convert_ids_to_tokens(enc["input_ids"]) == ["the", "cafe", "is", "naive", "😀", "ok"]
    # "the " 4, "café " 5 + 1 (é), "is " 3, "naïve " 6 + 1 (ï), "😀 " 1 + 4, "ok" 2
    assert token_bytes(DOCS[0], enc["offset_mapping"]) == [4, 6, 3, 7, 5, 2]
    enc = wordpiece(DOCS[1], add_special_tokens=False, return_offsets_mapping=True)
    assert token_bytes(DOCS[1], enc["offset_mapping"]) == [6, 7, 7]  # leading spaces skipped, trailing kept
    for doc in DOCS:
        enc = wordpiece(doc, add_special_tokens=False, return_offsets_mapping=True)
        nb = token_bytes(doc, enc["offset_mapping"])
        assert nb == slice_bytes(doc, enc["offset_mapping"])
        assert sum(nb) == len(doc.lstrip().encode("utf-8"))
    # byte level: one token per byte, although é's two tokens (and the emoji's four) share a character offset
    enc = bytes_tok("é😀 a", add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) == 8 and enc["offset_mapping"][:2] == [(0, 1), (0, 1)]
    assert token_bytes("é😀 a", enc["offset_mapping"]) == [1] * 8
    for doc in DOCS:
        enc = bytes_tok(doc, add_special_tokens=False, return_offsets_mapping=True)
        assert token_bytes(doc, enc["offset_mapping"]) == [1] * len(doc.encode("utf-8"))


def doc_bytes(tok, doc: str) -> list[int]:
    enc = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
    return slice_bytes(doc, enc["offset_mapping"])


def test_truncated_blocks_carry_their_documents_bytes(wordpiece):
    """[CLS] doc [SEP]: the start token 0 bytes, the separator 1; a cut document's tokens keep their own."""
    seq_len = 6  # room for 4 tokens: DOCS[0] (6 tokens) and DOCS[3] are cut
    blocks, _ = pack(Dataset.from_dict({"text": DOCS}), wordpiece, seq_len, packing="truncate")
    assert len(blocks) == len(DOCS)
    for doc, row in zip(DOCS, rows_of(blocks)):
        n = len(row["input_ids"]) - 2
        assert row["bytes"] == [0] + doc_bytes(wordpiece, doc)[:n] + [1]
        assert row["doc_start"] == [1] + [0] * (n + 1)  # [CLS] opens its document
    assert rows_of(blocks)[0]["bytes"] == [0, 4, 6, 3, 7, 1]  # "the café is naïve" of DOCS[0], cut


def test_packed_blocks_mark_document_starts_and_bytes(wordpiece):
    seq_len = 8
    docs = DOCS * 3
    blocks, _ = pack(Dataset.from_dict({"text": docs}), wordpiece, seq_len)
    rows = rows_of(blocks)
    # the stream the blocks are cut from: each document's bytes, then its separator's 1
    stream = [b for d in docs for b in doc_bytes(wordpiece, d) + [1]]
    starts = [s for d in docs for s in [1] + [0] * len(doc_bytes(wordpiece, d))]
    body = [b for r in rows for b in r["bytes"][1:]]
    assert all(r["bytes"][0] == 0 for r in rows) and body == stream[:len(body)]
    for k, r in enumerate(rows):
        cut = starts[k * (seq_len - 1):(k + 1) * (seq_len - 1)]
        assert r["doc_start"] == [1, 0] + cut[1:]  # [CLS] belongs to the block's first document
    # by hand: the first block is [CLS] the café is naïve 😀 ok [SEP]; the second starts "hello naïve world"
    assert rows[0]["bytes"] == [0, 4, 6, 3, 7, 5, 2, 1] and rows[0]["doc_start"] == [1, 0, 0, 0, 0, 0, 0, 0]
    assert rows[1]["bytes"][:5] == [0, 6, 7, 7, 1] and rows[1]["doc_start"][:6] == [1, 0, 0, 0, 0, 1]
    assert sum(stream) == sum(len(d.lstrip().encode("utf-8")) + 1 for d in docs)


@pytest.mark.parametrize("packing", ["pack", "truncate"])
def test_streaming_blocks_equal_the_cached_ones(wordpiece, packing):
    docs = DOCS * 20 + sentences(100)
    cached, _ = pack(Dataset.from_dict({"text": docs}), wordpiece, 12, packing=packing)
    stream = StreamBlocks(Dataset.from_dict({"text": docs}).to_iterable_dataset(), Blocks(wordpiece, 12, packing),
                          lambda items: items, batch_size=1, window=10_000, doc_batch=2000)
    streamed = [{k: v for k, v in it.items() if k not in ("batch_idx", "batch_pos")} for (it,) in stream]
    assert streamed == rows_of(cached) and set(streamed[0]) == {"input_ids", "doc_start", "bytes"}


# -- batches: doc_ids, positions, labels ---------------------------------------------------------------
def reference_docs(doc_start: list[int], n: int, T: int) -> tuple[list[int], list[int]]:
    """doc ids and positions of one row, counted token by token."""
    ids, pos, d, p = [], [], 0, -1
    for t in range(T):
        if t < n and doc_start[t]:
            d, p = d + 1, -1
        p += 1
        ids.append(d if t < n else 0)
        pos.append(p)
    return ids, pos


def test_a_packed_batch_keeps_targets_and_positions_within_documents(wordpiece):
    blocks, _ = pack(Dataset.from_dict({"text": DOCS * 4}), wordpiece, 10)
    short, _ = pack(Dataset.from_dict({"text": DOCS[2:3]}), wordpiece, 10, packing="truncate")
    items = rows_of(blocks)[:5] + rows_of(short)  # a padded row too: [CLS] ok [SEP]
    T = 10
    b = CLMCollator(wordpiece.pad_token_id, T)(items)
    assert set(b) == {"input_ids", "labels", "attention_mask", "bytes", "doc_ids", "positions"}
    n_starts = 0
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids, pos = reference_docs(it["doc_start"], n, T)
        assert b["doc_ids"][r].tolist() == ids and b["positions"][r].tolist() == pos
        assert b["bytes"][r].tolist() == it["bytes"] + [0] * (T - n)
        for t in range(T):
            first = t > 0 and t < n and it["doc_start"][t]  # a document's first token: never a target
            want = -100 if t >= n or first else it["input_ids"][t]
            assert b["labels"][r, t] == want, (r, t)
            n_starts += first
    assert n_starts >= 3  # several documents begin inside blocks
    assert b["doc_ids"][-1].tolist() == [1, 1, 1] + [0] * 7  # padding: document 0
    assert b["positions"].max() < T

    without = CLMCollator(wordpiece.pad_token_id, T, doc_mask=False)(items)  # as before document masking
    assert set(without) == {"input_ids", "labels", "attention_mask", "bytes"}
    assert torch.equal(without["labels"], b["input_ids"].masked_fill(b["attention_mask"] == 0, -100))
    no_reset = CLMCollator(wordpiece.pad_token_id, T, reset_positions=False)(items)
    assert "positions" not in no_reset and torch.equal(no_reset["labels"], b["labels"])


def test_mlm_masking_is_unchanged_by_document_masking(wordpiece):
    blocks, _ = pack(Dataset.from_dict({"text": DOCS * 4}), wordpiece, 10)
    items = [{**r, "batch_idx": 3} for r in rows_of(blocks)[:6]]
    on = MLMCollator(wordpiece, seed=1, seq_len=10)(items)
    off = MLMCollator(wordpiece, seed=1, seq_len=10, doc_mask=False)(items)
    assert set(off) == {"input_ids", "labels", "attention_mask", "bytes"}
    assert set(on) == set(off) | {"doc_ids", "positions"}
    for k in off:
        assert torch.equal(on[k], off[k]), k
    assert torch.equal(on["doc_ids"], CLMCollator(0, 10)(items)["doc_ids"])


def test_the_keys_change_batches_not_the_cache(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(DOCS * 40))
    kw = {"cache_dir": str(tmp_path / "cache"), "data_files": str(tmp_path / "a.txt"), "seq_len": 16}
    on, off = TextFilesDataModule(**kw), TextFilesDataModule(**kw, doc_mask=False, reset_positions=False)
    assert (on.doc_mask, on.reset_positions) == (True, True)  # the defaults
    assert on.data_dir == off.data_dir
    assert "layout" in on.fingerprint() and "layout" not in TextFilesDataModule(**kw, streaming=True).fingerprint()
    on.prepare_data()
    on.setup()
    off.setup()  # the same cache entry
    on.trainer = off.trainer = SimpleNamespace(lightning_module=SimpleNamespace(objective="clm"), global_rank=0,
                                               default_root_dir=None)
    assert (on.collate().doc_mask, off.collate().doc_mask, off.collate().reset_positions) == (True, False, False)
    # every text data config sets both keys (on): a recipe says what it trains on
    for path in sorted(CONF_DIR.glob("data/*.yaml")):
        cfg = OmegaConf.load(path)
        if issubclass(get_class(cfg._target_), TextDataModule):
            assert cfg.doc_mask is True and cfg.reset_positions is True, path.name


# -- bits per byte -----------------------------------------------------------------------------------
def causal_lm(vocab: int, pad: int) -> CausalLM:
    task = CausalLM(tiny_decoder(vocab, pad).cfg, OptimConfig(), vocab, pad)
    task.model = tiny_decoder(vocab, pad)  # float64, seeded
    return task.eval()


def test_val_bpb_equals_a_hand_computation(wordpiece):
    """NLL from the model's logits, bytes from the text: one document per row ([CLS] doc [SEP]), so the
    targets are the document's tokens and its separator: its UTF-8 length less leading blanks, plus 1."""
    docs = DOCS[:4]
    blocks, _ = pack(Dataset.from_dict({"text": docs}), wordpiece, 16, packing="truncate")
    items = rows_of(blocks)
    task = causal_lm(len(wordpiece), wordpiece.pad_token_id)
    nll, n_bytes, count = 0.0, 0, 0
    with torch.no_grad():
        for pair in (items[:2], items[2:]):  # two validation batches
            b = CLMCollator(wordpiece.pad_token_id, 16)(pair)
            task.validation_step(b, 0)
            logits = task.model.logits(task.model(b["input_ids"], b["attention_mask"], b["doc_ids"],
                                                  b["positions"]))
            for r, it in enumerate(pair):
                ids = it["input_ids"]
                for t in range(len(ids) - 1):
                    nll += float(torch.logsumexp(logits[r, t], 0) - logits[r, t, ids[t + 1]])
                count += len(ids) - 1
    n_bytes = sum(len(d.lstrip().encode("utf-8")) + 1 for d in docs)
    # by hand: 17 ASCII characters + é, ï (2 bytes) + 😀 (4); "hello naïve world  " 18 + ï; "ok"; 11 + é + 2 x 😀
    assert n_bytes == (27 + 1) + (20 + 1) + (2 + 1) + (19 + 1)
    assert float(task.val_loss.compute()) == pytest.approx(nll / count, rel=1e-6)
    assert float(task.val_bpb.compute()) == pytest.approx(nll / (LN2 * n_bytes), rel=1e-6)


def test_byte_level_bpb_is_loss_over_ln2(bytes_tok):
    """Every target covers one byte (the separator counts one): bits per byte = loss / ln 2, for the causal
    LM on packed blocks and the masked LM on its masked tokens."""
    blocks, _ = pack(Dataset.from_dict({"text": DOCS * 3}), bytes_tok, 24)
    items = [{**r, "batch_idx": 0} for r in rows_of(blocks)]
    vocab, pad = len(bytes_tok), bytes_tok.pad_token_id
    clm = causal_lm(vocab, pad)
    b = CLMCollator(pad, 24)(items)
    mlm = MaskedLM(tiny_decoder(vocab, pad).cfg, OptimConfig(), vocab, pad).double().eval()
    m = MLMCollator(bytes_tok, seed=0, seq_len=24)(items)
    # exactly one byte per target
    assert int(clm.target_bytes(b)) == int((b["labels"][:, 1:] != -100).sum()) > 0
    assert int(mlm.target_bytes(m)) == int((m["labels"] != -100).sum()) > 0
    with torch.no_grad():
        clm.validation_step(b, 0)
        mlm.validation_step(m, 0)
    for task in (clm, mlm):
        loss, bpb = float(task.val_loss.compute()), float(task.val_bpb.compute())
        assert bpb == pytest.approx(loss / LN2, rel=1e-6)  # the float32 loss, summed in float32 or float64


# -- end to end: no target crosses a document boundary ---------------------------------------------
def test_packed_clm_loss_is_the_mean_of_each_document_alone(wordpiece):
    """The loss of packed, document-masked blocks is the token-weighted mean of each document's loss run
    alone (its tokens from position 0, the first never a target); without document masking it is not."""
    blocks, _ = pack(Dataset.from_dict({"text": sentences(12, seed=3) + DOCS}), wordpiece, 24)
    items = rows_of(blocks)[:4]
    model = tiny_decoder(len(wordpiece), wordpiece.pad_token_id)
    b = CLMCollator(wordpiece.pad_token_id, 24)(items)
    assert int((b["doc_ids"].amax(1) > 1).sum()) >= 3  # several documents in most rows
    with torch.no_grad():
        loss, _, n = model.clm_loss(b["input_ids"], b["attention_mask"], b["labels"], b["doc_ids"], b["positions"])
        total, count = 0.0, 0
        for r in range(len(items)):
            for d in b["doc_ids"][r].unique().tolist():
                ids = b["input_ids"][r][b["doc_ids"][r] == d][None]  # the document alone, positions from 0
                if ids.shape[1] == 1:  # one token (a document begun at a block's end): nothing to predict
                    continue
                alone, _, k = model.clm_loss(ids, None, ids.clone())
                total, count = total + float(alone) * int(k), count + int(k)
        assert int(n) == count
        assert float(loss) == pytest.approx(total / count, rel=1e-6)
        plain = CLMCollator(wordpiece.pad_token_id, 24, doc_mask=False)(items)
        leaky, _, n_leaky = model.clm_loss(plain["input_ids"], plain["attention_mask"], plain["labels"])
        assert int(n_leaky) > count and float(leaky) != pytest.approx(float(loss), rel=1e-3)
