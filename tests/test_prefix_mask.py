"""Prefix-LM attention (docs/design.md §12): each packed document's prefix attends bidirectionally within itself,
the rest causally. For every attention variant x score function, in float64, outputs and input gradients equal
those under a dense mask built by hand, and perturbations show what may and may not reach a token."""

import pytest
import torch
from test_doc_mask import LENGTHS, SCORES, VARIANTS, T, packed_ids, rel, spans, trunk

from ethos.models.scores import Docs, allowed_keys, docs_mask, flex, plain


def random_prefix(seed: int) -> tuple[torch.Tensor, list[list[int]]]:
    """Span ids (B, T): each document's first k tokens, k uniform in 0..n (0: no prefix, n: all prefix)."""
    g = torch.Generator().manual_seed(seed)
    prefix = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    ks = []
    for r in range(len(LENGTHS)):
        ks.append([])
        for d, (s, e) in enumerate(spans(r), 1):
            k = int(torch.randint(0, e - s + 1, (1,), generator=g))
            prefix[r, s:s + k] = d
            ks[r].append(k)
    return prefix, ks


def hand_mask(ks: list[list[int]]) -> torch.Tensor:
    """(B, 1, T, T) written out by loops: within a document, key j <= query t, or both in its first k tokens;
    a padding query sees padding keys (a document of its own, causal)."""
    m = torch.zeros(len(LENGTHS), 1, T, T, dtype=torch.bool)
    for r in range(len(LENGTHS)):
        docs = list(spans(r))
        end = docs[-1][1]
        docs.append((end, T))  # padding
        for d, (s, e) in enumerate(docs):
            k = ks[r][d] if d < len(ks[r]) else 0
            for t in range(s, e):
                for j in range(s, e):
                    m[r, 0, t, j] = j <= t or (t < s + k and j < s + k)
    return m


def test_hand_mask_equals_allowed_keys():
    ids, pad, _ = packed_ids()
    for seed in range(5):
        prefix, ks = random_prefix(seed)
        assert torch.equal(allowed_keys(pad, True, T, "cpu", ids, prefix), hand_mask(ks))
    # no prefix: the causal document mask
    assert torch.equal(allowed_keys(pad, True, T, "cpu", ids, torch.zeros_like(ids)),
                       allowed_keys(pad, True, T, "cpu", ids))


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefix_attention_equals_hand_mask(variant, score):
    m = trunk(variant, score, gate="head" if variant == "mha" else "none")
    ids, pad, pos = packed_ids()
    prefix, ks = random_prefix(10 * list(VARIANTS).index(variant) + SCORES.index(score))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(len(LENGTHS), T, 32, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(len(LENGTHS), T, 32, dtype=torch.float64, generator=g) * pad[..., None]
    out = m(x, attn_mask=pad, is_causal=True, positions=pos, docs=docs_mask(ids, pad, True, prefix))
    grad, = torch.autograd.grad((out * w).sum(), x)
    # the reference: the trunk's plain path (record_attention's), dense mask by hand, each document alone
    for r in range(len(LENGTHS)):
        for d, (s, e) in enumerate(spans(r)):
            xi = x[r:r + 1, s:e].detach().requires_grad_()
            k = ks[r][d]
            ref = m(xi, is_causal=True, docs=Docs(torch.ones(1, e - s, dtype=torch.long),
                                                  allowed=hand_mask_one(e - s, k)))
            gi, = torch.autograd.grad((ref * w[r:r + 1, s:e]).sum(), xi)
            assert rel(out[r, s:e], ref[0]) < 1e-10, (r, d, k)
            assert rel(grad[r, s:e], gi[0]) < 1e-10, (r, d, k)
    # and the whole packed batch under the hand-built mask of all rows
    ref = m(x, attn_mask=pad, is_causal=True, positions=pos, docs=Docs(ids, allowed=hand_mask(ks)))
    real = pad[..., None]
    assert rel(out * real, ref * real) < 1e-10


def hand_mask_one(n: int, k: int) -> torch.Tensor:
    m = torch.zeros(1, 1, n, n, dtype=torch.bool)
    for t in range(n):
        for j in range(n):
            m[0, 0, t, j] = j <= t or (t < k and j < k)
    return m


@pytest.mark.parametrize("score", SCORES)
@pytest.mark.parametrize("variant", ["mha", "gqa", "mla", "mla_o"])
def test_perturbations(variant, score):
    """A continuation token depends on nothing after it; a prefix token on nothing in the continuation; and
    (so the check can fail) a prefix token does depend on a later prefix token."""
    m = trunk(variant, score)
    n, k = 10, 4  # one document: tokens 0..3 the prefix, 4..9 the continuation
    prefix = torch.zeros(1, n, dtype=torch.long)
    prefix[0, :k] = 1
    docs = docs_mask(torch.ones(1, n, dtype=torch.long), None, True, prefix)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, n, 32, dtype=torch.float64, generator=g)
    base = m(x, is_causal=True, docs=docs)
    for t in range(k, n):  # change everything after continuation token t
        y = x.clone()
        y[0, t + 1:] += torch.randn(n - t - 1, 32, dtype=torch.float64, generator=g)
        assert rel(m(y, is_causal=True, docs=docs)[0, :t + 1], base[0, :t + 1]) < 1e-12, t
    y = x.clone()
    y[0, k:] += torch.randn(n - k, 32, dtype=torch.float64, generator=g)  # the whole continuation
    changed = m(y, is_causal=True, docs=docs)
    assert rel(changed[0, :k], base[0, :k]) < 1e-12
    assert rel(changed[0, k:], base[0, k:]) > 1e-3
    y = x.clone()
    y[0, k - 1] += 1.0  # the last prefix token reaches the first
    assert rel(m(y, is_causal=True, docs=docs)[0, 0], base[0, 0]) > 1e-3


@pytest.mark.parametrize("score", SCORES)
def test_flex_formulation_with_prefix_equals_plain(score):
    """The FlexAttention path (CUDA) run eagerly, forward only, with documents, prefix spans and GQA."""
    ids, pad, _ = packed_ids()
    prefix, _ = random_prefix(7)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, T, 8, generator=g)
    k, v = (torch.randn(2, 2, T, 8, generator=g) for _ in range(2))
    sink = torch.tensor([0.5, -1.0, 2.0, 0.0]) if score == "sink" else None
    allowed = allowed_keys(pad, True, T, "cpu", ids, prefix)
    with torch.no_grad():
        want = plain(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), allowed, 8 ** -0.5, score, sink)[0]
        got = flex(q, k, v, pad, True, 8 ** -0.5, score, sink=sink, doc_ids=ids, prefix=prefix, compiled=False)
    real = pad[:, None, :, None]
    torch.testing.assert_close(got * real, want * real, rtol=1e-5, atol=1e-6)


def test_prefix_needs_causal_attention():
    ids, pad, _ = packed_ids()
    with pytest.raises(ValueError, match="causal"):
        docs_mask(ids, pad, False, ids)
