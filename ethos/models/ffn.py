from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ethos.types import PositiveInt

ACTIVATIONS = {"gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
               "silu": F.silu,
               # relu(x)^2 (So et al. 2021, Primer); the MLP of modded-nanogpt and nanochat
               "relu2": lambda x: F.relu(x).square()}


class SwiGLU(nn.Module):
    """Gated FFN: W_2 (silu(x W_1) * x W_3). `pad_mask` is accepted for a common FFN signature."""

    def __init__(self, d_model: int, d_ff: PositiveInt = 1024, bias: bool = False):
        super().__init__()
        self.w13 = nn.Linear(d_model, 2 * d_ff, bias=bias)  # gate and up in one matmul
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)

    @staticmethod
    def param_count(d_model: int, d_ff: int = 1024, bias: bool = False, **_) -> int:
        return 3 * d_model * d_ff + bias * (2 * d_ff + d_model)

    @staticmethod
    def flops(d_model: int, d_ff: int = 1024, **_) -> int:
        """Forward FLOPs per token: W_1, W_3 (d -> d_ff) and W_2 (d_ff -> d)."""
        return 2 * 3 * d_model * d_ff

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)


class MLP(nn.Module):
    """Classic two-matrix FFN, W_2 act(x W_1): the block of BERT, GPT-2 and timm's ViT."""

    def __init__(self, d_model: int, d_ff: PositiveInt = 1024,
                 activation: Literal["gelu", "gelu_tanh", "relu", "silu", "relu2"] = "gelu", bias: bool = True):
        super().__init__()
        self.w1 = nn.Linear(d_model, d_ff, bias=bias)
        self.w2 = nn.Linear(d_ff, d_model, bias=bias)
        self.act = ACTIVATIONS[activation]

    @staticmethod
    def param_count(d_model: int, d_ff: int = 1024, bias: bool = True, **_) -> int:
        return 2 * d_model * d_ff + bias * (d_ff + d_model)

    @staticmethod
    def flops(d_model: int, d_ff: int = 1024, **_) -> int:
        """Forward FLOPs per token: W_1 (d -> d_ff) and W_2 (d_ff -> d)."""
        return 2 * 2 * d_model * d_ff

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        return self.w2(self.act(self.w1(x)))
