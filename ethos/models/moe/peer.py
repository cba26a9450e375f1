"""PEER (He 2024, "Mixture of A Million Experts"): N single-neuron experts behind a product-key router.

    y = sum_h sum_{i in I_h(x)} s_i act(u_i . x) v_i         (heads summed, s = softmax over top-k)

Paper-faithful: softmax over the top-k (not PEER-pytorch's default top-1 ReLU scores) and a
BatchNorm on the queries. `impl="naive"` (default) is the usual gather + einsum implementation;
`impl="torch"` uses the same embedding-bag mixing kernels as ETHOS (no (T*H*k, d) gathers).
"""

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ethos.kernels.latent_experts import expert_mix
from ethos.models.moe.router import ProductKeyRouter
from ethos.types import PositiveInt


class PEER(nn.Module):
    custom_init = True  # Trunk leaves the init below alone

    def __init__(self, d_model: int, num_experts: PositiveInt = 128**2, n_heads: PositiveInt = 4,
                 top_k: PositiveInt = 8, d_query: PositiveInt = 128, k_prime: PositiveInt | None = None,
                 activation: Literal["gelu", "relu"] = "gelu", impl: Literal["naive", "torch"] = "naive"):
        super().__init__()
        self.router = ProductKeyRouter(d_model, num_experts, n_heads, top_k, d_query, k_prime)
        self.num_experts, self.activation, self.impl = num_experts, activation, impl
        # u ~ 1/sqrt(d) keeps u . x ~ O(1) for unit-RMS x; v small (0.02) like a GPT residual branch
        self.down = nn.Embedding(num_experts, d_model)
        self.up = nn.Embedding(num_experts, d_model)
        nn.init.normal_(self.down.weight, std=d_model**-0.5)
        nn.init.normal_(self.up.weight, std=0.02)
        self.stats: dict[str, Tensor] = {}

    @staticmethod
    def flops(d_model: int, num_experts: int = 128**2, n_heads: int = 4, top_k: int = 8, d_query: int = 128,
              **_) -> int:
        """Forward FLOPs per token: router + per selected expert u_i . x and s_i act(.) v_i (2d each)."""
        router = ProductKeyRouter.flops(d_model, num_experts, n_heads, top_k, d_query)
        return router + n_heads * top_k * 2 * 2 * d_model

    def active_params(self) -> int:
        """Parameters one token uses: the whole router and the u_i, v_i of its H * k selected experts."""
        router = sum(p.numel() for p in self.router.parameters())
        return router + self.router.n_heads * self.router.top_k * 2 * self.down.weight.shape[1]

    def forward(self, x: Tensor, pad_mask: Tensor | None = None) -> Tensor:
        B, T, d = x.shape
        xf, idx, s, stats = self.router.route(x, pad_mask, with_stats=self.training)
        if stats is not None:
            self.stats = stats
        if self.impl == "torch":
            y = expert_mix(xf, self.down.weight, self.up.weight, idx.reshape(B * T, -1),
                           s.reshape(B * T, -1).to(x.dtype), self.activation, "torch")
        else:
            act = F.gelu if self.activation == "gelu" else torch.relu
            h = act(torch.einsum("thkd,td->thk", self.down(idx), xf))
            y = torch.einsum("thk,thkd->td", s * h, self.up(idx))
        return y.view(B, T, d)
