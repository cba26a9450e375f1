"""Rotary position embedding on the first `dims` channels of each head.

Two pairings are common and both appear in checkpoints we load: `interleave=False` rotates halves
(channel i with i + dims/2, GPT-NeoX / most encoders); `interleave=True` rotates adjacent pairs
(2i, 2i+1), the layout of HF's DeepSeek-V3 config (`rope_interleave=True`). We support both rather
than permuting weights silently.
"""

import torch
from torch import Tensor, nn


class Rotary(nn.Module):
    def __init__(self, dims: int, theta: float = 10000.0, interleave: bool = False, max_seq_len: int = 2048):
        super().__init__()
        self.dims, self.theta, self.interleave = dims, theta, interleave
        self._build(max_seq_len)

    def _build(self, seq_len: int, device=None) -> None:
        # float64 tables cast at use: exact in every dtype (bf16 angles would be off past ~256 positions)
        inv_freq = self.theta ** (-torch.arange(0, self.dims, 2, dtype=torch.float64, device=device) / self.dims)
        ang = torch.outer(torch.arange(seq_len, dtype=torch.float64, device=device), inv_freq)  # (T, dims/2)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x: Tensor, positions: Tensor | None = None) -> Tensor:
        """x: (..., T, D) with D >= dims; rotates x[..., :dims] and leaves the rest untouched."""
        if self.dims == 0:
            return x
        T = x.shape[-2]
        if positions is None:
            if T > self.cos.shape[0]:
                self._build(T, device=x.device)
            cos, sin = self.cos[:T], self.sin[:T]
        else:
            if int(positions.max()) >= self.cos.shape[0]:
                self._build(int(positions.max()) + 1, device=x.device)
            cos, sin = self.cos[positions], self.sin[positions]
        rot, rest = x[..., : self.dims], x[..., self.dims :]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        if self.interleave:
            r1, r2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((r1 * cos - r2 * sin, r1 * sin + r2 * cos), dim=-1).flatten(-2)
        else:
            r1, r2 = rot.chunk(2, dim=-1)
            out = torch.cat((r1 * cos - r2 * sin, r1 * sin + r2 * cos), dim=-1)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out
