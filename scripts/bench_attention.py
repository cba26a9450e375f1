"""Isolated-layer forward+backward throughput of MHA / MLA / MLA-o over a grid of sizes; with --scores,
time and peak memory of each attention score function and gate relative to softmax.

    python scripts/bench_attention.py                       # CPU default grid, a few minutes
    python scripts/bench_attention.py --device cuda --tokens 65536 --seq 512 1024 2048 4096
    python scripts/bench_attention.py --scores --threads 1  # score functions: seq 128 and 1024, MLA, d 512

For every (d_model, seq) point all variants are built in this process, warmed up, then timed
round-robin (one step of each variant per repeat, so load drift on a shared machine hits all of them
alike); the median step time is reported. MHA and MLA do not depend on d_o and are timed once per
point. RoPE tables are built once per point and passed to every module, as the trunk does once per
forward for all its layers. FLOPs per token are the closed forms (`MHA.flops`, ...; the matmuls of the
forward pass: projections + scores + weighted sum over the full sequence); a training step costs about 3x.
Writes <out>.csv and <out>.png.

--scores: one layer (`--variant`, the first `--d-model`) per score function of ethos/models/scores.py
(and softmax with each gate), timed round-robin as above on the path training takes on the device; peak
memory of one fwd+bwd step above what was allocated before it (ethos.bench.step_peak_mb; CUDA: the
allocator's peak; CPU: the peak resident set, reset through /proc/self/clear_refs, so Linux only).
Writes <out>_scores.csv / .png.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, step_peak_mb, write_csv
from ethos.models.attention import MHA, MLA, MLAO
from ethos.models.rope import rope_tables


def step_fn(m, x: torch.Tensor, rope):
    def step():
        m(x, rope=rope).float().sum().backward()  # backward reaches x and every weight, as in training
    return step


def build(d: int, heads: int, seq: int, q_lat: int, kv_lat: int, o_lats: list[int], args):
    """{name: (module, forward FLOPs per token)}"""
    common = {"d_model": d, "n_heads": heads, "head_dim": d // heads, "rope_dims": (d // heads) // 2,
              "max_seq_len": seq}
    specs = {"MHA": (MHA, {}), "MLA": (MLA, {"q_latent": q_lat, "kv_latent": kv_lat})}
    for o in o_lats:
        specs[f"MLA-o/{o}"] = (MLAO, {"q_latent": q_lat, "kv_latent": kv_lat, "o_latent": o})
    return {k: (cls(**common, **kw).to(args.device, args.dtype), cls.flops(**common, **kw, seq_len=seq))
            for k, (cls, kw) in specs.items()}


def clear_grads(mods: dict, x: torch.Tensor) -> None:
    for m in mods.values():
        m.zero_grad(set_to_none=True)
    x.grad = None


def timed(steps: dict, mods: dict, x: torch.Tensor, args) -> dict:
    """Median seconds of each step (ethos.bench.median_times), gradients cleared before each."""
    return median_times(steps, args.device, args.warmup, args.repeats, before=lambda: clear_grads(mods, x))


def bench_point(d, heads, seq, q_lat, kv_lat, o_lats, args) -> list[dict]:
    batch = max(1, args.tokens // seq)
    built = build(d, heads, seq, q_lat, kv_lat, o_lats, args)
    mods, flops = {k: m for k, (m, _) in built.items()}, {k: f for k, (_, f) in built.items()}
    x = torch.randn(batch, seq, d, device=args.device, dtype=args.dtype, requires_grad=True)
    rope = rope_tables((d // heads) // 2, seq, dtype=args.dtype, device=args.device)  # shared, as in the trunk
    steps = {k: step_fn(m, x, rope) for k, m in mods.items()}
    med = timed(steps, mods, x, args)
    rows = []
    for k, m in mods.items():
        rows.append({"d_model": d, "heads": heads, "seq": seq, "batch": batch, "q_latent": q_lat, "kv_latent": kv_lat,
                         "o_latent": m.o_latent if isinstance(m, MLAO) else "", "variant": k.split("/")[0],
                         "ms": 1e3 * med[k], "ktok_s": batch * seq / med[k] / 1e3,
                         "mflop_tok": flops[k] / 1e6,
                         "time_vs_mha": med[k] / med["MHA"], "time_vs_mla": med[k] / med["MLA"],
                         "flops_vs_mla": flops[k] / flops["MLA"]})
    return rows


# ---------------------------------------------------------------- --scores
SCORE_ROWS = [("softmax", "none"), ("softmax1", "none"), ("sink", "none"), ("sigmoid", "none"), ("relu", "none"),
              ("softmax", "head"), ("softmax", "elementwise")]
LIMITS = {"softmax1": 1.3, "sink": 1.3, "sigmoid": 3.0, "relu": 3.0}  # the bars (sigmoid, relu: seq 1024)


def bench_scores(args) -> list[dict]:
    d = args.d_model[0]
    heads = d // args.head_dim
    common = {"d_model": d, "n_heads": heads, "head_dim": args.head_dim, "rope_dims": args.head_dim // 2}
    latents = {"q_latent": int(args.q_latent * d), "kv_latent": int(args.kv_latent * d)}
    cls, kw = {"MHA": (MHA, {}), "MLA": (MLA, latents),
               "MLA-o": (MLAO, {**latents, "o_latent": int(args.o_latent[0] * d)})}[args.variant]
    rows = []
    for seq in args.seq:
        batch = max(1, args.tokens // seq)
        mods = {}
        for score, gate in SCORE_ROWS:
            torch.manual_seed(0)
            m = cls(**common, **kw, max_seq_len=seq, score=score, gate=gate)
            mods[(score, gate)] = m.to(args.device, args.dtype)
        x = torch.randn(batch, seq, d, device=args.device, dtype=args.dtype, requires_grad=True)
        rope = rope_tables(args.head_dim // 2, seq, dtype=args.dtype, device=args.device)
        steps = {k: step_fn(m, x, rope) for k, m in mods.items()}
        med = timed(steps, mods, x, args)
        mem = {}
        for k, step in steps.items():
            clear_grads(mods, x)
            mem[k] = step_peak_mb(step, args.device)
        base = ("softmax", "none")
        for (score, gate), t in med.items():
            rows.append({"variant": args.variant, "d_model": d, "heads": heads, "seq": seq, "batch": batch,
                         "score": score, "gate": gate, "ms": 1e3 * t, "peak_mb": mem[(score, gate)],
                         "time_vs_softmax": t / med[base],
                         "mem_vs_softmax": mem[(score, gate)] / max(mem[base], 1e-9)})
    return rows


def plot_scores(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seqs = sorted({r["seq"] for r in rows})
    names = [f"{s}" + ("" if g == "none" else f"+{g}") for s, g in SCORE_ROWS]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(seqs)
    for ax, key, title in zip(axes, ("time_vs_softmax", "mem_vs_softmax"),
                              ("fwd+bwd time / softmax", "peak memory / softmax")):
        for i, seq in enumerate(seqs):
            vals = [next(r[key] for r in rows if r["seq"] == seq and (r["score"], r["gate"]) == sg)
                    for sg in SCORE_ROWS]
            ax.bar([j + i * width for j in range(len(names))], vals, width, label=f"T={seq}")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xticks([j + width * (len(seqs) - 1) / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set_title(f"{rows[0]['variant']} d={rows[0]['d_model']}: {title}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report_scores(rows: list[dict], args) -> None:
    out = f"{args.out}_scores"
    write_csv(rows, f"{out}.csv")
    plot_scores(rows, Path(f"{out}.png"))
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    print(f"\n{args.device} {str(args.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} fwd+bwd steps")
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for r in rows:
        print("| " + " | ".join(fmt(v) for v in r.values()) + " |")
    long = max(r["seq"] for r in rows)
    for r in rows:
        limit = LIMITS.get(r["score"]) if r["gate"] == "none" else None
        if limit and (r["score"] in ("softmax1", "sink") or r["seq"] == long):
            verdict = "within" if r["time_vs_softmax"] <= limit else "OVER"
            print(f"{r['score']} T={r['seq']}: {r['time_vs_softmax']:.2f}x softmax ({verdict} {limit}x)")
    print(f"wrote {out}.csv, {out}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for seq in sorted({r["seq"] for r in rows}):
        for variant in ("MLA", "MLA-o"):
            for o_frac in sorted({r["o_latent"] / r["d_model"] for r in rows if r["variant"] == "MLA-o"}):
                sel = [r for r in rows if r["seq"] == seq and r["variant"] == variant
                       and (variant == "MLA" or r["o_latent"] / r["d_model"] == o_frac)]
                label = f"{variant} T={seq}" + (f" d_o=d/{round(1 / o_frac)}" if variant == "MLA-o" else "")
                xs = [r["d_model"] for r in sel]
                axes[0].plot(xs, [r["time_vs_mha"] for r in sel], marker="o", label=label)
                if variant == "MLA-o":
                    axes[1].plot(xs, [r["time_vs_mla"] for r in sel], marker="o", label=label)
                    axes[1].plot(xs, [r["flops_vs_mla"] for r in sel], ls=":", color=axes[1].lines[-1].get_color())
                if variant == "MLA":
                    break  # MLA does not depend on d_o
    for ax, title in zip(axes, ("step time / MHA", "MLA-o step time / MLA (dotted: FLOPs / MLA)")):
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("d_model")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default)")
    p.add_argument("--d-model", type=int, nargs="+", default=[256, 512, 1024, 2048])
    p.add_argument("--head-dim", type=int, default=64, help="heads = d_model / head_dim")
    p.add_argument("--seq", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--q-latent", type=float, default=0.25, help="r_q as a fraction of d_model")
    p.add_argument("--kv-latent", type=float, default=0.125, help="r_kv as a fraction of d_model")
    p.add_argument("--o-latent", type=float, nargs="+", default=[0.25, 0.5], help="d_o / d_model")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per step (batch = tokens / seq)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (1 gives stable numbers on a machine shared with other jobs)")
    p.add_argument("--out", default="bench_results/attention", help="writes OUT.csv and OUT.png")
    p.add_argument("--scores", action="store_true",
                   help="score functions and gates vs softmax (one layer, the first --d-model; d 512 unless given)")
    p.add_argument("--variant", default="MLA", choices=["MHA", "MLA", "MLA-o"], help="--scores: the layer")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.dtype = getattr(torch, args.dtype or ("bfloat16" if args.device == "cuda" else "float32"))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if args.scores:
        if args.d_model == p.get_default("d_model"):
            args.d_model = [512]
        report_scores(bench_scores(args), args)
        return

    grid = [(d, s) for d in args.d_model for s in args.seq]
    rows = []
    for d, seq in tqdm(grid, desc="bench", unit="point"):
        o_lats = [int(f * d) for f in args.o_latent]
        rows += bench_point(d, d // args.head_dim, seq, int(args.q_latent * d), int(args.kv_latent * d),
                            o_lats, args)

    write_csv(rows, f"{args.out}.csv")
    plot(rows, Path(f"{args.out}.png"))

    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    show = ["d_model", "heads", "seq", "batch", "q_latent", "kv_latent", "o_latent", "variant", "ms",
            "ktok_s", "mflop_tok", "time_vs_mha", "time_vs_mla", "flops_vs_mla"]
    print(f"\n{args.device} {str(args.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} fwd+bwd steps; mflop_tok = forward MFLOPs per token")
    print("| " + " | ".join(show) + " |\n|" + "---|" * len(show))
    for r in rows:
        print("| " + " | ".join(fmt(r[c]) for c in show) + " |")
    # the claim to check: MLA-o is at least as fast as MLA wherever it has fewer FLOPs
    fewer = [r for r in rows if r["variant"] == "MLA-o" and r["flops_vs_mla"] < 1]
    slower = [r for r in fewer if r["time_vs_mla"] > 1]
    print(f"\nMLA-o with fewer FLOPs than MLA: {len(fewer)} points, slower than MLA at {len(slower)}"
          + "".join(f"\n  d={r['d_model']} T={r['seq']} d_o={r['o_latent']}: {r['time_vs_mla']:.3f}x"
                    for r in slower))
    print(f"wrote {args.out}.csv, {args.out}.png")


if __name__ == "__main__":
    main()
