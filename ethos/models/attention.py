"""Attention variants sharing one call signature: forward(x, attn_mask=None, is_causal=False, rope=None, docs=None).

`attn_mask` is a (B, T) bool padding mask, True = real token. `rope` is the (cos, sin) pair the trunk
computes once per forward for all its layers (ethos.models.rope); standalone calls may leave it out
and the module builds the same tables itself. `docs` (ethos.models.scores.Docs, document masking) keeps
each token's attention within its own packed document. Every module gets the same common
constructor arguments from the backbone (d_model, n_heads, head_dim, rope_dims, rope_theta,
rope_interleave, max_seq_len, dropout); variant-specific ones come from the model config.

Every variant takes `qk_norm` (QK-norm: RMSNorm over each q and k head before RoPE, as Qwen3, OLMo-2 and
Gemma 3; one learned gain per tensor of head width, shared by all heads, eps = model.norm_eps) and the same
score-function arguments (ethos/models/scores.py, docs/design.md §8): `score`
(softmax | softmax1 | sink | sigmoid | relu), `gate` (none | head | elementwise) and `sigmoid_bias` (null =
-log n); one `Attend` module does what follows q, k, v for all of them.

Each class has closed forms `param_count(...)` and `flops(..., seq_len=T)` (forward FLOPs per token)
taking the same arguments as its constructor, so the sizes and costs of a config can be read without
building it (tests check them against the module and against torch's FlopCounterMode). FLOPs follow the
convention of ethos/models/flops.py: 2 per multiply-add of every matmul, attention scores and weighted
sums over the full T x T (also when causal).
"""

from typing import Literal

import torch
from torch import Tensor, nn

from ethos.errors import ConfigError
from ethos.models.rope import Rope, apply_rope, rope_tables
from ethos.models.scores import Attend, Docs, Gate, Score, sdpa_mask  # noqa: F401 - sdpa_mask: its old home
from ethos.types import PositiveFloat, PositiveInt

RopeStyle = Literal["partial", "decoupled"]


def _tables(rope: Rope | None, dims: int, theta: float, q: Tensor) -> Rope:
    """The trunk's shared tables, or (standalone use) the same ones built here in q's dtype."""
    if rope is None:
        return rope_tables(dims, q.shape[-2], theta, q.dtype, q.device)
    if 2 * rope[0].shape[-1] != dims:
        raise ValueError(f"rope tables for {2 * rope[0].shape[-1]} channels, this layer rotates {dims}")
    return rope


