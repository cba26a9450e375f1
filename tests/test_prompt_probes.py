"""The prompt-encoding probes (ethos/analysis/prompts.py) on planted cases: a model that ignores its prompt gets a
prompt help of exactly 0 and one that reads it does not; a prompt state that holds the label linearly is probed at
~100%, labels it does not hold at chance; the lens's figures against a direct computation; and the command on a
trained run."""

import functools
import math
import subprocess
import sys

import pytest
import torch

from conftest import TINY, compose
from ethos.analysis import prompts
from ethos.models.attention import MHA
from ethos.models.config import ModelConfig
from ethos.models.ffn import SwiGLU
from ethos.optim import OptimConfig
from ethos.study import train
from ethos.tasks.clm import CausalLM
from ethos.tasks.prefix_lm import PrefixLM
from ethos.tasks.seq2seq import Seq2Seq

V = 40


def cfg() -> ModelConfig:
    return ModelConfig(attn=functools.partial(MHA), ffn=functools.partial(SwiGLU, d_ff=48), d_model=32, n_layers=2,
                       n_heads=4, rope_dims=8, max_seq_len=128)


def task(kind: str):
    torch.manual_seed(0)
    t = {"causal": lambda: CausalLM(cfg(), OptimConfig(), V),
         "prefix": lambda: PrefixLM(cfg(), OptimConfig(), V),
         "mixture": lambda: PrefixLM(cfg(), OptimConfig(), V, paradigms={"clm": 1, "prefix": 1}, mode_tokens=True),
         "seq2seq": lambda: Seq2Seq(cfg(), OptimConfig(), V, encoder_layers=1)}[kind]()
    with torch.no_grad():  # larger weights than GPT-2's init: the prompt's effect is far from rounding
        for p in t.parameters():
            p.mul_(5.0)
    return t.double().eval()


def docs(n: int = 24, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(16, 40, (1,), generator=g))
        out.append((torch.randint(5, V, (length,), generator=g).tolist(), [1] * length))
    return out


def ignore_prompt(t) -> None:
    """Nothing moves between positions: every self-attention's (and cross-attention's) output projection zeroed."""
    with torch.no_grad():
        for name, m in t.model.named_modules():
            if name.endswith(("attn.out", "cross.out")):
                m.weight.zero_()


@pytest.mark.parametrize("kind", ["causal", "prefix", "mixture", "seq2seq"])
def test_prompt_help_is_zero_for_a_model_that_ignores_its_prompt(kind):
    t = task(kind)
    reader = prompts.Reader.of(t, start_id=2)
    assert reader.kind == {"mixture": "prefix"}.get(kind, kind)
    reading = prompts.prompt_help(reader, docs())
    assert abs(reading["help_bpb"]) > 1e-3  # reading the prompt changes the continuation's bpb
    ignore_prompt(t)
    ignoring = prompts.prompt_help(reader, docs())
    assert abs(ignoring["help_bpb"]) < 1e-12 and math.isfinite(ignoring["bpb_with_prompt"])


def test_prompt_help_equals_a_hand_computation():
    """One document, causal: bpb with and without its prompt summed token by token from the model's logits."""
    t = task("causal")
    reader = prompts.Reader.of(t, start_id=2)
    doc, nb = docs(1)[0]
    nb = [1 + (i % 3) for i in range(len(doc))]
    k = round(len(doc) * 0.5)
    got = prompts.prompt_help(reader, [(doc, nb)], split=0.5)
    want = {}
    for key, ids in (("with", [2] + doc), ("without", [2] + doc[k:])):
        with torch.no_grad():
            logits = t.model.logits(t.model(torch.tensor([ids])))[0]
        first = len(ids) - (len(doc) - k)  # index of the continuation's first token
        nll = sum(float(torch.logsumexp(logits[j - 1], 0) - logits[j - 1, ids[j]]) for j in range(first + 1, len(ids)))
        want[key] = nll / (math.log(2) * sum(nb[k + 1:]))
    assert got["bpb_with_prompt"] == pytest.approx(want["with"], rel=1e-9)
    assert got["bpb_without_prompt"] == pytest.approx(want["without"], rel=1e-9)


