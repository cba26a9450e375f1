"""The standard MoE FFN (DeepSeekMoE, Dai et al. 2024; DeepSeek-V3 2024): fine-grained routed SwiGLU experts
chosen top-k per token, plus always-on shared experts.

    s_t    = sigmoid(x_t W_g)  (V3)  or  softmax(x_t W_g)  (DeepSeekMoE / V2)    router in float32 (or 64)
    I_t    = top-k_i (s_t,i + b_i)                  the bias b only chooses; it never weights, has no gradient
    g_t,i  = route_scale * s_t,i / sum_{j in I_t} s_t,j   (normalised over the chosen k; norm_topk=false: s_t,i)
    y_t    = shared(x_t) + sum_{i in I_t} g_t,i E_i(x_t),       E_i(x) = (silu(x W1_i) * x W3_i) W2_i

Balance without an auxiliary loss (V3 §2.1.2): after each optimizer step, b_i += bias_rate * sign(mean load -
load_i), the loads counted over the step's tokens on every process (Task.on_before_optimizer_step). `b` is a
buffer, so it is in every checkpoint and a resume continues it exactly. An optional sequence-wise auxiliary loss
(V3 eq. 17-20, weight `aux_loss`) is kept in `self.aux_loss` for the task to add to its loss.

Dropless: every token reaches its k experts, whatever their load. Ties in s + b go to the lower expert index
(a stable sort), so the choice is deterministic. Padding (pad_mask False) is routed like any token, then gated
out: zero output, no gradient, no load, no auxiliary loss.

Compute, with no Python loop over the experts:
  grouped  the T*k (token, expert) pairs stably sorted by expert, so each expert's tokens are one slice, then
           torch's grouped GEMM over the slices (F.grouped_mm: no padding, no host sync);
  padded   one (E, C, d) batch, C the largest load (one host sync), gathered from the tokens, then two bmm;
  auto     grouped in bf16/fp16, and in float32 on CPU eager (faster there than the padded bmm, measured by
           scripts/bench_moe.py); padded in float32 on CUDA and under the compiler (grouped_mm is a bf16/fp16
           kernel there) and in float64 (grouped_mm has none).
Under torch.compile the padded path is one custom op (ethos::moe_padded), as its shapes depend on the loads. The
outputs come back in token order by gathers and are summed over each token's k with its gates.
"""

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.errors import ConfigError
from ethos.models.ffn import SwiGLU
from ethos.models.moe.router import routing_stats
from ethos.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt


def grouped_mm_available() -> bool:
    return hasattr(F, "grouped_mm")


