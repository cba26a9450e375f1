from ethos.models.moe.latent import LatentExperts
from ethos.models.moe.peer import PEER
from ethos.models.moe.router import ProductKeyRouter, routing_stats

__all__ = ["PEER", "LatentExperts", "ProductKeyRouter", "routing_stats"]
