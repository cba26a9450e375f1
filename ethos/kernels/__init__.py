"""Fused kernels (Triton, imported lazily) with their PyTorch fallbacks."""

from ethos.kernels.latent_experts import check_triton, expert_mix

__all__ = ["check_triton", "expert_mix"]
