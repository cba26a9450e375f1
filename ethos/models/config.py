"""The model config: sizes shared by every backbone plus the attention and FFN factories.

`attn`, `ffn` (and optionally `dense_attn`, `dense_ffn` for the first `num_dense_layers` layers)
are partials built by Hydra from `_target_` + `_partial_: true`; the backbone calls them with the
common arguments below, the config supplies variant-specific ones.
"""

from collections.abc import Callable
from dataclasses import dataclass

from ethos.errors import ConfigError

NORMS = ("rmsnorm", "layernorm")


@dataclass
class ModelConfig:
    attn: Callable
    ffn: Callable
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    head_dim: int | None = None  # default d_model // n_heads
    rope_dims: int = 32  # RoPE channels per q/k head (0 = none)
    rope_theta: float = 10000.0
    rope_interleave: bool = False  # rotate pairs (2i, 2i+1) instead of halves
    learned_pos: bool = False  # learned absolute positions (added to the token embedding)
    max_seq_len: int = 512
    num_dense_layers: int = 0  # first layers built with dense_attn / dense_ffn
    dense_attn: Callable | None = None  # None = same as attn
    dense_ffn: Callable | None = None  # None = same as ffn
    norm: str = "rmsnorm"  # rmsnorm | layernorm (timm ViT / BERT)
    norm_eps: float = 1e-6
    dropout: float = 0.0
    compile: bool = False  # torch.compile the backbone blocks

    def __post_init__(self):
        for key in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)!r}: must be a positive integer")
        if self.head_dim is None:
            if self.d_model % self.n_heads:
                divisors = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
                raise ConfigError(
                    f"model.n_heads={self.n_heads}: must divide model.d_model={self.d_model} "
                    f"(valid: {', '.join(map(str, divisors))}) or set model.head_dim")
            self.head_dim = self.d_model // self.n_heads
        elif self.head_dim < 1:
            raise ConfigError(f"model.head_dim={self.head_dim}: must be a positive integer or null")
        if not (0 <= self.rope_dims <= self.head_dim) or self.rope_dims % 2:
            raise ConfigError(
                f"model.rope_dims={self.rope_dims}: must be even and between 0 and the head dim "
                f"{self.head_dim} (0 = no RoPE)")
        if not 0 <= self.num_dense_layers <= self.n_layers:
            raise ConfigError(
                f"model.num_dense_layers={self.num_dense_layers}: must be between 0 and "
                f"model.n_layers={self.n_layers}")
        if self.norm not in NORMS:
            raise ConfigError(f"model.norm={self.norm!r}: valid are {', '.join(NORMS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout}: must be in [0, 1)")

    def common(self) -> dict:
        """Arguments every attention module receives from the backbone."""
        return dict(d_model=self.d_model, n_heads=self.n_heads, head_dim=self.head_dim,
                    rope_dims=self.rope_dims, rope_theta=self.rope_theta,
                    rope_interleave=self.rope_interleave, max_seq_len=self.max_seq_len,
                    dropout=self.dropout)
