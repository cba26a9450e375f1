"""Vision Transformer: timm's PatchEmbed, learned positions, the shared pre-norm Trunk, a linear head.

The blocks are the same `Trunk` the text encoder uses, so any attention / FFN of the model config
(`model=mha|mla|mla_o|...`) works on images. Position information: learned absolute embeddings over
the patch grid (+ cls slot), as in timm / DeiT; if the model config has `rope_dims > 0` the attention
modules also apply 1D RoPE over the flattened token sequence (cls at 0, patches in raster order).
`model.rope_dims=0` gives the classic ViT.

Patch size and pooling are the task's (`task.patch_size`, `task.pool`), not the model config's: the same
`model=` file then fits 32 px CIFAR and 224 px ImageNet. By default the patch size follows the image size
(`auto_patch_size`).
"""

import torch
from timm.layers import PatchEmbed
from torch import Tensor, nn

from ethos.errors import ConfigError
from ethos.models.blocks import Trunk
from ethos.models.config import ModelConfig

POOLS = ("cls", "avg")


def auto_patch_size(img_size: int) -> int:
    """The largest of 16, 8, 4, 2, 1 that cuts the image into at least an 8 x 8 grid: 16 at 224 px (ViT-B/16),
    4 at 32 px (the CIFAR ViTs), 8 at 64 px."""
    return next(p for p in (16, 8, 4, 2, 1) if img_size % p == 0 and img_size // p >= 8 or p == 1)


class ViT(nn.Module):
    def __init__(self, cfg: ModelConfig, num_classes: int, img_size: int = 224, patch_size: int = 16,
                 in_chans: int = 3, pool: str = "cls"):
        super().__init__()
        if pool not in POOLS:
            raise ConfigError(f"task.pool={pool!r}: valid are {', '.join(POOLS)}")
        if img_size % patch_size:
            raise ConfigError(f"task.patch_size={patch_size}: must divide data.img_size={img_size}")
        self.cfg, self.pool = cfg, pool
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, cfg.d_model)
        self.num_prefix = 1 if pool == "cls" else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + self.patch_embed.num_patches, cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = Trunk(cfg)
        self.head = nn.Linear(cfg.d_model, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)  # timm: a near-zero start, learned quickly
        # zero head: the first loss is exactly log(num_classes), a clean check that nothing is off
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def flops_per_token(self, batch_size: int) -> float:
        """Forward FLOPs per patch (the ViT's token count; the cls slot runs through the trunk too but
        is not counted as a token): patch projection, trunk over prefix + patches, linear head."""
        N, d = self.patch_embed.num_patches, self.cfg.d_model
        patch = 2 * self.patch_embed.proj.weight[0].numel() * d  # C * P * P -> d per patch
        T = self.num_prefix + N
        trunk = Trunk.flops(self.cfg, T, T * batch_size) * T
        head = 2 * d * self.head.out_features
        return (N * patch + trunk + head) / N

    def embed(self, images: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, prefix + N, d): patches, cls token prepended, positions added."""
        x = self.patch_embed(images)
        if self.cls_token is not None:
            x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        return self.drop(x + self.pos_embed)

    def pool_tokens(self, x: Tensor) -> Tensor:
        return x[:, 0] if self.pool == "cls" else x[:, self.num_prefix:].mean(dim=1)

    def features(self, images: Tensor) -> Tensor:
        """Pooled, normalised features (B, d) before the classifier."""
        return self.pool_tokens(self.trunk(self.embed(images)))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.features(images))
