"""Block-scaled FP8 weights (DeepSeek-V3's e4m3 with a `weight_scale_inv` per 128 x 128 block) back to floats."""

import math

import torch
from torch import Tensor

from ethos.errors import ConfigError

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def dequantize_fp8(w: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128),
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """W[i, j] = w[i, j] * scale_inv[i // bm, j // bn] for block-scaled FP8 (DeepSeek-V3), partial edge blocks
    included. In place on the one `dtype` copy: the scale is expanded along columns only (1/bm of the weight),
    full row blocks are a (M // bm, bm, N) view, the partial last row block takes the last scale row."""
    (M, N), (bm, bn) = w.shape, block
    expected = (math.ceil(M / bm), math.ceil(N / bn))
    if tuple(scale_inv.shape) != expected:
        raise ConfigError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} for a {M} x {N} weight: expected "
                          f"{expected} ({bm} x {bn} blocks, edge blocks included)")
    out = w.to(dtype)
    cols = scale_inv.to(dtype).repeat_interleave(bn, dim=1)[:, :N]
    full = M // bm * bm
    out[:full].view(M // bm, bm, N).mul_(cols[:M // bm, None, :])
    if full < M:
        out[full:].mul_(cols[-1])
    return out
