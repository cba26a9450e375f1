"""MHA against torch.nn.MultiheadAttention with copied weights; RoPE against a float64 rotation; the trunk's
shared RoPE tables against per-layer ones; the token embedding trains every row."""

import math

import pytest
import torch
from torch import nn

from ethos.models.attention import MHA
from ethos.models.rope import Rotary, apply_rope, rope_tables


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
    got = apply_rope(x, Rotary(dims, theta=500.0, max_seq_len=4)(9, x.dtype), interleave)  # table grows past 4
    want = rotate_reference(x, dims, 500.0, interleave)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[..., dims:], x[..., dims:])  # channels past rope_dims untouched


def test_rope_scores_depend_on_relative_position_only():
    torch.manual_seed(2)
    rope = rope_tables(16, 20)
    q, k = torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16), torch.randn(1, 1, 1, 16).expand(1, 1, 20, 16)
    s = apply_rope(q, rope)[0, 0] @ apply_rope(k, rope)[0, 0].T  # s[i, j] depends on i - j only
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


def test_rope_tables_at_positions_are_rows_of_the_table():
    table = Rotary(8, max_seq_len=4)  # grows to cover position 29
    pos = torch.tensor([[0, 5, 29], [3, 3, 7]])
    cos, sin = table(3, torch.float64, positions=pos)
    full_cos, full_sin = rope_tables(8, 30, dtype=torch.float64)
    assert cos.shape == (2, 1, 3, 4)  # (B, 1, T, dims/2): broadcast over heads
    assert torch.equal(cos[:, 0], full_cos[pos]) and torch.equal(sin[:, 0], full_sin[pos])
    assert torch.equal(rope_tables(8, 3, dtype=torch.float64, positions=pos)[0], cos)


def test_rope_table_stays_float64_when_the_model_is_cast():
    table = Rotary(16, max_seq_len=512).to(torch.bfloat16)
    assert table.cos.dtype == table.sin.dtype == torch.float64
    # angle 300 * 1 rad: a bf16 angle table would be off by ~1 rad here; the cast values are exact
    want = torch.tensor(300.0, dtype=torch.float64).cos().to(torch.bfloat16)
    assert table(512, torch.bfloat16)[0][300, 0] == want


# ---------------------------------------------------------------- one RoPE table per model
def _trunk(attn, interleave=False, rope_dims=8, head_dim=None):
    from functools import partial

    from ethos.models.blocks import Trunk
    from ethos.models.config import ModelConfig
    from ethos.models.ffn import SwiGLU

    cfg = ModelConfig(attn=attn, ffn=partial(SwiGLU, d_ff=64), d_model=32, n_layers=3, n_heads=4,
                      head_dim=head_dim, rope_dims=rope_dims, rope_interleave=interleave, max_seq_len=8,
                      num_dense_layers=1, dense_attn=partial(MHA))
    torch.manual_seed(0)
    trunk = Trunk(cfg).double()
    with torch.no_grad():
        for p in trunk.parameters():
            p.normal_(0, 0.3)  # the depth-scaled init makes attention a faint signal next to x
    return trunk


def _attn_variants():
    from functools import partial

    from ethos.models.attention import MLA, MLAO

    return {"mha": partial(MHA), "mla_partial": partial(MLA, q_latent=16, kv_latent=8),
            "mla_decoupled": partial(MLA, q_latent=None, kv_latent=8, rope_style="decoupled"),
            "mla_o": partial(MLAO, q_latent=16, kv_latent=8, o_latent=12, rope_style="decoupled")}


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("variant", ["mha", "mla_partial", "mla_decoupled", "mla_o"])
def test_trunk_shares_one_rope_table_and_equals_per_layer_rope(variant, interleave):
    """The trunk builds (cos, sin) once per forward and hands them to every layer; the result equals
    running the blocks with each attention building its own tables (the former per-layer Rotary), and
    the layers hold no tables of their own."""
    trunk = _trunk(_attn_variants()[variant], interleave)
    assert [n for n, _ in trunk.named_buffers()] == ["rope.cos", "rope.sin"]
    calls = []
    trunk.rope.register_forward_hook(lambda m, args, out: calls.append(out))
    x = torch.randn(2, 11, 32, dtype=torch.float64)  # 11 > max_seq_len: the shared table grows
    pad = torch.ones(2, 11, dtype=torch.bool)
    pad[1, 7:] = False
    got = trunk(x, attn_mask=pad, is_causal=True)
    assert len(calls) == 1 and calls[0][0].shape == (11, 4) and calls[0][0].dtype == torch.float64
    h = x
    for block in trunk.blocks:  # rope=None: each attention module makes the tables itself
        h = h + block.attn(block.attn_norm(h), attn_mask=pad, is_causal=True)
        h = h + block.ffn(block.ffn_norm(h))
    want = trunk.norm(h)
    assert torch.equal(got, want)
    # explicit positions reach every layer: a shift leaves relative positions (and RoPE) unchanged,
    # stretching them does not
    shifted = trunk(x, attn_mask=pad, is_causal=True, positions=torch.arange(11) + 3)
    torch.testing.assert_close(shifted, got, rtol=1e-10, atol=1e-10)
    stretched = trunk(x, attn_mask=pad, is_causal=True, positions=2 * torch.arange(11)[None].expand(2, 11))
    assert (stretched - got).abs().max() > 1e-3  # vs 1e-10 for the shift


def test_trunk_tables_follow_the_autocast_dtype():
    """Under autocast q and k come out of the projections in bf16 while the residual stream stays
    float32: the shared tables must be cast to the dtype the rotation runs in (bf16), as a layer's own
    tables would be, or RoPE would upcast q/k and SDPA would see mixed dtypes."""
    trunk = _trunk(_attn_variants()["mla_decoupled"]).float()
    seen = []
    trunk.rope.register_forward_hook(lambda m, args, out: seen.append(out[0].dtype))
    x = torch.randn(2, 6, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = trunk(x, is_causal=True)
        h = x
        for block in trunk.blocks:
            h = h + block.attn(block.attn_norm(h), is_causal=True)
            h = h + block.ffn(block.ffn_norm(h))
        want = trunk.norm(h)
    assert seen == [torch.bfloat16]
    assert torch.equal(got, want)


def test_layer_rejects_tables_of_another_width():
    m = MHA(32, 4, rope_dims=8)
    with pytest.raises(ValueError, match="rope tables for 4 channels"):
        m(torch.randn(1, 5, 32), rope=rope_tables(4, 5))


# ---------------------------------------------------------------- token embedding
@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_separator_used_as_pad_still_gets_a_gradient(backbone):
    """When pad falls back to EOS/SEP, that id is also a real token (the document separator of packed
    data): its embedding row must train. padding_idx would zero its gradient."""
    from functools import partial

    from ethos.models.config import ModelConfig
    from ethos.models.decoder import Decoder
    from ethos.models.encoder import Encoder
    from ethos.models.ffn import SwiGLU

    sep = 3
    cfg = ModelConfig(attn=partial(MHA), ffn=partial(SwiGLU, d_ff=32), d_model=16, n_layers=1, n_heads=2,
                      rope_dims=4, max_seq_len=16)
    model = (Encoder if backbone == "encoder" else Decoder)(cfg, vocab_size=20, pad_id=sep)
    ids = torch.tensor([[5, 6, sep, 7, 8, sep]])  # two documents packed, each ending in SEP
    model(ids).pow(2).sum().backward()
    grad = model.embed.weight.grad
    assert grad[sep].abs().sum() > 0
    assert grad[5].abs().sum() > 0 and grad[9].abs().sum() == 0  # sanity: an absent token gets none
