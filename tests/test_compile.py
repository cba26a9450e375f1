"""Compile-clean steps (docs/design.md §10.6): with model.compile=true the trunk is what torch.compile
compiles; every variant x score function x text task traces into one graph (torch._dynamo.explain counts
zero graph breaks), with document masks, restarted positions and padding as the training batches carry."""

import pytest
import torch
import torch._dynamo as dynamo
from hydra.utils import instantiate

from conftest import compose
from ethos.config import CONF_DIR
from ethos.models.decoder import Decoder
from ethos.models.encoder import Encoder

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SCORES = ["softmax", "softmax1", "sink", "sigmoid", "relu"]


def backbone(model: str, task: str, score: str, extra: tuple[str, ...] = ()):
    cfg = compose([f"model={model}", f"task={task}", f"model.attn.score={score}", "model.n_layers=1",
                   "model.d_model=64", "model.n_heads=4", "model.rope_dims=8", *extra])
    return (Decoder if task == "clm" else Encoder)(instantiate(cfg.model), vocab_size=100)


def batch(B: int = 2, T: int = 16):
    """Packed documents of 5 tokens; row 1 ends in 3 padding tokens (document id 0)."""
    ids = (torch.arange(T) // 5 + 1).repeat(B, 1)
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, -3:] = False
    ids[~pad] = 0
    return torch.randint(0, 100, (B, T)), pad, ids, torch.arange(T).repeat(B, 1) % 5


def graph_breaks(net, input_ids, pad, ids, pos) -> tuple[int, list[str]]:
    """Breaks in tracing the trunk's forward as the backbone calls it (the compiled part)."""
    seen = {}
    net.trunk.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                        with_kwargs=True)
    net(input_ids, pad, ids, pos)
    dynamo.reset()
    ex = dynamo.explain(net.trunk)(*seen["args"], **seen["kwargs"])
    return ex.graph_break_count, [str(r.reason).splitlines()[0] for r in ex.break_reasons]


def test_the_check_sees_a_graph_break():
    """A data-dependent branch in the trunk is a break the check reports (so zero below means zero)."""
    net = backbone("mha", "clm", "softmax")
    forward = net.trunk.norm.forward
    net.trunk.norm.forward = lambda x: forward(x) * (2.0 if bool(x.sum() > 0) else 1.0)
    assert graph_breaks(net, *batch())[0] >= 1


@pytest.mark.parametrize("task", ["clm", "mlm"])
def test_modern_decoder_keys_compile_clean(task):
    net = backbone("mha", task, "softmax", ("model.attn.qk_norm=true", "model/ffn=relu2",
                                            "model.tie_embeddings=false", "model.logit_softcap=15",
                                            "model.zero_init=true"))
    assert graph_breaks(net, *batch()) == (0, [])


@pytest.mark.slow
@pytest.mark.parametrize("task", ["clm", "mlm"])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("model", MODELS)
def test_every_variant_score_and_task_compiles_without_graph_breaks(model, score, task):
    assert graph_breaks(backbone(model, task, score), *batch()) == (0, [])


def trunk_breaks(trunk, call) -> tuple[int, list[str]]:
    """Breaks in tracing `trunk` as `call()` calls it."""
    seen = {}
    handle = trunk.register_forward_pre_hook(lambda m, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                             with_kwargs=True)
    call()
    handle.remove()
    dynamo.reset()
    ex = dynamo.explain(trunk)(*seen["args"], **seen["kwargs"])
    return ex.graph_break_count, [str(r.reason).splitlines()[0] for r in ex.break_reasons]


@pytest.mark.parametrize("score", ["softmax", pytest.param("softmax1", marks=pytest.mark.slow),
                                   pytest.param("sink", marks=pytest.mark.slow), "sigmoid",
                                   pytest.param("relu", marks=pytest.mark.slow)])
@pytest.mark.parametrize("model", ["mha", pytest.param("mla", marks=pytest.mark.slow)])
def test_prompt_objectives_compile_clean(model, score):
    """The prefix-LM's trunk with prefix spans, and both trunks of the encoder-decoder (cross-attention included):
    one graph each (docs/design.md §12)."""
    from ethos.models.seq2seq import EncoderDecoder, cross_mask

    net = backbone(model, "clm", score)
    input_ids, pad, ids, pos = batch()
    prefix = torch.where((pos < 2) & pad, ids, 0)  # the first 2 tokens of every document
    assert trunk_breaks(net.trunk, lambda: net(input_ids, pad, ids, pos, prefix)) == (0, [])
    cfg = compose([f"model={model}", "task=seq2seq", f"model.attn.score={score}", "model.n_layers=1",
                   "model.d_model=64", "model.n_heads=4", "model.rope_dims=8"])
    s2s = EncoderDecoder(instantiate(cfg.model), vocab_size=100, cross_kv_heads=2)
    memory = s2s.encode(input_ids, pad, ids, pos)
    cross = cross_mask(ids, ids, pad)
    assert trunk_breaks(s2s.encoder, lambda: s2s.encode(input_ids, pad, ids, pos)) == (0, [])
    assert trunk_breaks(s2s.trunk, lambda: s2s.decode(input_ids, memory, cross, pad, ids, pos)) == (0, [])
