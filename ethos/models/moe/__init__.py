from ethos.models.moe.latent import LatentExperts
from ethos.models.moe.peer import PEER
from ethos.models.moe.routed import MoE
from ethos.models.moe.router import ProductKeyRouter, routing_stats

__all__ = ["MoE", "PEER", "LatentExperts", "ProductKeyRouter", "routing_stats"]
