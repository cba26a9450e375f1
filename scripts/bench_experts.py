"""Forward+backward time and peak memory of the expert layers (router included), one process.

ETHOS latent experts via naive / torch / triton (triton only on CUDA) and PEER at the same N,
heads, k. PEER is timed twice: `peer` is the usual paper-faithful gather + einsum implementation,
`peer-torch` is PEER on the same embedding-bag mixing kernels ETHOS uses (what PEER costs when
given the same engineering).

    python scripts/bench_experts.py                     # CPU, small + mid, ~3-4 min on 2 cores
    python scripts/bench_experts.py --device cuda
    python scripts/bench_experts.py --configs small --repeats 5 --out bench_results

Peak memory (ethos.bench.step_peak_mb): CUDA max_memory_allocated; on CPU the rise of the process peak RSS
(VmHWM, reset through /proc/self/clear_refs, after malloc_trim) over the resident size before the step, so it
includes allocator effects; "-" where that is not available (not Linux).
"""

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, step_peak_mb, write_csv
from ethos.models.moe import PEER, LatentExperts

CONFIGS = {
    "small": {"d_model": 256, "num_experts": 128**2, "d_latent": 64, "d_hidden": 256, "n_heads": 4,
              "top_k": 8, "d_query": 128},
    "mid": {"d_model": 512, "num_experts": 256**2, "d_latent": 128, "d_hidden": 512, "n_heads": 8,
            "top_k": 16, "d_query": 128},
}


def flops_per_token(kind: str, c: dict, tokens: int) -> float:
    """Forward multiply-adds x2 per token, router included (query proj + sub-key scores)."""
    d, N, dl, dh, H, k, dq = (c[n] for n in ("d_model", "num_experts", "d_latent", "d_hidden", "n_heads",
                                              "top_k", "d_query"))
    router = 2 * d * H * dq + 2 * H * math.isqrt(N) * dq
    sel = H * k
    if kind == "naive":
        return router + sel * (2 * dl * dh + 4 * dh * d + 4 * d)
    if kind.startswith("peer"):
        return router + sel * 4 * d
    generate = 2 * N * dl * dh / tokens if tokens * sel > N else sel * 2 * dl * dh
    return router + 4 * d * dh + sel * 4 * dh + generate


def make_step(module, impl, x, grad):
    def step():
        module.impl = impl
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--configs", default="small,mid", help="comma list of: " + ", ".join(CONFIGS))
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads; use 1 when other jobs share the cores (OpenMP barriers "
                         "then stall the many small parallel ops)")
    ap.add_argument("--out", default="bench_results", help="folder for bench_experts.csv / .png")
    args = ap.parse_args()

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    from rich.console import Console
    from rich.table import Table
    from tqdm import tqdm

    impls = ["ethos-naive", "ethos-torch"] + (["ethos-triton"] if device.type == "cuda" else []) + \
        ["peer", "peer-torch"]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    rows = []
    for name in tqdm(configs, desc="bench", unit="config"):
        c = CONFIGS[name]
        torch.manual_seed(0)
        x = torch.randn(1, args.tokens, c["d_model"], device=device, requires_grad=True)
        grad = torch.randn_like(x)
        router = {k: c[k] for k in ("d_model", "num_experts", "n_heads", "top_k", "d_query")}
        ethos = LatentExperts(**router, d_latent=c["d_latent"], d_hidden=c["d_hidden"]).to(device).train()
        peer = PEER(**router).to(device).train()
        steps, n_params = {}, {}
        for impl in impls:
            module = ethos if impl.startswith("ethos") else peer
            kind = impl.split("-")[1] if impl.startswith("ethos") else ("naive" if impl == "peer" else "torch")
            steps[impl] = make_step(module, kind, x, grad)
            n_params[impl] = sum(p.numel() for p in module.parameters())
        ms = {k: 1e3 * t for k, t in median_times(steps, device, args.warmup, args.repeats, desc=name).items()}
        for impl in impls:
            mb = step_peak_mb(steps[impl], device)
            flops = flops_per_token("naive" if impl == "ethos-naive" else impl, c, args.tokens)
            rows.append({"config": name, "impl": impl, "ms": ms[impl], "peak_mb": mb,
                         "params_m": n_params[impl] / 1e6, "mflop_per_token": flops / 1e6})

    table = Table(title=f"expert layers, fwd+bwd, {args.tokens} tokens, {device.type}, "
                        f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for col in ("config", "impl", "ms", "x vs naive", "x vs peer", "peak MB", "params M",
                "fwd MFLOP/token"):
        table.add_column(col, justify="left" if col in ("config", "impl") else "right")
    for r in rows:
        same = {q["impl"]: q for q in rows if q["config"] == r["config"]}
        r["speedup_vs_naive"] = same["ethos-naive"]["ms"] / r["ms"]
        r["speedup_vs_peer"] = same["peer"]["ms"] / r["ms"]
        table.add_row(r["config"], r["impl"], f"{r['ms']:.1f}", f"{r['speedup_vs_naive']:.2f}",
                      f"{r['speedup_vs_peer']:.2f}", "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}",
                      f"{r['params_m']:.2f}", f"{r['mflop_per_token']:.2f}")
    Console(width=140).print(table)

    out = Path(args.out)
    write_csv(rows, out / "bench_experts.csv")
    _plot(rows, configs, impls, out / "bench_experts.png")
    print(f"wrote {out / 'bench_experts.csv'} and {out / 'bench_experts.png'}")


def _plot(rows, configs, impls, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(impls)
    for j, impl in enumerate(impls):
        r = [next(q for q in rows if q["config"] == c and q["impl"] == impl) for c in configs]
        pos = [i + j * width for i in range(len(configs))]
        axes[0].bar(pos, [q["ms"] for q in r], width, label=impl)
        axes[1].bar(pos, [q["peak_mb"] or 0 for q in r], width, label=impl)
    for ax, label in zip(axes, ("fwd+bwd time (ms, log)", "peak memory (MB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(configs))], configs)
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
