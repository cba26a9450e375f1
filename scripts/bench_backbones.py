"""Our backbones against the reference implementations, one train step each, side by side.

    python scripts/bench_backbones.py                    # CPU, a few minutes
    python scripts/bench_backbones.py --device cuda --repeats 30

Pairs (same sizes, both built locally, nothing downloaded):
  encoder: ethos Encoder.mlm_loss (+ backward + AdamW) vs HF BertForMaskedLM (attn sdpa) at 6 layers,
           d 256, 8 heads, FFN 1024, seq 128, batch 32, vocab 30522, 15% masked. HF projects every
           position through the 30522-way head; ours only the masked ones.
  vit:     ethos ViT vs timm VisionTransformer: img 32, patch 4, d 256, 6 layers, 8 heads, batch 64.
By default our side is built as the references' architecture (GELU MLP FFN, LayerNorm: --ffn mlp
--norm layernorm) so the ratio measures implementation, not design; --ffn swiglu --norm rmsnorm times
our default blocks instead (on CPU, RMSNorm's decomposed backward costs ~8x LayerNorm's fused one).
Each pair is warmed up, then timed round-robin (one step of each per repeat, so load drift on a
shared machine hits both alike); medians are reported. The data pipeline (the tiny text loader with
MLM collation; the shapes loader with timm transforms) is timed per batch and reported as a % of our
step. Writes <out>.csv and <out>.png.
"""

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, write_csv
from ethos.models.attention import MHA
from ethos.models.config import ModelConfig
from ethos.models.encoder import Encoder
from ethos.models.ffn import MLP, SwiGLU
from ethos.models.vit import ViT


def train_step(model, loss_fn, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()
    return step


def ffn(args, d_ff: int):
    """--ffn mlp (default): the references' own two-matrix GELU FFN, so both sides are the same
    architecture; --ffn swiglu: our default block (3 matrices: 1.5x the FFN FLOPs at equal d_ff)."""
    if args.ffn == "mlp":
        return partial(MLP, d_ff=d_ff, activation="gelu", bias=True)
    return partial(SwiGLU, d_ff=d_ff)


def encoder_pair(args):
    V, T, B, d = 30522, 128, args.text_batch, 256
    cfg = ModelConfig(attn=partial(MHA), ffn=ffn(args, 1024), d_model=d, n_layers=6, n_heads=8,
                      rope_dims=32, max_seq_len=T, norm=args.norm)
    ours = Encoder(cfg, V).to(args.device)
    from transformers import BertConfig, BertForMaskedLM

    hf = BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=d, num_hidden_layers=6, num_attention_heads=8,
                                    intermediate_size=1024, max_position_embeddings=512,
                                    attn_implementation="sdpa")).to(args.device)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, V, (B, T), generator=g)
    sel = torch.rand(B, T, generator=g) < 0.15
    labels = torch.where(sel, ids, torch.full_like(ids, -100)).to(args.device)
    ids, mask = ids.to(args.device), torch.ones(B, T, dtype=torch.long, device=args.device)
    return {"ethos Encoder (MLM)": train_step(ours, lambda: ours.mlm_loss(ids, mask, labels)[0], args.device),
            "HF BertForMaskedLM": train_step(hf, lambda: hf(input_ids=ids, attention_mask=mask, labels=labels).loss,
                                             args.device)}


def vit_pair(args):
    from timm.models.vision_transformer import VisionTransformer

    d, B = 256, args.img_batch
    # d_ff 1024 = timm's hidden width at mlp_ratio 4
    cfg = ModelConfig(attn=partial(MHA), ffn=ffn(args, args.vit_dff), d_model=d, n_layers=6,
                      n_heads=8, rope_dims=0, norm=args.norm)
    ours = ViT(cfg, num_classes=10, img_size=32, patch_size=4).to(args.device)
    ref = VisionTransformer(img_size=32, patch_size=4, num_classes=10, embed_dim=d, depth=6, num_heads=8,
                            mlp_ratio=4.0).to(args.device)
    x = torch.randn(B, 3, 32, 32, device=args.device)
    y = torch.randint(0, 10, (B,), device=args.device)
    return {"ethos ViT": train_step(ours, lambda: F.cross_entropy(ours(x), y), args.device),
            "timm VisionTransformer": train_step(ref, lambda: F.cross_entropy(ref(x), y), args.device)}


