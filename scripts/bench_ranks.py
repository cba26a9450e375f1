"""What the rank callback (ethos/callbacks/ranks.py) costs beside the training step it is amortised over.

    python scripts/bench_ranks.py                              # CPU, the default model, MHA and MLA
    python scripts/bench_ranks.py --device cuda --every 100    # on a GPU (the callback still measures on the CPU)
    python scripts/bench_ranks.py --repeats 2 --batch 4 --layers 2   # a quick check that it runs

The model is `python train.py`'s default (encoder, masked LM: d 256, 6 layers, 8 heads, SwiGLU 1024, seq 128,
batch 32, vocab 8192) with MHA, MLA (q latent 64, kv latent 32) and, with --variants, MLA-o (o latent 64). One
train step (forward, backward, AdamW; bf16 autocast on CUDA) and one call of the callback's measurement are
timed round-robin (so load drift on a shared machine hits both alike), after a warm-up; medians are reported.
The callback runs once every N steps, so its overhead is callback / (N x step); printed for N = --every, with the
smallest N that keeps it under --budget (2%). Writes <out>.csv (one row per variant x dtype) and <out>.png
(overhead against N).
"""

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, write_csv
from ethos.callbacks.ranks import measure
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.config import ModelConfig
from ethos.models.encoder import Encoder
from ethos.models.ffn import SwiGLU

VARIANTS = {  # ethos/conf/model/{mha,mla,mla_o}.yaml
    "mha": (partial(MHA), 32),
    "mla": (partial(MLA, q_latent=64, kv_latent=32), 16),
    "mla_o": (partial(MLAO, q_latent=64, kv_latent=32, o_latent=64), 16),
}


def build(variant: str, args):
    attn, rope = VARIANTS[variant]
    cfg = ModelConfig(attn=attn, ffn=partial(SwiGLU, d_ff=args.d_ff), d_model=args.d_model, n_layers=args.layers,
                      n_heads=args.heads, rope_dims=rope, max_seq_len=args.seq)
    model = Encoder(cfg, args.vocab).to(args.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=args.device == "cuda")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, args.vocab, (args.batch, args.seq), generator=g)
    labels = torch.where(torch.rand(args.batch, args.seq, generator=g) < 0.15, ids, -100).to(args.device)
    ids = ids.to(args.device)
    mask = torch.ones_like(ids)
    autocast = (torch.autocast("cuda", torch.bfloat16) if args.device == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = model.mlm_loss(ids, mask, labels)[0]
        loss.backward()
        opt.step()
    return model, step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--variants", default="mha,mla", help="comma-separated: mha, mla, mla_o")
    ap.add_argument("--dtypes", default="float64,float32", help="the callback's compute dtypes to time")
    ap.add_argument("--every", type=int, default=100, help="N: the callback runs every N steps")
    ap.add_argument("--budget", type=float, default=0.02, help="the overhead allowed (fraction of step time)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--d-ff", type=int, default=1024)
    ap.add_argument("--out", default="bench_results/ranks")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]

    rows = []
    for variant in args.variants.split(","):
        model, step = build(variant, args)
        calls = {str(dt).removeprefix("torch."): partial(measure, model, dtype=dt) for dt in dtypes}
        med = median_times({"step": step, **calls}, args.device, args.warmup, args.repeats, desc=variant)
        step_s = med["step"]
        for k in calls:
            cb_s = med[k]
            rows.append({"variant": variant, "dtype": k, "device": args.device, "step_ms": step_s * 1e3,
                         "callback_ms": cb_s * 1e3, "every_n": args.every,
                         "overhead_pct": 100 * cb_s / (args.every * step_s),
                         "min_n_under_budget": math.ceil(cb_s / (args.budget * step_s))})

    print(f"\ndevice {args.device}, {torch.get_num_threads()} CPU threads, d {args.d_model}, {args.layers} layers, "
          f"{args.heads} heads, batch {args.batch} x seq {args.seq}; median of {args.repeats} (warm-up {args.warmup})")
    print(f"{'variant':8s} {'dtype':8s} {'step ms':>9s} {'callback ms':>12s} {'overhead @N=' + str(args.every):>16s} "
          f"{'smallest N <' + format(args.budget, '.0%'):>16s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['dtype']:8s} {r['step_ms']:9.1f} {r['callback_ms']:12.1f} "
              f"{r['overhead_pct']:15.3f}% {r['min_n_under_budget']:16d}")

    out = Path(args.out)
    write_csv(rows, out.with_suffix(".csv"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    ns = [2 ** i for i in range(0, 13)]
    for r in rows:
        ax.plot(ns, [100 * r["callback_ms"] / (n * r["step_ms"]) for n in ns], marker=".",
                label=f"{r['variant']} {r['dtype']} (step {r['step_ms']:.0f} ms, call {r['callback_ms']:.0f} ms)")
    ax.axhline(100 * args.budget, color="k", ls="--", lw=1, label=f"budget {args.budget:.0%}")
    ax.axvline(args.every, color="grey", ls=":", lw=1, label=f"N = {args.every}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("every N steps")
    ax.set_ylabel("overhead, % of step time")
    ax.set_title(f"rank callback cost ({args.device})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out.with_suffix('.csv')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