class MHA(nn.Module):
    """Multi-head attention with partial RoPE on the first `rope_dims` channels of every q/k head.

    `n_kv_heads` = H_kv < H is grouped-query attention (GQA; 1 = multi-query, MQA): H_kv key/value heads,
    each read by H / H_kv consecutive query heads (HF's repeat_kv; `Attend` expands them, or SDPA does with
    enable_gqa). The fused projection's rows are [W_q (H d_h); W_k (H_kv d_h); W_v (H_kv d_h)]: with
    H_kv = H the layout [W_q; W_k; W_v] of earlier checkpoints. `qk_norm`: RMSNorm over each q and k head
    (gains `q_head_norm`, `k_head_norm`, d_h wide) before RoPE.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0,
                 rope_theta: float = 10000.0, rope_interleave: bool = False, max_seq_len: int = 2048,
                 dropout: float = 0.0, bias: bool = False, score: Score = "softmax", gate: Gate = "none",
                 sigmoid_bias: float | None = None, n_kv_heads: PositiveInt | None = None, qk_norm: bool = False,
                 norm_eps: PositiveFloat = 1e-6):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        self.n_kv_heads = kv_heads(n_heads, n_kv_heads)
        self.split = [n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim]
        self.qkv = nn.Linear(d_model, sum(self.split), bias=bias)  # rows laid out [W_q; W_k; W_v]
        self.q_head_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_head_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.attend = Attend(d_model, n_heads, self.head_dim, score, gate, sigmoid_bias, bias)
        self.out = nn.Linear(self.split[0], d_model, bias=bias)
        self.rope_dims, self.rope_theta, self.rope_interleave = rope_dims, rope_theta, rope_interleave
        self.dropout = dropout

    @staticmethod
    def param_count(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *,
                    bias: bool = False, score: str = "softmax", gate: str = "none", n_kv_heads: int | None = None,
                    qk_norm: bool = False, **_) -> int:
        d_h = head_dim or d_model // n_heads
        inner, kv = n_heads * d_h, (n_kv_heads or n_heads) * d_h
        # W_q and W_O, W_k and W_v, their biases, the two QK-norm gains
        return (2 * d_model * inner + 2 * d_model * kv + bias * (inner + 2 * kv + d_model) + qk_norm * 2 * d_h
                + Attend.param_count(d_model, n_heads, d_h, score, gate, bias))

    @staticmethod
    def flops(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *, seq_len: int,
              score: str = "softmax", gate: str = "none", n_kv_heads: int | None = None, **_) -> int:
        d_h = head_dim or d_model // n_heads
        inner, kv = n_heads * d_h, (n_kv_heads or n_heads) * d_h
        # W_q, W_O and the narrower W_k, W_v; q k^T and p v stay T * d_h multiply-adds per query head
        # (GQA shares keys and values, not scores); the gate. QK-norm is elementwise: no matmul
        return (2 * (2 * d_model * inner + 2 * d_model * kv) + 2 * 2 * seq_len * inner
                + Attend.flops(d_model, n_heads, d_h, d_h, score, gate))

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                rope: Rope | None = None, docs: Docs | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.qkv(x).split(self.split, -1))
        if self.q_head_norm is not None:  # before RoPE (Qwen3, OLMo-2): gains act on projection channels
            q, k = self.q_head_norm(q), self.k_head_norm(k)
        if self.rope_dims:
            rope = _tables(rope, self.rope_dims, self.rope_theta, q)
            q, k = apply_rope(q, rope, self.rope_interleave), apply_rope(k, rope, self.rope_interleave)
        # k, v keep their n_kv_heads: Attend (SDPA's enable_gqa) shares them over the query heads
        return self.out(self.attend(x, q, k, v, attn_mask, is_causal, dropout_p=self.dropout, docs=docs))


def kv_heads(n_heads: int, n_kv_heads: int | None) -> int:
    """The key/value head count: n_heads when None (plain MHA), else a divisor of n_heads."""
    if n_kv_heads is None:
        return n_heads
    if n_kv_heads < 1 or n_heads % n_kv_heads:
        valid = ", ".join(str(g) for g in range(1, n_heads + 1) if n_heads % g == 0)
        raise ConfigError(f"model.attn.n_kv_heads={n_kv_heads}: must divide model.n_heads={n_heads} "
                          f"(valid: {valid}; null = n_heads)")
    return n_kv_heads


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3).

    c_q = RMSNorm(x W_qa) (r_q = `q_latent`; null = q straight from x), q = c_q W_qb;
    c_kv = RMSNorm(x W_kva) (r_kv = `kv_latent`), [k_nope_h, v_h] = c_kv W_kvb_h, W_kvb laid out per
    head as (H, d_k + d_v) rows: the layout of DeepSeek checkpoints, so their weights load unpermuted.

    rope_style="partial": q/k heads are `head_dim` wide, RoPE on their first `rope_dims` channels
    (the reference study's encoder). rope_style="decoupled" (DeepSeek): `head_dim` is d_nope, q gets
    `rope_dims` extra per-head channels from c_q, and ONE rope key head k_r = RoPE(x W_kr) from x is
    shared by all heads; scores are scaled by (d_nope + d_r)^-0.5.

    All down-projections (W_qa or W_q, W_kva, W_kr) read the same x, so they are one fused Linear
    `qkv_a`: one launch instead of three, rows laid out [W_qa; W_kva; W_kr].

    `qk_norm` (QK-norm, before RoPE as in Qwen3 / OLMo-2 / Gemma 3): partial RoPE normalises each whole q and
    k head (gains `q_head_norm`, `k_head_norm`, d_k wide). Decoupled RoPE normalises the nope parts (q_nope_h
    and each head's k_nope_h: `q_head_norm`, `k_head_norm`, d_k wide) and the rope parts (q_rope_h and the ONE
    shared rope key k_r: `q_rope_norm`, `k_rope_norm`, d_r wide) separately. One RMS over a whole key head
    [k_nope_h; k_r] would divide k_r by a different per-head factor in every head: the rope key would stop
    being one head shared by all, and the cache (c_kv + k_r) could no longer hold it once. Normalised on its
    own, k_r stays a single head, cached once as before; each score is then the sum of a normalised nope and
    a normalised rope dot product.
    """

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0,
                 rope_theta: float = 10000.0, rope_interleave: bool = False, max_seq_len: int = 2048,
                 dropout: float = 0.0, q_latent: PositiveInt | None = None, kv_latent: PositiveInt = 64,
                 v_head_dim: PositiveInt | None = None, rope_style: RopeStyle = "partial", bias: bool = False,
                 norm_eps: PositiveFloat = 1e-6, score: Score = "softmax", gate: Gate = "none",
                 sigmoid_bias: float | None = None, qk_norm: bool = False):
        super().__init__()
        head_dim = head_dim or d_model // n_heads
        if rope_style == "decoupled" and (rope_dims < 2 or rope_dims % 2):
            raise ConfigError(f"model.rope_dims={rope_dims}: rope_style=decoupled needs a positive even "
                              "number of rope channels (the shared rope key head)")
        self.n_heads, self.rope_style = n_heads, rope_style
        self.q_latent, self.kv_latent = q_latent, kv_latent
        self.d_v = v_head_dim or head_dim
        decoupled = rope_style == "decoupled"
        # per-head widths: q/k heads are d_k (+ d_r rope channels when decoupled)
        self.d_k, self.d_r = head_dim, (rope_dims if decoupled else 0)
        self.d_qk = self.d_k + self.d_r
        q_in = q_latent or n_heads * self.d_qk
        self.split = [q_in, kv_latent, self.d_r]
        self.qkv_a = nn.Linear(d_model, sum(self.split), bias=bias)
        self.q_norm = nn.RMSNorm(q_latent, eps=norm_eps) if q_latent else None
        self.q_b = nn.Linear(q_latent, n_heads * self.d_qk, bias=False) if q_latent else None
        self.kv_norm = nn.RMSNorm(kv_latent, eps=norm_eps)
        self.kv_b = nn.Linear(kv_latent, n_heads * (self.d_k + self.d_v), bias=False)
        # QK-norm gains: whole heads (partial) or nope parts (decoupled); the rope parts (decoupled) apart
        self.q_head_norm = nn.RMSNorm(self.d_k, eps=norm_eps) if qk_norm else None
        self.k_head_norm = nn.RMSNorm(self.d_k, eps=norm_eps) if qk_norm else None
        self.q_rope_norm = nn.RMSNorm(self.d_r, eps=norm_eps) if qk_norm and decoupled else None
        self.k_rope_norm = nn.RMSNorm(self.d_r, eps=norm_eps) if qk_norm and decoupled else None
        self.attend = Attend(d_model, n_heads, self.d_v, score, gate, sigmoid_bias, bias)
        self.out = nn.Linear(n_heads * self.d_v, d_model, bias=bias)
        self.rope_dims, self.rope_theta, self.rope_interleave = rope_dims, rope_theta, rope_interleave
        self.scale = self.d_qk ** -0.5
        self.dropout = dropout

    @staticmethod
    def param_count(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *,
                    q_latent: int | None = None, kv_latent: int = 64, v_head_dim: int | None = None,
                    rope_style: str = "partial", bias: bool = False, score: str = "softmax", gate: str = "none",
                    qk_norm: bool = False, **_) -> int:
        d_k = head_dim or d_model // n_heads
        d_v = v_head_dim or d_k
        d_r = rope_dims if rope_style == "decoupled" else 0
        q_heads = n_heads * (d_k + d_r)
        if q_latent:  # W_qa, its RMSNorm gain, W_qb
            q = d_model * q_latent + q_latent + q_latent * q_heads
        else:
            q = d_model * q_heads
        kv = d_model * (kv_latent + d_r) + kv_latent + kv_latent * n_heads * (d_k + d_v)
        down_bias = (q_latent or q_heads) + kv_latent + d_r
        return (q + kv + n_heads * d_v * d_model + bias * (down_bias + d_model) + qk_norm * 2 * (d_k + d_r)
                + Attend.param_count(d_model, n_heads, d_v, score, gate, bias))

    @staticmethod
    def flops(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *, seq_len: int,
              q_latent: int | None = None, kv_latent: int = 64, v_head_dim: int | None = None,
              rope_style: str = "partial", score: str = "softmax", gate: str = "none", **_) -> int:
        d_k = head_dim or d_model // n_heads
        d_v = v_head_dim or d_k
        d_r = rope_dims if rope_style == "decoupled" else 0
        q_heads = n_heads * (d_k + d_r)
        down = d_model * ((q_latent or q_heads) + kv_latent + d_r)  # fused W_qa (or W_q), W_kva, W_kr
        up = (q_latent or 0) * q_heads + kv_latent * n_heads * (d_k + d_v)  # W_qb, W_kvb
        scores = seq_len * (q_heads + n_heads * d_v)  # q k^T over d_k + d_r channels, p v over d_v
        return (2 * (down + up + scores + n_heads * d_v * d_model)
                + Attend.flops(d_model, n_heads, d_k + d_r, d_v, score, gate))

    def project_out(self, o: Tensor) -> Tensor:
        """(B, T, H * d_v) concatenated head outputs -> (B, T, d)."""
        return self.out(o)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                rope: Rope | None = None, docs: Docs | None = None) -> Tensor:
        B, T, _ = x.shape
        H = self.n_heads
        q, c_kv, k_r = self.qkv_a(x).split(self.split, dim=-1)
        if self.q_b is not None:
            q = self.q_b(self.q_norm(q))
        q = q.view(B, T, H, self.d_qk).transpose(1, 2)
        kv = self.kv_b(self.kv_norm(c_kv)).view(B, T, H, self.d_k + self.d_v).transpose(1, 2)
        k, v = kv.split([self.d_k, self.d_v], dim=-1)
        if self.rope_dims:
            rope = _tables(rope, self.rope_dims, self.rope_theta, q)
        if self.d_r:  # decoupled: rotate the trailing d_r query channels and the shared key head
            q_nope, q_r = q.split([self.d_k, self.d_r], dim=-1)
            k_r = k_r.view(B, 1, T, self.d_r)
            if self.q_head_norm is not None:  # nope and rope parts apart: k_r stays one shared head
                q_nope, k = self.q_head_norm(q_nope), self.k_head_norm(k)
                q_r, k_r = self.q_rope_norm(q_r), self.k_rope_norm(k_r)
            q = torch.cat((q_nope, apply_rope(q_r, rope, self.rope_interleave)), dim=-1)
            k_r = apply_rope(k_r, rope, self.rope_interleave).expand(B, H, T, self.d_r)
            k = torch.cat((k, k_r), dim=-1)
        else:
            if self.q_head_norm is not None:  # whole heads, before RoPE
                q, k = self.q_head_norm(q), self.k_head_norm(k)
            if self.rope_dims:  # partial: rotate the first rope_dims channels of every q and k head
                q, k = apply_rope(q, rope, self.rope_interleave), apply_rope(k, rope, self.rope_interleave)
        return self.project_out(self.attend(x, q, k, v, attn_mask, is_causal, self.scale, self.dropout, docs))


