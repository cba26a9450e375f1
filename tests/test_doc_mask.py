"""Document masking (docs/design.md §10.1): a packed row of documents, with `Docs` and restarted RoPE positions,
equals running each document alone, for every attention variant x score function, bidirectional and causal,
outputs and input gradients in float64; and every path (SDPA, null key, plain, the FlexAttention formulation,
the recording probe) keeps to the document."""

import functools

import pytest
import torch
from test_attention_mla import randomize_norms

from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.blocks import Trunk
from ethos.models.config import ModelConfig
from ethos.models.ffn import SwiGLU
from ethos.models.scores import Docs, allowed_keys, docs_mask, flex, plain, record_attention

SCORES = ["softmax", "softmax1", "sink", "sigmoid", "relu"]
VARIANTS = {
    "mha": (MHA, {}),
    "gqa": (MHA, {"n_kv_heads": 2}),
    "mqa": (MHA, {"n_kv_heads": 1}),
    "mla": (MLA, {"q_latent": 24, "kv_latent": 16}),
    "mla_decoupled": (MLA, {"q_latent": None, "kv_latent": 16, "rope_style": "decoupled"}),
    "mla_o": (MLAO, {"q_latent": 24, "kv_latent": 16, "o_latent": 20}),
}
# two rows: three documents; two documents and two padding tokens (doc id 0)
LENGTHS = [[5, 4, 3], [7, 3]]
T = 12


def trunk(variant: str, score: str, gate: str = "none") -> Trunk:
    cls, extra = VARIANTS[variant]
    attn = functools.partial(cls, score=score, gate=gate, **extra)
    cfg = ModelConfig(attn=attn, ffn=functools.partial(SwiGLU, d_ff=40), d_model=32, n_layers=2, n_heads=4,
                      rope_dims=8)
    torch.manual_seed(0)
    m = Trunk(cfg).double()
    randomize_norms(m)
    with torch.no_grad():
        for p in m.parameters():  # GPT-2 init is small; larger weights make documents differ more
            p.mul_(3.0)
        for block in m.blocks:
            if block.attn.attend.sink is not None:
                block.attn.attend.sink.normal_(0, 2.0)
    return m


def packed_ids() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """doc ids (padding 0), padding mask, and positions restarting at every document."""
    ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    pos = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for r, lengths in enumerate(LENGTHS):
        start = 0
        for d, n in enumerate(lengths, 1):
            ids[r, start:start + n], pos[r, start:start + n] = d, torch.arange(n)
            start += n
        pos[r, start:] = torch.arange(T - start)
    return ids, ids > 0, pos


def spans(r: int):
    start = 0
    for n in LENGTHS[r]:
        yield start, start + n
        start += n


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_documents_equal_documents_alone(variant, score, causal):
    m = trunk(variant, score, gate="head" if variant == "mha" else "none")
    ids, pad, pos = packed_ids()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(LENGTHS), T, 32, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(len(LENGTHS), T, 32, dtype=torch.float64, generator=g) * pad[..., None]  # real tokens only
    out = m(x, attn_mask=pad, is_causal=causal, positions=pos, docs=docs_mask(ids, pad, causal))
    grad, = torch.autograd.grad((out * w).sum(), x)
    for r in range(len(LENGTHS)):
        for s, e in spans(r):
            xi = x[r:r + 1, s:e].detach().requires_grad_()
            alone = m(xi, is_causal=causal)  # no mask, positions 0..n-1: the document as its own sequence
            gi, = torch.autograd.grad((alone * w[r:r + 1, s:e]).sum(), xi)
            assert rel(out[r, s:e], alone[0]) < 1e-10, (r, s, e)
            assert rel(grad[r, s:e], gi[0]) < 1e-10, (r, s, e)


def test_without_docs_attention_leaks_across_documents():
    """The check above can fail: without the document mask the first document's tokens change the others."""
    m = trunk("mha", "softmax")
    ids, pad, pos = packed_ids()
    x = torch.randn(len(LENGTHS), T, 32, dtype=torch.float64)
    out = m(x, attn_mask=pad, is_causal=True, positions=pos)
    s, e = list(spans(0))[1]
    assert rel(out[0, s:e], m(x[:1, s:e], is_causal=True)[0]) > 1e-3


def test_padding_is_a_document_of_its_own():
    ids, pad, _ = packed_ids()
    allowed = allowed_keys(pad, True, T, "cpu", ids)[:, 0]
    for r in range(len(LENGTHS)):
        for s, e in spans(r):
            want = torch.zeros(T, T, dtype=torch.bool)
            want[s:e, s:e] = torch.ones(e - s, e - s, dtype=torch.bool).tril()
            assert torch.equal(allowed[r, s:e], want[s:e])
    assert not allowed[1, :10, 10:].any()  # real tokens never see padding
    assert allowed[1, 10:, 10:].diagonal().all()  # a padding row sees itself: no empty softmax row
    # a caller that gives padding a real document's id still keeps real tokens off padding
    shared = ids.clone()
    shared[1, 10:] = 2
    assert torch.equal(allowed_keys(pad, True, T, "cpu", shared)[1, 0, :10], allowed[1, :10])


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("score", SCORES)
def test_flex_formulation_with_documents_equals_plain(score, causal):
    """The FlexAttention path (chosen on CUDA) run eagerly here, forward only (no CPU backward in torch
    2.14), with a document block mask and grouped k/v heads."""
    ids, pad, _ = packed_ids()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(2))
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0]) if score == "sink" else None
    allowed = allowed_keys(pad, causal, T, "cpu", ids)
    with torch.no_grad():
        want = plain(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), allowed, 8 ** -0.5, score, sink)[0]
        got = flex(q, k, v, pad, causal, 8 ** -0.5, score, sink=sink, doc_ids=ids, compiled=False)
    real = pad[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=1e-5, atol=1e-6)


def test_recorded_weights_keep_to_the_document():
    m = trunk("mla", "softmax")
    ids, pad, pos = packed_ids()
    seen = []
    with record_attention(m, lambda attend, p, allowed: seen.append(p)):
        m(torch.randn(2, T, 32, dtype=torch.float64), attn_mask=pad, is_causal=False, positions=pos,
          docs=Docs(ids))
    s, e = list(spans(0))[0]
    assert len(seen) == 2 and float(seen[0][0, :, s:e, e:].abs().max()) == 0.0
    torch.testing.assert_close(seen[0][0, :, s:e, s:e].sum(-1), torch.ones(4, e - s, dtype=torch.float64))