class MoE(nn.Module):
    projections = ("w13", "w2")  # the expert matrices are weight-decayed (ethos.optim.decays); 3-D: AdamW under Muon

    def __init__(self, d_model: int, num_experts: PositiveInt = 64, top_k: PositiveInt = 6,
                 d_expert: PositiveInt = 128, n_shared: NonNegativeInt = 2,
                 score: Literal["sigmoid", "softmax"] = "sigmoid", norm_topk: bool = True,
                 route_scale: PositiveFloat = 1.0, bias_rate: NonNegativeFloat = 1e-3,
                 aux_loss: NonNegativeFloat = 0.0, impl: Literal["auto", "grouped", "padded"] = "auto"):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"model.ffn.top_k={top_k}: must be in [1, model.ffn.num_experts={num_experts}]")
        if impl == "grouped" and not grouped_mm_available():
            raise ConfigError(f"model.ffn.impl=grouped: this torch ({torch.__version__}) has no "
                              f"torch.nn.functional.grouped_mm (valid: auto, padded)")
        self.num_experts, self.top_k, self.d_expert, self.n_shared = num_experts, top_k, d_expert, n_shared
        self.score, self.norm_topk, self.route_scale = score, norm_topk, route_scale
        self.bias_rate, self.aux_weight, self.impl = bias_rate, aux_loss, impl
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # expert i: x @ w13[i] -> (gate | up), (silu(gate) * up) @ w2[i]; (in, out) layout, as grouped_mm takes it
        self.w13 = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_expert))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        self.shared = SwiGLU(d_model, n_shared * d_expert) if n_shared else None  # n_shared experts as one SwiGLU
        self.register_buffer("bias", torch.zeros(num_experts))  # the balancing bias: no gradient, checkpointed
        self.counts: Tensor | None = None  # tokens per expert of the last training forward (real tokens only)
        self.pending: Tensor | None = None  # summed over the micro-batches of the current optimizer step
        self.aux_loss: Tensor | None = None
        self.stats: dict[str, Tensor] = {}
        self.init_experts(n_layers=1)

    def init_experts(self, n_layers: int, zero_out: bool = False) -> None:
        """As ethos.models.blocks.init_linear treats Linear layers: N(0, 0.02), the projection into the residual
        stream (w2) depth-scaled, or zero under model.zero_init."""
        nn.init.normal_(self.w13, std=0.02)
        if zero_out:
            nn.init.zeros_(self.w2)
        else:
            nn.init.normal_(self.w2, std=0.02 / math.sqrt(2 * n_layers))

    # closed forms -----------------------------------------------------------------------------------------
    @staticmethod
    def param_count(d_model: int, num_experts: int = 64, d_expert: int = 128, n_shared: int = 2, **_) -> int:
        """All parameters: the router, every routed expert and the shared ones (3 matrices d x d_expert each)."""
        return d_model * num_experts + 3 * d_model * d_expert * (num_experts + n_shared)

    @staticmethod
    def active_param_count(d_model: int, num_experts: int = 64, top_k: int = 6, d_expert: int = 128,
                           n_shared: int = 2, **_) -> int:
        """Parameters one token uses: the whole router, its k routed experts and the shared ones."""
        return d_model * num_experts + 3 * d_model * d_expert * (top_k + n_shared)

    @staticmethod
    def flops(d_model: int, num_experts: int = 64, top_k: int = 6, d_expert: int = 128, n_shared: int = 2,
              **_) -> int:
        """Forward FLOPs per token: the router's scores and k + n_shared SwiGLU experts (gate weighting, sorting
        and the bias are not counted, as top-k is not)."""
        return 2 * d_model * num_experts + (top_k + n_shared) * SwiGLU.flops(d_model, d_expert)

    def active_params(self) -> int:
        d = self.gate.in_features
        return self.active_param_count(d, self.num_experts, self.top_k, self.d_expert, self.n_shared)

    # routing ----------------------------------------------------------------------------------------------
    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(T, d) -> chosen experts (T, k), their gates (T, k) and all scores (T, E), in float32 at least (under
        bf16 autocast too: the choice is sensitive to rounding)."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            scores = F.linear(x.to(dtype), self.gate.weight.to(dtype))
        scores = scores.sigmoid() if self.score == "sigmoid" else scores.softmax(-1)
        # stable descending sort: among equal s + b the lower index comes first (torch.topk makes no such promise)
        idx = (scores.detach() + self.bias).sort(dim=-1, descending=True, stable=True).indices[:, :self.top_k]
        gates = scores.gather(1, idx)
        if self.norm_topk:
            gates = gates / (gates.sum(-1, keepdim=True) + 1e-20)
        return idx, gates * self.route_scale, scores

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        B, T, d = x.shape
        xf = x.reshape(-1, d)
        idx, gates, scores = self.route(xf)
        real = None if pad_mask is None else pad_mask.reshape(-1)
        if real is not None:
            gates = gates * real[:, None]
        if self.training:
            self._account(idx, gates, scores, real, B, T)
        y = self.experts(xf, idx, gates.to(x.dtype))
        if self.shared is not None:
            y = y + self.shared(xf)
        return y.view(B, T, d)

    def experts(self, x: Tensor, idx: Tensor, gates: Tensor) -> Tensor:
        """sum_i gates[t, i] E_{idx[t, i]}(x_t) for (T, d) tokens: grouped by expert, one grouped or batched GEMM
        per matrix, then back in token order."""
        dev = x.device.type  # under autocast: the activations' dtype (neither path is an autocast op)
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        x, w13, w2 = x.to(dtype), self.w13.to(dtype), self.w2.to(dtype)
        impl = self.resolved_impl(dtype, x.device)
        if impl == "grouped":
            y = grouped_experts(x, idx, w13, w2)
        elif torch.compiler.is_compiling():  # its shapes depend on the loads: one opaque op for the compiler
            y = padded_experts_op(x, idx, w13, w2)
        else:
            y = padded_experts(x, idx, w13, w2)
        return (y * gates[..., None]).sum(1)

    def resolved_impl(self, dtype: torch.dtype, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        # grouped_mm: bf16/fp16 on CUDA and in the compiler, float32 too on CPU eager (measured faster there than
        # the padded bmm: scripts/bench_moe.py); none in float64
        half = dtype in (torch.bfloat16, torch.float16)
        cpu_eager = device.type == "cpu" and not torch.compiler.is_compiling() and dtype == torch.float32
        return "grouped" if grouped_mm_available() and (half or cpu_eager) else "padded"

    # balance ----------------------------------------------------------------------------------------------
    def _account(self, idx: Tensor, gates: Tensor, scores: Tensor, real: Tensor | None, B: int, T: int) -> None:
        """Loads of this forward (for the bias update), the sequence-wise auxiliary loss, and the logged stats."""
        E, k = self.num_experts, self.top_k
        w = torch.ones(idx.shape[0], device=idx.device) if real is None else real.float()
        chosen = torch.zeros_like(scores).scatter_(1, idx, 1.0) * w[:, None]   # (B*T, E) 1 where routed
        self.counts = chosen.sum(0).detach()
        if self.aux_weight > 0:
            # V3 eq. 17-20, per sequence: f_i = E / (k T') * #tokens routed to i, P_i = mean_t s'_t,i with s'
            # the scores normalised over all experts; loss = aux_loss * sum_i f_i P_i, averaged over sequences
            n = w.view(B, T).sum(1).clamp_min(1.0)                              # T': real tokens per sequence
            f = chosen.view(B, T, E).sum(1) * (E / (k * n[:, None]))
            p = (scores / scores.sum(-1, keepdim=True)) * w[:, None]
            P = p.view(B, T, E).sum(1) / n[:, None]
            self.aux_loss = self.aux_weight * (f.detach() * P).sum(1).mean()
        with torch.no_grad():
            stats = routing_stats(idx, gates.detach()[:, None], E, real)
            load = self.counts
            stats["max_load"] = load.max() / load.mean().clamp_min(1e-9)   # 1 = perfectly even
            stats["bias_range"] = self.bias.max() - self.bias.min()
            self.stats = stats

    def accumulate(self) -> None:
        """After each backward: add the last forward's loads to the optimizer step's (gradient accumulation)."""
        if self.counts is not None:
            self.pending = self.counts if self.pending is None else self.pending + self.counts
            self.counts = None

    @torch.no_grad()
    def update_bias(self, load: Tensor | None = None) -> None:
        """b_i += bias_rate * sign(mean load - load_i): under-loaded experts become likelier to be chosen.
        `load`: tokens per expert of the step on every process (default: this process's pending count)."""
        load = self.pending if load is None else load
        self.pending = None
        if load is None or self.bias_rate == 0:
            return
        self.bias += self.bias_rate * torch.sign(load.mean() - load).to(self.bias.dtype)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, d_expert={self.d_expert}, "
                f"n_shared={self.n_shared}, score={self.score}, impl={self.impl}")


