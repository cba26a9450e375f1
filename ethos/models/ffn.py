import torch.nn.functional as F
from torch import Tensor, nn


class SwiGLU(nn.Module):
    """Gated FFN: W_2 (silu(x W_1) * x W_3). `pad_mask` is accepted for a common FFN signature."""

    def __init__(self, d_model: int, d_ff: int = 1024, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=bias)  # gate and up in one matmul
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)
