"""Rotary position embedding on `dims` channels of each head.

One float64 table per model (the trunk's `Rotary`); once per forward it gives (cos, sin) for the
current positions in the activation dtype, and every attention layer rotates with `apply_rope`.
`rope_tables` builds the same pair for standalone use of an attention module (tests, benchmarks).

Two pairings are common and both appear in checkpoints we load: `interleave=False` rotates halves
(channel i with i + dims/2, GPT-NeoX / most encoders); `interleave=True` rotates adjacent pairs
(2i, 2i+1), the layout of HF's DeepSeek-V3 config (`rope_interleave=True`). We support both rather
than permuting weights silently; the tables are the same, only `apply_rope` differs.
"""

import torch
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]  # (cos, sin), (T, dims/2) or (B, 1, T, dims/2), in the activation dtype


def rope_angles(dims: int, theta: float, positions: Tensor) -> Tensor:
    """float64 angles position * theta^(-2i/dims), shape positions.shape + (dims/2,)."""
    inv_freq = theta ** (-torch.arange(0, dims, 2, dtype=torch.float64, device=positions.device) / dims)
    return positions.to(torch.float64)[..., None] * inv_freq


def _shape(t: Tensor) -> Tensor:
    # per-sequence positions (B, T, dims/2) -> (B, 1, T, dims/2): broadcast over the heads
    return t.unsqueeze(1) if t.dim() == 3 else t


def rope_tables(dims: int, seq_len: int, theta: float = 10000.0, dtype=torch.float32, device=None,
                positions: Tensor | None = None) -> Rope:
    """(cos, sin) for positions 0..seq_len-1 (or `positions`, (T,) or (B, T)), cast once to `dtype`."""
    if positions is None:
        positions = torch.arange(seq_len, device=device)
    ang = _shape(rope_angles(dims, theta, positions))
    return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: Tensor, rope: Rope, interleave: bool = False) -> Tensor:
    """x: (..., T, D) with D >= dims; rotates x[..., :dims] and leaves the rest untouched."""
    cos, sin = rope
    dims = 2 * cos.shape[-1]
    rot, rest = x[..., :dims], x[..., dims:]
    if interleave:
        r1, r2 = rot[..., 0::2], rot[..., 1::2]
        out = torch.stack((r1 * cos - r2 * sin, r1 * sin + r2 * cos), dim=-1).flatten(-2)
    else:
        r1, r2 = rot.chunk(2, dim=-1)
        out = torch.cat((r1 * cos - r2 * sin, r1 * sin + r2 * cos), dim=-1)
    return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out


class Rotary(nn.Module):
    """The model's float64 cos/sin tables (T, dims/2), grown on demand; shared by all layers."""

    def __init__(self, dims: int, theta: float = 10000.0, max_seq_len: int = 2048):
        super().__init__()
        self.dims, self.theta = dims, theta
        self._build(max_seq_len)

    def _build(self, seq_len: int, device=None) -> None:
        # float64 tables cast at use: exact in every dtype (bf16 angles would be off past ~256 positions)
        ang = rope_angles(self.dims, self.theta, torch.arange(seq_len, device=device))
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() would cast the tables too; keep them float64 (see _build)
        super()._apply(fn, recurse)
        if self.cos.dtype != torch.float64:
            self._build(self.cos.shape[0], device=self.cos.device)
        return self

    def forward(self, seq_len: int, dtype: torch.dtype, positions: Tensor | None = None) -> Rope:
        """(cos, sin) for positions 0..seq_len-1 (or `positions`, (T,) or (B, T)) in `dtype`."""
        needed = seq_len
        if positions is not None and not torch.compiler.is_compiling():
            # a compiled graph must not read data (a graph break): there positions must lie below
            # max(max_seq_len, seq_len), as document-restarted positions always do
            needed = max(needed, int(positions.max()) + 1)
        if needed > self.cos.shape[0]:
            self._build(needed, device=self.cos.device)
        if positions is None:
            cos, sin = self.cos[:seq_len], self.sin[:seq_len]
        else:
            cos, sin = _shape(self.cos[positions]), _shape(self.sin[positions])
        return cos.to(dtype), sin.to(dtype)
