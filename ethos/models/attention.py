"""Attention variants sharing one call signature: forward(x, attn_mask=None, is_causal=False).

`attn_mask` is a (B, T) bool padding mask, True = real token. Every module gets the same common
constructor arguments from the backbone (d_model, n_heads, head_dim, rope_dims, rope_theta,
rope_interleave, max_seq_len, dropout); variant-specific ones come from the model config.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.models.rope import Rotary


def sdpa_mask(attn_mask: Tensor | None, is_causal: bool, T: int, device) -> tuple[Tensor | None, bool]:
    """Turn a (B, T) padding mask into what SDPA wants; keeps the fast is_causal path when possible."""
    if attn_mask is None:
        return None, is_causal
    mask = attn_mask[:, None, None, :].bool()  # (B, 1, 1, T): queries may attend to real keys
    if is_causal:
        mask = mask & torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return mask, False


class MHA(nn.Module):
    """Multi-head attention with partial RoPE on the first `rope_dims` channels of every q/k head."""

    def __init__(self, d_model: int, n_heads: int, head_dim: int | None = None, rope_dims: int = 0,
                 rope_theta: float = 10000.0, rope_interleave: bool = False, max_seq_len: int = 2048,
                 dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, head_dim or d_model // n_heads
        inner = n_heads * self.head_dim
        self.qkv = nn.Linear(d_model, 3 * inner, bias=bias)  # rows laid out [W_q; W_k; W_v]
        self.out = nn.Linear(inner, d_model, bias=bias)
        self.rope = Rotary(rope_dims, rope_theta, rope_interleave, max_seq_len)
        self.dropout = dropout

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rope(q), self.rope(k)
        mask, causal = sdpa_mask(attn_mask, is_causal, T, x.device)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(B, T, -1))
