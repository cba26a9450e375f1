"""Product-key router (Lample et al. 2019 PKM; He 2024 PEER) shared by PEER and ETHOS latent experts.

Per routing head: q = BatchNorm(x W_q) split into halves q1, q2; the key of expert i1*n + i2
(n = sqrt(N)) is [C1[i1]; C2[i2]], so q . key = q1 . C1[i1] + q2 . C2[i2]. The exact top-k over
all N keys lies inside the k'^2 sums of the top-k' of each half whenever k' >= k.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.errors import ConfigError


def _isqrt_exact(n: int) -> int | None:
    r = math.isqrt(n) if n > 0 else 0
    return r if r * r == n and r > 0 else None


def validate_router_args(num_experts: int, n_heads: int, top_k: int, d_query: int, k_prime: int) -> int:
    """Raise ConfigError (one line, `model.ffn.<arg>`) on a bad router config; return sqrt(N)."""
    n = _isqrt_exact(num_experts)
    if n is None:
        near = max(1, round(math.sqrt(max(num_experts, 1)))) ** 2
        raise ConfigError(
            f"model.ffn.num_experts={num_experts}: must be a perfect square (e.g. {near} = "
            f"{math.isqrt(near)}^2)"
        )
    if not 1 <= top_k <= num_experts:
        raise ConfigError(f"model.ffn.top_k={top_k}: must be in [1, num_experts={num_experts}]")
    if d_query < 2 or d_query % 2:
        raise ConfigError(f"model.ffn.d_query={d_query}: must be even and >= 2 (split into two sub-queries)")
    if not top_k <= k_prime <= n:
        raise ConfigError(
            f"model.ffn.k_prime={k_prime}: must satisfy top_k={top_k} <= k_prime <= sqrt(num_experts)={n}"
        )
    return n


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm1d over (T, C) whose statistics (batch and running) use only rows with mask=True.

    Padding rows are still normalised (with the real-token statistics) so shapes stay static, but
    they never influence the statistics. Sync-free: masked sums, no boolean indexing.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        if not self.training:
            mean, var = self.running_mean, self.running_var
        else:
            w = torch.ones(x.shape[0], 1, device=x.device, dtype=x.dtype) if mask is None else \
                mask.to(x.dtype).unsqueeze(1)
            n = w.sum()
            n_safe = n.clamp_min(1.0)
            mean = (x * w).sum(0) / n_safe
            var = (((x - mean) ** 2) * w).sum(0) / n_safe
            with torch.no_grad():
                # torch's BatchNorm stores the unbiased variance in running_var; skip empty batches
                m = self.momentum * (n > 0).to(x.dtype)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), m)
                self.num_batches_tracked += 1
        y = (x - mean) * torch.rsqrt(var + self.eps)
        return y * self.weight + self.bias if self.affine else y


class ProductKeyRouter(nn.Module):
    def __init__(self, d_model: int, num_experts: int, n_heads: int, top_k: int, d_query: int,
                 k_prime: int | None = None):
        super().__init__()
        k_prime = top_k if k_prime is None else k_prime
        self.n_sub = validate_router_args(num_experts, n_heads, top_k, d_query, k_prime)
        self.num_experts, self.n_heads, self.top_k, self.k_prime = num_experts, n_heads, top_k, k_prime
        self.d_query = d_query
        # nn.Linear default init (uniform +-1/sqrt(d_model)); the BatchNorm rescales anyway
        self.query = nn.Linear(d_model, n_heads * d_query, bias=False)
        # per-feature BN over all heads' features == a separate BN per head
        self.norm = MaskedBatchNorm1d(n_heads * d_query)
        # q halves are ~unit variance after BN, so std (d_query/2)^-1/2 gives O(1) sub-scores
        self.sub_keys = nn.Parameter(torch.randn(n_heads, 2, self.n_sub, d_query // 2) * (d_query / 2) ** -0.5)

    @staticmethod
    def flops(d_model: int, num_experts: int, n_heads: int, top_k: int, d_query: int, **_) -> int:
        """Forward FLOPs per token: the query projection and the 2 * sqrt(N) sub-key scores per head
        (top-k over k'^2 candidate sums are comparisons and adds, not counted)."""
        return 2 * n_heads * d_query * (d_model + math.isqrt(num_experts))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        T = x.shape[0]
        H, n, kp, k = self.n_heads, self.n_sub, self.k_prime, self.top_k
        q = self.norm(self.query(x), mask).view(T, H, 2, self.d_query // 2)
        sub = torch.einsum("thcd,hcnd->thcn", q, self.sub_keys)          # (T, H, 2, n)
        s_top, i_top = sub.topk(kp, dim=-1)                               # (T, H, 2, k')
        cand = s_top[:, :, 0, :, None] + s_top[:, :, 1, None, :]          # (T, H, k', k')
        best, flat = cand.flatten(2).topk(k, dim=-1)                      # (T, H, k)
        i1 = i_top[:, :, 0].gather(-1, flat // kp)
        i2 = i_top[:, :, 1].gather(-1, flat % kp)
        return i1 * n + i2, F.softmax(best, dim=-1)

    def route(self, x: Tensor, pad_mask: Tensor | None = None, with_stats: bool = False):
        """(B, T, d) tokens -> flat tokens (B*T, d), indices, scores with padding rows zeroed (so
        padding gets zero output and gradient), and routing stats over real tokens (or None)."""
        xf = x.reshape(-1, x.shape[-1])
        mask = None if pad_mask is None else pad_mask.reshape(-1)
        idx, s = self(xf, mask)
        stats = routing_stats(idx, s, self.num_experts, mask) if with_stats else None
        if mask is not None:
            s = s * mask[:, None, None].to(s.dtype)
        return xf, idx, s, stats


@torch.no_grad()
def routing_stats(indices: Tensor, scores: Tensor, num_experts: int, mask: Tensor | None = None) -> dict:
    """Detached scalars over real tokens: expert_usage, unevenness (log N + sum p log p), router_entropy."""
    T = indices.shape[0]
    w = torch.ones(T, device=indices.device) if mask is None else mask.float()
    counts = torch.zeros(num_experts, device=indices.device).index_add_(
        0, indices.reshape(-1), w[:, None].expand(T, indices[0].numel()).reshape(-1)
    )
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    plogp = torch.where(p > 0, p * p.clamp_min(1e-30).log(), torch.zeros_like(p))
    s = scores.float()
    ent = -(s * s.clamp_min(1e-30).log()).sum(-1)                        # (T, H)
    ent = (ent.mean(-1) * w).sum() / w.sum().clamp_min(1.0)
    return {
        "expert_usage": (counts > 0).float().mean(),
        "unevenness": math.log(num_experts) + plogp.sum(),
        "router_entropy": ent,
    }
