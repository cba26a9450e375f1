"""Causal LM: the decoder is causal, its loss is the textbook next-token cross-entropy, and it trains."""

import csv
import math

import pytest
import torch
from test_text_data import sentences

from conftest import compose
from ethos.checks import build_model_config
from ethos.data.collate import CLMCollator
from ethos.models.attention import MHA
from ethos.models.config import ModelConfig
from ethos.models.decoder import Decoder
from ethos.models.ffn import SwiGLU
from ethos.study import train
from ethos.tasks.clm import CausalLM
from ethos.tasks.registry import task_for


def tiny_decoder(vocab: int = 50, pad_id: int = 3) -> Decoder:
    from functools import partial

    cfg = ModelConfig(attn=partial(MHA), ffn=partial(SwiGLU, d_ff=32), d_model=16, n_layers=2, n_heads=2,
                      rope_dims=4, max_seq_len=32)
    torch.manual_seed(0)
    return Decoder(cfg, vocab, pad_id).double().eval()


def test_collator_keeps_tokens_and_ignores_padding_by_position():
    pad = 3  # the pad id is also a real token here (GPT-2 reuses EOS): it must still be a target
    items = [{"input_ids": [5, 3, 7, 3]}, {"input_ids": [9, 3]}]
    b = CLMCollator(pad_id=pad, seq_len=6)(items)
    assert b["input_ids"].tolist() == [[5, 3, 7, 3, 3, 3], [9, 3, 3, 3, 3, 3]]
    assert b["labels"].tolist() == [[5, 3, 7, 3, -100, -100], [9, 3, -100, -100, -100, -100]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]


def test_loss_equals_manual_float64_cross_entropy():
    model = tiny_decoder()
    g = torch.Generator().manual_seed(1)
    items = [{"input_ids": torch.randint(0, 50, (n,), generator=g).tolist()} for n in (12, 7, 3)]
    items[0]["input_ids"][4] = 3  # a real token equal to the pad id counts
    b = CLMCollator(pad_id=3, seq_len=12)(items)
    loss, correct, n = model.clm_loss(b["input_ids"], b["attention_mask"], b["labels"])
    with torch.no_grad():
        logits = model.logits(model(b["input_ids"], b["attention_mask"]))
    total, count, hits = 0.0, 0, 0
    for r, it in enumerate(items):
        ids = it["input_ids"]
        for t in range(len(ids) - 1):  # position t predicts token t + 1 of the same row
            z = logits[r, t]
            total += float(torch.logsumexp(z, 0) - z[ids[t + 1]])
            count += 1
            hits += int(z.argmax() == ids[t + 1])
    assert int(n) == count == 11 + 6 + 2
    assert float(loss) == pytest.approx(total / count, rel=1e-6)  # float32 CE of float64 logits
    assert int(correct) == hits


def test_decoder_is_causal_and_ignores_padding():
    model = tiny_decoder()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 50
    with torch.no_grad():
        a, c = model(ids), model(changed)
        torch.testing.assert_close(a[:, :6], c[:, :6])  # the future cannot leak into the past
        assert not torch.allclose(a[:, 6:], c[:, 6:])
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[:, 6:] = 0  # right padding: the real positions are those of the unpadded rows
        torch.testing.assert_close(model(changed, mask)[:, :6], model(ids[:, :6]))
    # the LM head is the input embedding (tied)
    assert model.logits(torch.eye(16, dtype=torch.float64))[0].tolist() == model.embed.weight[:, 0].tolist()


def test_task_clm_selects_decoder(tmp_path):
    from ethos.optim import OptimConfig

    cfg = compose(["task=clm", "debug=tiny"], output_dir=tmp_path)
    model_cfg = build_model_config(cfg)  # the decoder dry-builds on meta
    assert model_cfg.d_model == 64
    task = task_for(cfg)(model=model_cfg, optim=OptimConfig(), vocab_size=50)
    assert isinstance(task, CausalLM) and type(task.model).__name__ == "Decoder"


@pytest.mark.slow
def test_short_clm_run_loss_falls(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(2):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("\n".join(sentences(2000, 20 + i)))
    cfg = compose(["task=clm", "debug=tiny", "logger=csv", "data=text_files",
                   f"data.data_files='{tmp_path}/corpus/*.txt'", "data.vocab_size=200", "data.seq_len=32",
                   "data.tokenizer_type=bpe", "data.packing=truncate", f"data.cache_dir={tmp_path}/cache",
                   "trainer.max_steps=40", "trainer.val_check_interval=10", "optim.lr=3e-3", "callbacks=none"],
                  output_dir=tmp_path / "run")
    final = train(cfg)
    with open(tmp_path / "run" / "csv" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    ppl = [float(r["val/ppl"]) for r in rows if r.get("val/ppl")]
    assert len(val) == 5 and val[-1] < val[1] - 0.3 < val[0], val  # val[0]: untrained, step 0
    assert ppl[-1] == pytest.approx(torch.tensor(val[-1]).exp().item(), rel=1e-4)
    assert final == pytest.approx(val[-1])
    # bits per byte: the same targets at every validation, so bpb / loss = targets / (ln 2 x their bytes) stays put
    bpb = [float(r["val/bpb"]) for r in rows if r.get("val/bpb")]
    assert len(bpb) == 5 and all(b / v == pytest.approx(bpb[0] / val[0], rel=1e-5) for b, v in zip(bpb, val))
    assert 0 < bpb[0] / val[0] < 1 / math.log(2)  # more than one byte per target on average
    assert any(r.get("train/bpb") for r in rows)
