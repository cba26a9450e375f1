"""task=prefix_lm and task=mixture (ethos/tasks/prefix_lm.py): losses against references written out (the causal
LM's loss, float64 cross-entropy by hand under a hand-built prefix mask), the prefix's own losses, per-paradigm
logging, the config rules, and short runs of both tasks."""

import csv
import functools
import math
from types import SimpleNamespace

import pytest
import torch
from test_prefix_mask import hand_mask_one
from test_prompt_data import T, blocks, tok  # noqa: F401 - fixtures

from conftest import TINY, compose, run_cli
from ethos import checkpoint
from ethos.data.collate import CLMCollator
from ethos.models.attention import MHA
from ethos.models.config import ModelConfig
from ethos.models.ffn import SwiGLU
from ethos.models.scores import Docs
from ethos.optim import OptimConfig
from ethos.pretrained import load_task
from ethos.study import train
from ethos.tasks.clm import CausalLM
from ethos.tasks.prefix_lm import PrefixLM
from ethos.tasks.seq2seq import Seq2Seq


def cfg() -> ModelConfig:
    return ModelConfig(attn=functools.partial(MHA), ffn=functools.partial(SwiGLU, d_ff=32), d_model=16, n_layers=2,
                       n_heads=2, rope_dims=4, max_seq_len=64)


def prefix_lm(tokenizer, **kw) -> PrefixLM:
    torch.manual_seed(0)
    task = PrefixLM(cfg(), OptimConfig(), len(tokenizer), tokenizer.pad_token_id, **kw).double()
    with torch.no_grad():  # larger weights: the prefix's attention makes a visible difference
        for p in task.parameters():
            p.mul_(4.0)
    return task.eval()


def data(tokenizer):
    return SimpleNamespace(tokenizer=tokenizer, seq_len=T, seed=0, doc_mask=True, reset_positions=True)


def test_a_one_token_prefix_is_the_causal_lm(tok, blocks):  # noqa: F811
    """prefix_range [0, 0] leaves one token of each document in its prefix: attention is then causal and the
    targets are the causal LM's, so the loss equals CausalLM's on the same blocks and weights."""
    task = prefix_lm(tok, prefix_range=(0.0, 0.0))
    clm = CausalLM(cfg(), OptimConfig(), len(tok), tok.pad_token_id).double().eval()
    clm.model.load_state_dict(task.model.state_dict())
    b = task.collator(data(tok))(blocks)
    c = CLMCollator(tok.pad_token_id, T)(blocks)
    assert torch.equal(b["labels"][:, 1:], c["labels"][:, 1:])  # (position 0 is never a target)
    with torch.no_grad():
        assert float(task._step(b)[0]) == pytest.approx(float(clm._step(c)[0]), rel=1e-12)


def test_prefix_loss_equals_float64_cross_entropy_by_hand(tok, blocks):  # noqa: F811
    """Every document alone under its hand-built prefix mask, the continuation's next-token NLL summed by hand."""
    task = prefix_lm(tok)
    b = task.collator(data(tok))(blocks[:4])
    with torch.no_grad():
        loss, correct, n = task._step(b)
        total, count = 0.0, 0
        for r in range(4):
            doc, prefix = b["doc_ids"][r], b["prefix"][r]
            for i in range(1, int(doc.max()) + 1):
                at = (doc == i).nonzero().flatten()
                ids = b["input_ids"][r, at][None]
                k = int((prefix[at] > 0).sum())
                hidden = task.model.trunk(task.model.embed(ids), is_causal=True,
                                          docs=Docs(torch.ones_like(ids), allowed=hand_mask_one(len(at), k)))
                logits = task.model.logits(hidden)[0]
                for t in range(max(k, 1), len(at)):  # continuation targets, predicted from the token before
                    z = logits[t - 1]
                    total += float(torch.logsumexp(z, 0) - z[ids[0, t]])
                    count += 1
        # and the mask made a difference: the same weights read causally give another loss
        causal = task.model.clm_loss(b["input_ids"], b["attention_mask"], b["labels"], b["doc_ids"], b["positions"])
    assert n == count and float(loss) == pytest.approx(total / count, rel=1e-6)  # the step's CE: float32
    assert abs(float(causal[0]) - float(loss)) > 1e-4


def test_prefix_clm_and_mlm_losses(tok, blocks):  # noqa: F811
    # clm: the prefix tokens' NLL under a causal pass, weighted into the step's loss
    task = prefix_lm(tok, prefix_loss="clm", prefix_loss_weight=0.5).train()
    task.log = lambda *a, **k: None
    b = task.collator(data(tok))(blocks[:4])
    with torch.no_grad():
        loss, _, _ = task._step(b)
        total = task.with_aux_loss(loss)
        want = task.model.clm_loss(b["input_ids"], b["attention_mask"], b["prefix_labels"], b["doc_ids"],
                                   b["positions"])[0]
    assert float(total) == pytest.approx(float(loss) + 0.5 * float(want), rel=1e-6)  # CE in float32

    # mlm: masked prefix tokens predicted at their own position, under the prefix-LM attention
    task = prefix_lm(tok, prefix_loss="mlm", mlm_probability=0.3).train()
    task.log = lambda *a, **k: None
    assert task.model.embed.num_embeddings == len(tok) + 1  # its own mask id
    b = task.collator(data(tok))(blocks[:4])
    with torch.no_grad():
        loss, _, _ = task._step(b)
        total = task.with_aux_loss(loss)
        hidden = task.forward_hidden(b)
        at = b["mlm_labels"] != -100
        z = task.model.logits(hidden[at])
        want = (torch.logsumexp(z, -1) - z.gather(1, b["mlm_labels"][at][:, None])[:, 0]).mean()
    assert at.sum() > 3 and float(total) == pytest.approx(float(loss) + float(want), rel=1e-6)  # CE in float32