@pytest.mark.parametrize("kind", ["causal", "prefix", "seq2seq"])
def test_linear_probe_reads_a_planted_label_and_not_a_random_one(kind):
    """Planted: the label is a marker token at the prompt's end, and every block adds nothing to the residual
    stream, so the prompt's final state is the normalised embedding of the marker: ~100%. Labels drawn
    independently of the text: chance."""
    t = task(kind)
    with torch.no_grad():
        for name, m in t.model.named_modules():
            if name.endswith(("attn.out", "ffn.w2")):
                m.weight.zero_()
    reader = prompts.Reader.of(t, start_id=2)
    g = torch.Generator().manual_seed(1)
    examples, planted = [], []
    for _ in range(600):
        y = int(torch.randint(0, 3, (1,), generator=g))
        body = torch.randint(10, V, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist()
        examples.append(body + [5 + y])
        planted.append(y)
    x = prompts.features(reader, examples)
    assert x.shape == (600, 32)
    acc = prompts.linear_probe(x[:400], planted[:400], x[400:], planted[400:])
    assert acc > 0.97
    noise = torch.randint(0, 3, (600,), generator=g).tolist()
    chance = prompts.linear_probe(x[:400], noise[:400], x[400:], noise[400:])
    assert abs(chance - 1 / 3) < 0.12  # 200 validation examples: the binomial sd is 0.033


def test_lens_figures_equal_a_direct_computation():
    t = task("causal")
    reader = prompts.Reader.of(t, start_id=2)
    doc = docs(1)[0]
    rows = prompts.lens(reader, [doc], directions=4, split=0.5)
    k = round(len(doc[0]) * 0.5)
    ids = torch.tensor([[2] + doc[0]])
    resid = []
    with torch.no_grad():
        prompts.hook_residuals(t.model.trunk, resid)  # noqa: B018 - hooks kept on this throwaway model
        t.model(ids)
        Vk = prompts.head_directions(t.model, t.model.trunk.norm, 4)
        last = resid[-1][0, :k]  # prompt positions 0..k-1 predict prompt tokens 1..k
        logp = t.model.logits(t.model.trunk.norm(last)).log_softmax(-1)
    row = next(r for r in rows if r["layer"] == len(resid) - 1 and r["where"] == "prompt")
    assert row["positions"] == k
    assert row["entropy"] == pytest.approx(float(-(logp.exp() * logp).sum(-1).mean()), rel=1e-9)
    assert row["accuracy"] == pytest.approx(float((logp.argmax(-1) == ids[0, 1:k + 1]).double().mean()))
    frac = (last.float() @ Vk).square().sum(-1) / last.float().square().sum(-1)
    assert row["unembed_frac"] == pytest.approx(float(frac.mean()), rel=1e-5)
    assert row["random_frac"] == 4 / 32


@pytest.mark.slow
def test_the_command_on_trained_runs(tmp_path, cache_dir):
    runs = []
    for task_name in ("clm", "prefix_lm"):
        out = tmp_path / task_name
        train(compose([*TINY, f"task={task_name}", "model=mha", "trainer.max_steps=20",
                       "trainer.val_check_interval=20"], output_dir=out))
        runs.append(str(out))
    r = subprocess.run([sys.executable, "-m", "ethos.analysis.prompts", *runs, "--out", str(tmp_path / "probes"),
                        "--docs", "32", "--probe-limit", "300"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "help" in r.stdout and (tmp_path / "probes" / "prompts.png").stat().st_size > 10_000
    import csv

    rows = list(csv.DictReader(open(tmp_path / "probes" / "prompts.csv")))
    assert [row["objective"] for row in rows] == ["CausalLM(clm)", "PrefixLM(prefix)"]
    for row in rows:
        assert math.isfinite(float(row["help_bpb"])) and 0.0 <= float(row["probe_acc"]) <= 1.0
    lens = list(csv.DictReader(open(tmp_path / "probes" / "lens.csv")))
    assert {row["where"] for row in lens} == {"prompt", "continuation"}
    bad = subprocess.run([sys.executable, "-m", "ethos.analysis.prompts", str(tmp_path / "missing"), "--out",
                          str(tmp_path / "x")], capture_output=True, text=True)
    assert bad.returncode == 2 and "missing" in bad.stderr and "Traceback" not in bad.stderr
