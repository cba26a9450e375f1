"""One layer's attention weights in one layout, whatever the checkpoint they were read from.

Row vectors, as in docs/design.md (q = x W_q), every RMSNorm gain folded into the projection after it: the block's
input norm into W_q / W_k / W_v / W_qa / W_kva / W_kr, the latent norms into W_qb and W_kvb. What is not a linear
map (the RMS division, LayerNorm's centring and biases, Qwen3's per-head q/k RMS division) is left out; `notes`
says so. Projection biases, gates and sink logits are not read.
"""

from dataclasses import dataclass, field

import torch
from torch import Tensor

PARTS = ("o", "q", "k", "v", "qa", "kva", "kr")


@dataclass
class AttentionWeights:
    """One layer's attention matrices, per head. Shapes (H query heads, G key/value heads, d model width):

    o   (H, d_v, d)     W_O_h: out = sum_h o_h W_O_h
    q   (H, q_in, d_q)  W_qb_h from the q latent (MLA, q_in = r_q) or W_Q_h from x (q_in = d); for decoupled
                        MLA the last d_rope of its d_q channels are the rope ones
    k   (G, k_in, d_k)  W_kvb_k_h from the kv latent (MLA, nope part, k_in = r_kv) or W_K_g from x
    v   (G, v_in, d_v)  W_kvb_v_h (MLA) or W_V_g
    qa  (d, r_q), kva (d, r_kv), kr (d, d_r): the MLA down-projections (None where the layer has none)

    Query head h reads key/value head `kv_head[h]` (h // (H / G), as HF's repeat_kv); q's first d_k channels
    pair with k's. Parts not asked for are None.
    """

    layer: int
    attention: str  # "mla" | "mha"
    n_heads: int
    n_kv_heads: int
    d_rope: int = 0
    o: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    v: Tensor | None = None
    qa: Tensor | None = None
    kva: Tensor | None = None
    kr: Tensor | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def kv_head(self) -> Tensor:
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


def per_head(w: Tensor, heads: int) -> Tensor:
    """A Linear weight (heads * width, in) whose output rows are laid out per head -> (heads, in, width)."""
    return w.view(heads, -1, w.shape[-1]).transpose(1, 2)


def out_heads(w: Tensor, heads: int) -> Tensor:
    """An output projection's weight (d, heads * d_v), heads concatenated on its input -> (heads, d_v, d)."""
    return w.T.view(heads, -1, w.shape[0])