def test_mixture_logs_each_paradigm(tok, blocks):  # noqa: F811
    task = prefix_lm(tok, paradigms={"clm": 1.0, "prefix": 1.0, "span": 1.0}, mode_tokens=True, n_sentinels=20)
    assert task.model.embed.num_embeddings == len(tok) + 3 + 20
    b = task.collator(data(tok))(blocks)
    with torch.no_grad():
        loss, _, n = task._step(b)
        sel = b["labels"][:, 1:] != -100
        logits = task.model.logits(task.forward_hidden(b)[:, :-1][sel])
        nll = torch.nn.functional.cross_entropy(logits, b["labels"][:, 1:][sel], reduction="none")
        par = b["paradigm"][:, 1:][sel]
    means = {p: float(task.val_paradigm[p].compute()) for p in ("clm", "prefix", "span")}
    for i, p in enumerate(("clm", "prefix", "span")):
        assert means[p] == pytest.approx(float(nll[par == i].mean()), rel=1e-6)
    assert float(loss) == pytest.approx(float(nll.mean()), rel=1e-6)  # the step's cross-entropy runs in float32


@pytest.mark.parametrize("override, message", [
    ("task.paradigms={clm: 1, prefix: 0}", "task.prefix_loss=mlm"),
    ("+task.paradigms.bogus=1", "task.paradigms="),
    ("task.prefix_range=[0.8,0.2]", "task.prefix_range=[0.8, 0.2]"),
])
def test_config_rules(tmp_path, override, message):
    r = run_cli(["task=prefix_lm", "task.prefix_loss=mlm", override, "print_config=false"], cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr, r.stderr[-2000:]
    assert "tokenize" not in r.stderr  # before any data is read


@pytest.mark.parametrize("task", ["prefix_lm", "mixture", "seq2seq"])
def test_short_runs_train(tmp_path, task):
    out = tmp_path / task
    train(compose([*TINY, f"task={task}", "model=mha", "trainer.max_steps=16", "trainer.val_check_interval=8",
                   {"prefix_lm": "task.prefix_loss=mlm", "mixture": "task.n_sentinels=20",
                    "seq2seq": "task.encoder_layers=1"}[task]], output_dir=out))
    assert checkpoint.load(out / "checkpoints" / "last.ckpt")["hyper_parameters"]  # reads safely: plain containers
    rebuilt, ckpt = load_task(out)  # and rebuilds the task from the checkpoint alone (the analysis tools do)
    assert type(rebuilt).__name__ == {"seq2seq": "Seq2Seq"}.get(task, "PrefixLM")
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    assert len(val) >= 2 and val[-1] < val[0] and all(math.isfinite(v) for v in val)
    keys = set(rows[0])
    assert "val/bpb" in keys
    if task == "mixture":
        assert {"val/loss_clm", "val/loss_prefix", "val/loss_span"} <= keys
    elif task == "prefix_lm":
        assert "val/prefix_mlm" in keys


@pytest.mark.parametrize("task_name, want", [
    ("prefix_lm", {"backbone": "decoder", "pooling": "last", "prefix": True, "extra_vocab": 1}),
    ("mixture", {"backbone": "decoder", "pooling": "last", "prefix": True, "extra_vocab": 3 + 100}),
    ("seq2seq", {"backbone": "seq2seq", "pooling": "mean", "prefix": False, "extra_vocab": 0,
                 "seq2seq": {"encoder_layers": 1, "decoder_layers": None, "cross_kv_heads": None}}),
])
def test_the_fine_tune_reads_the_backbone_as_its_objective_trained_it(tmp_path, task_name, want):
    """finetune_after on a prompt objective's run: the classifier is built with the run's extra ids and reads the
    input as the objective read prompts; its backbone takes the run's weights whole."""
    from ethos.study import finetune_config
    from ethos.tasks.finetune import SequenceClassifier

    extra = ["task.prefix_loss=mlm"] if task_name == "prefix_lm" else []
    extra += ["task.encoder_layers=1"] if task_name == "seq2seq" else []
    run = compose([*TINY, f"task={task_name}", "model=mha", "finetune_after=docstrings", *extra], output_dir=tmp_path)
    ft = finetune_config(run, tmp_path)
    for k, v in want.items():
        got = ft.task[k]
        assert (dict(got) if hasattr(got, "items") else got) == v, k
    pretraining = {"prefix_lm": lambda: PrefixLM(cfg(), OptimConfig(), 30, prefix_loss="mlm"),
                   "mixture": lambda: PrefixLM(cfg(), OptimConfig(), 30, paradigms={"clm": 1, "span": 1},
                                               mode_tokens=True),
                   "seq2seq": lambda: Seq2Seq(cfg(), OptimConfig(), 30, encoder_layers=1)}[task_name]()
    clf = SequenceClassifier(cfg(), OptimConfig(), 30, num_classes=3, **want)
    clf.model.load_state_dict(pretraining.model.state_dict())  # every tensor, shapes included
    ids = torch.randint(3, 30, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    with torch.no_grad():
        if task_name == "seq2seq":
            assert torch.equal(clf.eval().model.encode(ids, mask.bool()), pretraining.model.encode(ids, mask.bool()))
            assert not any(p.requires_grad for p in clf.model.trunk.parameters())  # the unused decoder
        else:  # the input read as one prefix: the last token's state changes with the first token's
            h = clf.eval().model(ids, mask.bool(), prefix=mask)
            ids2 = ids.clone()
            ids2[:, -1] = (ids2[:, -1] + 1) % 30
            assert not torch.allclose(clf.model(ids2, mask.bool(), prefix=mask)[:, 0], h[:, 0])  # bidirectional