def time_pair(name, steps, args) -> dict[str, float]:
    autocast = torch.autocast("cuda", torch.bfloat16) if args.device == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        return median_times(steps, args.device, args.warmup, args.repeats, desc=name)


def time_loader(loader, n: int) -> float:
    it = iter(loader)
    next(it)  # first batch pays one-off costs (tokenizer load, file cache)
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        next(it)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def data_times(args) -> dict[str, float]:
    """Per-batch time of the real loaders (num_workers=0: the cost the training process would pay)."""
    from ethos.data.images import ShapesDataModule
    from ethos.data.offline import TinyTextDataModule

    cache = Path(args.cache or tempfile.mkdtemp())
    text = TinyTextDataModule(cache_dir=str(cache / "tiny"), seq_len=128, batch_size=args.text_batch)
    text.prepare_data()
    text.setup()
    img = ShapesDataModule(cache_dir=str(cache / "shapes"), img_size=32,
                           batch_size=args.img_batch, scale=(0.8, 1.0), auto_augment="rand-m9-mstd0.5-inc1",
                           crop_pct=1.0, mean=(0.5,) * 3, std=(0.5,) * 3)
    img.prepare_data()
    img.setup()
    return {"text": time_loader(text.train_dataloader(), args.data_batches),
            "image": time_loader(img.train_dataloader(), args.data_batches)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--text-batch", type=int, default=32)
    ap.add_argument("--img-batch", type=int, default=64)
    ap.add_argument("--vit-dff", type=int, default=1024, help="our ViT's FFN width")
    ap.add_argument("--ffn", choices=("mlp", "swiglu"), default="mlp",
                    help="our FFN: mlp = the references' GELU MLP (same architecture), swiglu = our default")
    ap.add_argument("--norm", choices=("layernorm", "rmsnorm"), default="layernorm",
                    help="our norm: layernorm = the references' (same architecture), rmsnorm = our default")
    ap.add_argument("--data-batches", type=int, default=10)
    ap.add_argument("--cache", default=None, help="data cache dir (default: a temp dir)")
    ap.add_argument("--out", default="bench_results/backbones")
    args = ap.parse_args()
    torch.manual_seed(0)

    rows = []
    data = data_times(args)
    for kind, build, ours_key, ref_key in (("encoder", encoder_pair, "ethos Encoder (MLM)", "HF BertForMaskedLM"),
                                           ("vit", vit_pair, "ethos ViT", "timm VisionTransformer")):
        med = time_pair(kind, build(args), args)
        feed = data["text" if kind == "encoder" else "image"]
        rows.append({"pair": kind, "ours": ours_key, "reference": ref_key, "ours_ms": med[ours_key] * 1e3,
                     "ref_ms": med[ref_key] * 1e3, "speedup": med[ref_key] / med[ours_key],
                     "data_ms": feed * 1e3, "data_pct": 100 * feed / med[ours_key]})

    print(f"\ndevice {args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} (warm-up {args.warmup})")
    print(f"{'pair':8s} {'ours ms':>9s} {'ref ms':>9s} {'speedup':>8s} {'data ms':>8s} {'data %':>7s}  reference")
    for r in rows:
        print(f"{r['pair']:8s} {r['ours_ms']:9.1f} {r['ref_ms']:9.1f} {r['speedup']:7.2f}x "
              f"{r['data_ms']:8.1f} {r['data_pct']:6.1f}%  {r['reference']}")

    out = Path(args.out)
    write_csv([{**r, "device": args.device} for r in rows], out.with_suffix(".csv"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    xs = range(len(rows))
    ax.bar([i - 0.2 for i in xs], [r["ours_ms"] for r in rows], 0.4, label="ethos")
    ax.bar([i + 0.2 for i in xs], [r["ref_ms"] for r in rows], 0.4, label="reference (HF / timm)")
    ax.bar([i - 0.2 for i in xs], [r["data_ms"] for r in rows], 0.4, label="data per batch", color="k", alpha=0.5)
    ax.set_xticks(list(xs), [f"{r['pair']}\n{r['speedup']:.2f}x" for r in rows])
    ax.set_ylabel(f"train step, ms ({args.device})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
