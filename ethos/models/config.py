"""The model config: sizes shared by every backbone plus the attention and FFN factories.

`attn`, `ffn` (and optionally `dense_attn`, `dense_ffn` for the first `num_dense_layers` layers)
are partials built by Hydra from `_target_` + `_partial_: true`; the backbone calls them with the
common arguments below, the config supplies variant-specific ones.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ethos.errors import ConfigError
from ethos.types import HalfOpenUnit, NonNegativeInt, PositiveFloat, PositiveInt


@dataclass
class ModelConfig:
    attn: Callable
    ffn: Callable
    d_model: PositiveInt = 256
    n_layers: PositiveInt = 6
    n_heads: PositiveInt = 8
    head_dim: PositiveInt | None = None  # default d_model // n_heads
    rope_dims: NonNegativeInt = 32  # RoPE channels per q/k head (0 = none)
    rope_theta: PositiveFloat = 10000.0
    rope_interleave: bool = False  # rotate pairs (2i, 2i+1) instead of halves
    learned_pos: bool = False  # learned absolute positions (added to the token embedding)
    max_seq_len: PositiveInt = 512
    num_dense_layers: NonNegativeInt = 0  # first layers built with dense_attn / dense_ffn
    dense_attn: Callable | None = None  # None = same as attn
    dense_ffn: Callable | None = None  # None = same as ffn
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # rmsnorm | layernorm (timm ViT / BERT)
    norm_eps: PositiveFloat = 1e-6
    dropout: HalfOpenUnit = 0.0
    compile: bool = False  # torch.compile the backbone blocks
    # the modern decoder baseline (docs/design.md §10), each off by default
    tie_embeddings: bool = True  # false: a vocabulary head of its own (text backbones)
    logit_softcap: PositiveFloat | None = None  # c * tanh(logits / c) on the vocabulary logits (Gemma 2)
    zero_init: bool = False  # zero-initialise the projections into the residual stream, and an untied head

    def __post_init__(self):
        # types and ranges are in the annotations (checked by ethos.config.validate); rules across keys here
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
                raise ConfigError(
                    f"model.n_heads={self.n_heads}: must divide model.d_model={self.d_model} "
                    f"(valid: {', '.join(map(str, divisors))}) or set model.head_dim")
            self.head_dim = self.d_model // self.n_heads
        # partial RoPE rotates channels of each head, so rope_dims <= head_dim; decoupled RoPE (MLA) adds
        # rope_dims extra channels (d_r, may exceed d_nope = head_dim): no upper bound for those layers
        used = ([self.attn] if self.num_dense_layers < self.n_layers else []) + \
            ([self.dense_attn or self.attn] if self.num_dense_layers else [])
        partial = any(getattr(a, "keywords", {}).get("rope_style", "partial") != "decoupled" for a in used)
        if self.rope_dims < 0 or self.rope_dims % 2 or (partial and self.rope_dims > self.head_dim):
            bound = f"between 0 and the head dim {self.head_dim}" if partial else ">= 0 (decoupled: extra channels)"
            raise ConfigError(f"model.rope_dims={self.rope_dims}: must be even and {bound} (0 = no RoPE)")
        if self.num_dense_layers > self.n_layers:
            raise ConfigError(
                f"model.num_dense_layers={self.num_dense_layers}: must be between 0 and "
                f"model.n_layers={self.n_layers}")

    def common(self) -> dict:
        """Arguments every attention module receives from the backbone."""
        return dict(d_model=self.d_model, n_heads=self.n_heads, head_dim=self.head_dim,
                    rope_dims=self.rope_dims, rope_theta=self.rope_theta,
                    rope_interleave=self.rope_interleave, max_seq_len=self.max_seq_len,
                    dropout=self.dropout)