def expert_counts(flat: Tensor, E: int) -> Tensor:
    """Pairs per expert (E,) of the flat expert indices; an index_add, as bincount's length depends on the data."""
    return torch.zeros(E, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


def grouped_experts(x: Tensor, idx: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """(T, d) tokens through their experts idx (T, k) -> (T, k, d): the (token, expert) pairs stably sorted by
    expert, torch's grouped GEMM over each expert's slice (int32 end offsets), then back in token order."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = expert_counts(flat, w13.shape[0])
    offs = counts.cumsum(0).to(torch.int32)
    gate, up = F.grouped_mm(x.index_select(0, order // k), w13, offs=offs).chunk(2, dim=-1)
    ys = F.grouped_mm(F.silu(gate) * up, w2, offs=offs)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return ys.index_select(0, inverse).view(T, k, -1)


def _padded_layout(idx: Tensor, E: int) -> tuple[Tensor, Tensor, int]:
    """Where each pair sits in an (E, C, d) batch, C the largest load (one host sync, so no token is dropped):
    `src` (E C,), the token each slot reads (T: a zero row, for the empty slots), and `pos` (T k,), each pair's
    slot in token order. Slots follow the stable sort of the pairs by expert."""
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = flat.argsort(stable=True)
    counts = expert_counts(flat, E)
    capacity = int(counts.max())
    expert = flat[order]
    sorted_pos = expert * capacity + torch.arange(T * k, device=idx.device) - (counts.cumsum(0) - counts)[expert]
    pos = torch.empty_like(sorted_pos).scatter_(0, order, sorted_pos)
    src = torch.full((E * capacity,), T, dtype=torch.long, device=idx.device).scatter_(0, sorted_pos, order // k)
    return src, pos, capacity


def padded_experts(x: Tensor, idx: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    """The same through one (E, C, d) batch gathered from the tokens and two bmm; gathers both ways (index_select,
    whose backward is a plain index_add), no scatter of copies."""
    (T, d), E = x.shape, w13.shape[0]
    src, pos, capacity = _padded_layout(idx, E)
    batch = torch.cat([x, x.new_zeros(1, d)]).index_select(0, src).view(E, capacity, d)
    gate, up = torch.bmm(batch, w13).chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, w2)                             # empty slots stay 0: silu(0) * 0
    return out.view(E * capacity, d).index_select(0, pos).view(T, idx.shape[1], d)


# torch.compile: padded_experts as one custom op, so that its load-dependent shapes stay out of the graph; its
# backward, a second op, recomputes the forward's activations from the saved inputs
@torch.library.custom_op("ethos::moe_padded", mutates_args=())
def padded_experts_op(x: Tensor, idx: Tensor, w13: Tensor, w2: Tensor) -> Tensor:
    return padded_experts(x, idx, w13, w2)


@padded_experts_op.register_fake
def _(x, idx, w13, w2):
    return x.new_empty(*idx.shape, w2.shape[-1])


@torch.library.custom_op("ethos::moe_padded_backward", mutates_args=())
def padded_experts_backward(grad: Tensor, x: Tensor, idx: Tensor, w13: Tensor, w2: Tensor
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of padded_experts for x, w13, w2, written out (autograd does not run inside a custom op)."""
    (T, d), E = x.shape, w13.shape[0]
    src, pos, capacity = _padded_layout(idx, E)
    batch = torch.cat([x, x.new_zeros(1, d)]).index_select(0, src).view(E, capacity, d)
    gate, up = torch.bmm(batch, w13).chunk(2, dim=-1)
    sig = torch.sigmoid(gate)
    act = gate * sig * up                                              # silu(gate) * up
    g_out = grad.new_zeros(E * capacity, d).index_copy_(0, pos, grad.reshape(-1, d)).view(E, capacity, d)
    g_act = torch.bmm(g_out, w2.transpose(1, 2))
    g_w2 = torch.bmm(act.transpose(1, 2), g_out)
    g_h = torch.cat([g_act * up * sig * (1 + gate * (1 - sig)), g_act * gate * sig], dim=-1)  # silu' and silu
    g_w13 = torch.bmm(batch.transpose(1, 2), g_h)
    g_batch = torch.bmm(g_h, w13.transpose(1, 2)).view(E * capacity, d)
    g_x = x.new_zeros(T + 1, d).index_add_(0, src, g_batch)[:T]
    return g_x, g_w13, g_w2


@padded_experts_backward.register_fake
def _(grad, x, idx, w13, w2):
    return torch.empty_like(x), torch.empty_like(w13), torch.empty_like(w2)


def _save(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, idx, w13, w2 = ctx.saved_tensors
    g_x, g_w13, g_w2 = padded_experts_backward(grad.contiguous(), x, idx, w13, w2)
    return g_x, None, g_w13, g_w2


padded_experts_op.register_autograd(_backward, setup_context=_save)
