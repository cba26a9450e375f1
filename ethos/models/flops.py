"""FLOPs: our counting convention, and a FlopCounterMode that sees every op our models run.

The closed forms live next to the modules, like `param_count`: `MHA.flops`, `MLA.flops`, `MLAO.flops`,
`SwiGLU.flops`, `MLP.flops`, `MoE.flops`, `ProductKeyRouter.flops`, `PEER.flops`, `LatentExperts.flops`
(forward FLOPs per token), summed by `Block.flops` / `Trunk.flops`, plus embeddings and heads in the backbones'
`flops_per_token` (Encoder, Decoder, ViT). tests/test_flops.py checks them against the counter below.

Convention
  * 2 FLOPs per multiply-add of every matmul-like op: Linear layers, attention scores q k^T and
    weighted sums p v, expert dot products and weighted sums, the ViT patch convolution. Norms,
    activations, softmax, top-k, residual adds, RoPE and gathers are not counted (O(d) per token, and
    neither MFU papers nor torch's FlopCounterMode count them).
  * Attention over the full T x T scores, also when causal, as PaLM / Megatron MFU and torch's
    FlopCounterMode count; a causal kernel that skips the masked half does about half of that work.
    Padding is counted as tokens (the closed form sees shapes, not data).
  * Training = 3 x forward: the backward costs two forwards' matmuls (gradients of the inputs and of
    the weights), no activation recomputation.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

TRAIN_FACTOR = 3  # forward + backward


def _sdpa_cpu(q, k, v, *args, out_shape=None, **kwargs) -> int:
    # the CPU flash kernel computes the same q k^T and p v matmuls as the CUDA flash / efficient
    # kernels torch registers; it was simply never added to torch's registry (counted 0 otherwise)
    return sdpa_flop_count(q, k, v)


def _sdpa_cpu_backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, q, k, v)


def _bag_sum(weight, indices, offsets, scale_grad_by_freq=False, mode=0, sparse=False, per_sample_weights=None,
             *args, out_shape=None, **kwargs) -> int:
    # out[t] = sum_m w[t, m] table[idx[t, m]]: one multiply-add per (selection, channel), exactly the
    # work of the bmm the naive expert path runs for the same sum (which the counter does count);
    # without per-sample weights a bag sum is adds only
    return (2 if per_sample_weights is not None else 1) * indices[0] * weight[1]


def _bag_dots(grad, weight, indices, *args, out_shape=None, **kwargs) -> int:
    # r[t, m] = table[idx[t, m]] . g[t]: a length-D dot product per selection, as the naive einsum
    return 2 * indices[0] * weight[1]


def _bag_scatter(grad, indices, offset2bag, bag_size, maximum_indices, num_weights, scale_grad_by_freq=False,
                 mode=0, per_sample_weights=None, *args, out_shape=None, **kwargs) -> int:
    # dT[idx[t, m]] += w[t, m] g[t]: one multiply-add per (selection, channel); adds only without weights
    return (2 if per_sample_weights is not None else 1) * indices[0] * grad[1]


def _grouped_mm(a, b, *args, out_shape=None, **kwargs) -> int:
    # the MoE's grouped GEMM (ethos/models/moe/routed.py): every row of a jagged operand meets one group's
    # matrix, so the work is that of one dense matmul over all rows; the backward runs the same op
    if len(a) == 2 and len(b) == 3:     # (M, K) x (G, K, N): forward, and the input gradient
        return 2 * a[0] * a[1] * b[2]
    if len(a) == 2 and len(b) == 2:     # (K, M) x (M, N), M jagged: the weight gradient
        return 2 * a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 2:     # (G, M, K) x (K, N), N jagged
        return 2 * a[1] * a[2] * b[1]
    return 2 * a[0] * a[1] * a[2] * b[2]  # (G, M, K) x (G, K, N): a batched matmul


def flop_counter(display: bool = False) -> FlopCounterMode:
    """torch's FlopCounterMode plus formulas for ops it does not know and our models run on CPU."""
    aten = torch.ops.aten
    extra = {
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward,
        # the embedding-bag kernels of the reordered expert mixing (ethos/kernels/latent_experts.py)
        aten._embedding_bag: _bag_sum,
        aten._embedding_bag_forward_only: _bag_sum,
        aten._embedding_bag_per_sample_weights_backward: _bag_dots,
        aten._embedding_bag_dense_backward: _bag_scatter,
        aten._grouped_mm: _grouped_mm,
    }
    return FlopCounterMode(display=display, custom_mapping=extra)
