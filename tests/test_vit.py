"""ViT: patch embedding, positions and pooling equal timm's VisionTransformer on copied weights, and
the whole forward equals a float64 reference written with plain ops (patches by unfold, not conv)."""

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from ethos.errors import ConfigError
from ethos.models.attention import MHA
from ethos.models.config import ModelConfig
from ethos.models.ffn import SwiGLU
from ethos.models.vit import ViT


def small_cfg(**kw) -> ModelConfig:
    return ModelConfig(attn=partial(MHA), ffn=partial(SwiGLU, d_ff=64), d_model=32, n_layers=2, n_heads=4,
                       rope_dims=kw.pop("rope_dims", 0), **kw)


def randomize(m: torch.nn.Module) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)  # the zero head and near-zero cls token would hide mistakes


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_embedding_and_pooling_match_timm(pool):
    ours = ViT(small_cfg(), num_classes=5, img_size=16, patch_size=4, pool=pool).double()
    randomize(ours)
    ref = VisionTransformer(img_size=16, patch_size=4, num_classes=5, embed_dim=32, depth=0, num_heads=4,
                            class_token=pool == "cls", global_pool="token" if pool == "cls" else "avg",
                            fc_norm=False).double()
    sd = {"patch_embed.proj.weight": ours.patch_embed.proj.weight, "patch_embed.proj.bias": ours.patch_embed.proj.bias,
          "pos_embed": ours.pos_embed, "head.weight": ours.head.weight, "head.bias": ours.head.bias}
    if pool == "cls":
        sd["cls_token"] = ours.cls_token
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) == {"norm.weight", "norm.bias"}
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    tokens = ours.embed(x)
    torch.testing.assert_close(tokens, ref._pos_embed(ref.patch_embed(x)), rtol=0, atol=1e-12)
    h = torch.randn_like(tokens)  # pooling + head on the same (post-trunk) tokens
    torch.testing.assert_close(ours.head(ours.pool_tokens(h)), ref.forward_head(h), rtol=0, atol=1e-12)


def reference_forward(m: ViT, x: torch.Tensor) -> torch.Tensor:
    """float64, no nn.Module calls: unfold patches, concat cls, add positions, pre-norm blocks."""
    cfg, p = m.cfg, m.patch_embed.proj
    B, P = x.shape[0], p.kernel_size[0]
    patches = F.unfold(x, P, stride=P).transpose(1, 2)  # (B, N, C*P*P) in raster order
    h = patches @ p.weight.flatten(1).T + p.bias
    if m.cls_token is not None:
        h = torch.cat((m.cls_token.expand(B, -1, -1), h), 1)
    h = h + m.pos_embed

    def rms(v, w):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * w

    H, D = cfg.n_heads, cfg.head_dim
    for blk in m.trunk.blocks:
        a = rms(h, blk.attn_norm.weight)
        q, k, v = (a @ blk.attn.qkv.weight.T).view(B, -1, 3, H, D).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1)
        h = h + (att @ v).transpose(1, 2).reshape(B, -1, H * D) @ blk.attn.out.weight.T
        f = rms(h, blk.ffn_norm.weight)
        g, u = (f @ blk.ffn.w13.weight.T).chunk(2, -1)
        h = h + (F.silu(g) * u) @ blk.ffn.w2.weight.T
    h = rms(h, m.trunk.norm.weight)
    pooled = h[:, 0] if m.pool == "cls" else h[:, m.num_prefix:].mean(1)
    return pooled @ m.head.weight.T + m.head.bias


@pytest.mark.parametrize("pool", ["cls", "avg"])
def test_forward_matches_float64_reference(pool):
    m = ViT(small_cfg(), num_classes=7, img_size=16, patch_size=4, pool=pool).double()
    randomize(m)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), reference_forward(m, x), rtol=1e-10, atol=1e-10)


def test_zero_head_starts_at_log_num_classes_and_rope_runs_over_the_tokens():
    m = ViT(small_cfg(rope_dims=8), num_classes=10, img_size=16, patch_size=4)
    x = torch.randn(4, 3, 16, 16)
    logits = m(x)
    assert torch.equal(logits, torch.zeros(4, 10))  # zero-initialised head: loss = log(10) exactly
    assert F.cross_entropy(logits, torch.arange(4)).item() == pytest.approx(2.302585, abs=1e-6)
    randomize(m)
    with torch.no_grad():
        m.pos_embed.zero_()  # no learned positions: with RoPE on, token order still matters
        swapped = m.trunk(m.embed(x).flip(1))  # reverse the token sequence, keep cls last ...
        ref = m.trunk(m.embed(x))
    # ... a permutation-equivariant trunk (no RoPE) would give ref reversed; RoPE breaks that
    assert not torch.allclose(swapped.flip(1), ref, atol=1e-4)


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="patch_size=5: must divide data.img_size=32"):
        ViT(small_cfg(), 10, img_size=32, patch_size=5)
    with pytest.raises(ConfigError, match="pool='max'"):
        ViT(small_cfg(), 10, img_size=32, patch_size=4, pool="max")


def test_the_task_smooths_mixed_targets_as_timm_mixup_does():
    from timm.data.mixup import mixup_target

    from ethos.tasks.classify import classification_loss

    y = torch.tensor([0, 3, 1, 1, 2, 0])
    logits = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    for lam in (1.0, 0.7, 0.35):
        want = mixup_target(y, 5, lam, smoothing=0.1).double()  # what Mixup(label_smoothing=0.1) gives the loss
        ref = -(want * torch.log_softmax(logits.double(), -1)).sum(-1).mean()  # float64 cross-entropy
        got = classification_loss(logits, mixup_target(y, 5, lam, smoothing=0.0), 0.1)  # the data mixes
        torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    ref = -torch.log_softmax(logits.double(), -1)[torch.arange(6), y] * 0.9 - 0.1 * torch.log_softmax(
        logits.double(), -1).mean(-1)
    torch.testing.assert_close(classification_loss(logits, y, 0.1).double(), ref.mean(), rtol=1e-6, atol=1e-7)


def test_the_patch_size_follows_the_image_size():
    from ethos.models.vit import auto_patch_size

    assert [auto_patch_size(s) for s in (224, 384, 32, 64, 28, 8, 7)] == [16, 16, 4, 8, 2, 1, 1]
    for s in range(1, 300):  # it divides the image into at least 8 x 8 patches, or is 1
        p = auto_patch_size(s)
        assert s % p == 0 and (s // p >= 8 or p == 1)
