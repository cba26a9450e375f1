"""MHA against torch.nn.MultiheadAttention with copied weights; RoPE against a float64 rotation."""

import math

import pytest
import torch
from torch import nn

from ethos.models.attention import MHA
from ethos.models.rope import Rotary


def copy_from_torch(ref: nn.MultiheadAttention, ours: MHA) -> None:
    with torch.no_grad():
        ours.qkv.weight.copy_(ref.in_proj_weight)
        ours.qkv.bias.copy_(ref.in_proj_bias)
        ours.out.weight.copy_(ref.out_proj.weight)
        ours.out.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("causal,padded", [(False, False), (False, True), (True, False), (True, True)])
def test_mha_equals_torch_multihead_attention(causal, padded):
    torch.manual_seed(0)
    B, T, d, H = 3, 11, 48, 4
    ref = nn.MultiheadAttention(d, H, bias=True, batch_first=True).double()
    ours = MHA(d, H, rope_dims=0, bias=True).double()
    copy_from_torch(ref, ours)
    x = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    keep = torch.ones(B, T, dtype=torch.bool)
    if padded:
        keep[0, 7:] = False
        keep[2, 4:] = False
    causal_mask = torch.ones(T, T, dtype=torch.bool).triu(1) if causal else None  # True = blocked
    want, _ = ref(x, x, x, key_padding_mask=~keep if padded else None, attn_mask=causal_mask,
                  need_weights=False)
    got = ours(x, attn_mask=keep if padded else None, is_causal=causal)
    rows = keep  # padded query rows are undefined in both; compare real tokens only
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-10, atol=1e-10)
    g_ref, = torch.autograd.grad(want[rows].sum(), x)
    g_ours, = torch.autograd.grad(got[rows].sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-10, atol=1e-10)


def rotate_reference(x: torch.Tensor, dims: int, theta: float, interleave: bool) -> torch.Tensor:
    """Float64 rotation written from the definition: pair (a, b) at position t turns by t * theta^(-2i/dims)."""
    x = x.double()
    out = x.clone()
    T = x.shape[-2]
    for t in range(T):
        for i in range(dims // 2):
            ang = t * theta ** (-2 * i / dims)
            a, b = (2 * i, 2 * i + 1) if interleave else (i, i + dims // 2)
            c, s = math.cos(ang), math.sin(ang)
            out[..., t, a] = x[..., t, a] * c - x[..., t, b] * s
            out[..., t, b] = x[..., t, a] * s + x[..., t, b] * c
    return out


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("dims", [8, 16])
def test_rope_matches_float64_rotation(dims, interleave):
    torch.manual_seed(1)
    x = torch.randn(2, 3, 9, 16)
    got = Rotary(dims, theta=500.0, interleave=interleave, max_seq_len=4)(x)  # table grows past 4
    want = rotate_reference(x, dims, 500.0, interleave)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., dims:], x[..., dims:])  # channels past rope_dims untouched


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(2)
    rope = Rotary(16)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16)
    s = rope(q)[0, 0] @ rope(k)[0, 0].T  # s[i, j] depends on i - j only
    for off in (0, 3, 7):
        diag = torch.diagonal(s, offset=off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


def test_mha_with_rope_equals_float64_reference():
    torch.manual_seed(3)
    B, T, d, H, r = 2, 6, 32, 2, 8
    m = MHA(d, H, rope_dims=r).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    q, k, v = (x @ w.T for w in m.qkv.weight.chunk(3))
    split = lambda t: t.view(B, T, H, d // H).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    q, k = rotate_reference(q, r, 10000.0, False), rotate_reference(k, r, 10000.0, False)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // H), dim=-1)
    want = (att @ v).transpose(1, 2).reshape(B, T, d) @ m.out.weight.T
    torch.testing.assert_close(m(x), want, rtol=1e-10, atol=1e-10)