class MLAO(MLA):
    """MLA with a shared output latent (the reference study's MLA-o).

    W_O is split into per-head W_OA_h (d_v -> d_o) and one shared W_OB (d_o -> d):
    out = (sum_h o_h W_OA_h) W_OB = concat_h(o_h) [W_OA stacked] W_OB, i.e. two plain matmuls on the
    concatenated heads (no per-head loop). Fewer FLOPs than MLA's W_O when
    d_o < d * H * d_v / (H * d_v + d).
    """

    # explicit arguments (not **kwargs): the config check reads their types from this signature
    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0,
                 rope_theta: float = 10000.0, rope_interleave: bool = False, max_seq_len: int = 2048,
                 dropout: float = 0.0, q_latent: PositiveInt | None = None, kv_latent: PositiveInt = 64,
                 v_head_dim: PositiveInt | None = None, rope_style: RopeStyle = "partial", bias: bool = False,
                 norm_eps: PositiveFloat = 1e-6, score: Score = "softmax", gate: Gate = "none",
                 sigmoid_bias: float | None = None, o_latent: PositiveInt = 64, qk_norm: bool = False):
        super().__init__(d_model, n_heads, head_dim, rope_dims, rope_theta, rope_interleave, max_seq_len,
                         dropout, q_latent, kv_latent, v_head_dim, rope_style, bias, norm_eps, score, gate,
                         sigmoid_bias, qk_norm)
        self.o_latent = o_latent
        inner = self.out.in_features
        del self.out
        self.o_a = nn.Linear(inner, o_latent, bias=False)  # stacked W_OA_h: (H * d_v) -> d_o
        self.o_b = nn.Linear(o_latent, d_model, bias=bias)  # shared W_OB (depth-scaled init)

    @staticmethod
    def param_count(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *,
                    o_latent: int = 64, **kwargs) -> int:
        inner = n_heads * (kwargs.get("v_head_dim") or head_dim or d_model // n_heads)
        mla = MLA.param_count(d_model, n_heads, head_dim, rope_dims, **kwargs)
        return mla - inner * d_model + o_latent * (inner + d_model)  # W_O -> W_OA, W_OB

    @staticmethod
    def flops(d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0, *, seq_len: int,
              o_latent: int = 64, **kwargs) -> int:
        inner = n_heads * (kwargs.get("v_head_dim") or head_dim or d_model // n_heads)
        mla = MLA.flops(d_model, n_heads, head_dim, rope_dims, seq_len=seq_len, **kwargs)
        return mla + 2 * (o_latent * (inner + d_model) - inner * d_model)  # W_O -> W_OA, W_OB

    def project_out(self, o: Tensor) -> Tensor:
        return self.o_b(self.o_a(o))
