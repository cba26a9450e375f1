"""Memory and time of the attention-spectra tool on one DeepSeek-V3-shaped FP8 layer, beside a straightforward
reference.

    python scripts/bench_spectra.py            # real shapes: d 7168, 128 heads, r_q 1536, r_kv 512, d_nope 128,
                                               # d_r 64, d_v 128 (~10 min on a 2-core CPU, mostly the reference)
    python scripts/bench_spectra.py --quick    # every size / 4 (a minute): checks the script, not the targets

One synthetic layer is written in FP8 (128 x 128 block scales, scales in other shards than their weights) with
its config.json and index into a temp dir. Then, each in its own subprocess so that peak RSS is its own:
- tool:      ethos.analysis.spectra on that dir, computing in float64 (the default) and in float32;
- reference: dense dequantisation of every tensor, then torch.linalg.svdvals of every full matrix, head by head:
             W_O_h, stacked W_O, W_qa, W_kva, W_kr, and the materialised fused W_QK_h (r_q x r_kv) and W_VO_h
             (r_kv x d); in float64 and in float32.
Each tool variant is timed against the reference of its own precision. The speedup of the float64 tool over the
float32 reference is printed too: on a CPU float64 costs about twice float32, in the tool's Gram matrices and
eigensolves (the stacked W_O's 7168 x 7168 ones are most of its time) as in the reference's SVDs.
Each reports its RSS after imports and its peak RSS from then on (the peak is reset there: /proc/self/clear_refs,
VmHWM), so "growth" is what the analysis itself holds.
Targets (issue 11): growth < 3x the layer's bf16 attention weights; tool >= 5x faster than the reference (each
dtype).
Prints seconds per layer (and projected for DeepSeek-V3's 61 layers), growth, ratios, and the largest relative
difference between the two spectra; writes <out>.csv and <out>.png.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import reset_peak_resident, resident_kb, write_csv

REAL = {"d": 7168, "heads": 128, "q_latent": 1536, "kv_latent": 512, "d_nope": 128, "d_rope": 64, "d_v": 128}
LAYERS = 61  # DeepSeek-V3


def rss_mb() -> float:
    """Resident set now; resets the peak, so that peak_mb() is the peak from here on and not one reached while
    importing."""
    reset_peak_resident()
    return (resident_kb("VmRSS") or 0) / 1024


def peak_mb() -> float:
    kb = resident_kb("VmHWM")
    if kb is None:  # not Linux: the lifetime peak, an upper bound (and rss_mb() reads 0)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return kb / 1024


def write_layer(root: Path, shape: dict) -> int:
    """The synthetic FP8 layer; returns the bytes of its attention weights in bf16."""
    from ethos.analysis.synthetic import mla_config, mla_layer, write_checkpoint

    cfg = mla_config(shape["d"], shape["heads"], shape["q_latent"], shape["kv_latent"], shape["d_nope"],
                     shape["d_rope"], shape["d_v"], fp8=True)
    tensors = mla_layer(cfg, 0, torch.Generator().manual_seed(0))
    write_checkpoint(root, cfg, tensors, shards=4, fp8=True)
    return 2 * sum(t.numel() for t in tensors.values())


def run_tool(ckpt: Path, dtype: str) -> dict:
    from ethos.analysis import spectra, store

    out = Path(tempfile.mkdtemp(prefix="spectra_out_"))
    base = rss_mb()
    t0 = time.perf_counter()  # the per-layer work and its outputs; the plots are made once per run, not timed
    spectra.analyse(str(ckpt), out, dtype=getattr(torch, dtype), progress=False, plots=False)
    seconds = time.perf_counter() - t0
    svals, _ = store.load_layer(store.layer_path(out, 0))
    return {"seconds": seconds, "base_mb": base, "peak_mb": peak_mb(),
            "svals": {k: v.tolist() for k, v in svals.items()}}


def run_reference(ckpt: Path, dtype: str) -> dict:
    """Dense dequantisation, then svdvals of every full matrix in `dtype`, fused products materialised."""
    from safetensors import safe_open

    from ethos.analysis.fp8 import dequantize_fp8

    base = rss_mb()
    t0 = time.perf_counter()
    cfg = json.loads((ckpt / "config.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    t = {}
    for name, shard in index.items():
        with safe_open(str(ckpt / shard), framework="pt") as f:
            t[name] = f.get_tensor(name)
    dt = getattr(torch, dtype)
    t = {k.removeprefix("model.layers.0."): (dequantize_fp8(v, t[k + "_scale_inv"], dtype=dt)
                                             if v.dtype == torch.float8_e4m3fn else v.to(dt))
         for k, v in t.items() if not k.endswith("_scale_inv")}
    H, dn, dv, r_kv = cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["v_head_dim"], cfg["kv_lora_rank"]
    d_qk = dn + cfg["qk_rope_head_dim"]
    g = t["input_layernorm.weight"]
    W_o = t["self_attn.o_proj.weight"].T
    W_q = (t["self_attn.q_b_proj.weight"] * t["self_attn.q_a_layernorm.weight"]).T
    W_kv = (t["self_attn.kv_b_proj.weight"] * t["self_attn.kv_a_layernorm.weight"]).T
    W_kva = (t["self_attn.kv_a_proj_with_mqa.weight"] * g).T
    sv = torch.linalg.svdvals
    out = {"o": sv(W_o), "qa": sv((t["self_attn.q_a_proj.weight"] * g).T), "kva": sv(W_kva[:, :r_kv]),
           "kr": sv(W_kva[:, r_kv:]), "o_head": [], "qk": [], "vo": []}
    for h in range(H):
        o_h = W_o[h * dv:(h + 1) * dv]
        k_h, v_h = W_kv[:, h * (dn + dv):h * (dn + dv) + dn], W_kv[:, h * (dn + dv) + dn:(h + 1) * (dn + dv)]
        out["o_head"].append(sv(o_h))
        out["qk"].append(sv(W_q[:, h * d_qk:h * d_qk + dn] @ k_h.T))
        out["vo"].append(sv(v_h @ o_h))
    seconds = time.perf_counter() - t0
    svals = {k: (torch.stack(v) if isinstance(v, list) else v).tolist() for k, v in out.items()}
    return {"seconds": seconds, "base_mb": base, "peak_mb": peak_mb(), "svals": svals}


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest |a - b| / s_1 over every kind and head (the leading values each side reports)."""
    worst = 0.0
    for kind in a:
        x, y = torch.tensor(a[kind]).double(), torch.tensor(b[kind]).double()
        n = min(x.shape[-1], y.shape[-1])
        x, y = x[..., :n], y[..., :n]
        worst = max(worst, float(((x - y).abs() / y[..., :1]).max()))
    return worst


def worker(kind: str, ckpt: Path) -> dict:
    """Run one measurement in a fresh interpreter: its peak RSS is its own."""
    proc = subprocess.run([sys.executable, __file__, "--worker", kind, str(ckpt)], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{kind} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    names = [r["variant"].replace(":", "\n") for r in rows]  # two lines: four labels fit side by side
    axes[0].bar(names, [r["s_per_layer"] for r in rows])
    axes[0].set_ylabel("seconds per layer")
    axes[1].bar(names, [r["rss_growth_vs_bf16"] for r in rows])
    axes[1].axhline(3.0, color="red", lw=0.8, ls="--", label="target < 3x")
    axes[1].set_ylabel("peak RSS growth / bf16 attention weights")
    axes[1].legend(fontsize=8)
    fig.suptitle(", ".join(f"{k} {v}" for k, v in rows[0]["shape"].items()), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="every size / 4: a check of the script, not of the targets")
    p.add_argument("--out", default="bench_results/spectra", help="writes <out>.csv and <out>.png")
    p.add_argument("--variants", default="tool:float64,reference:float64,tool:float32,reference:float32",
                   help="what to measure (comma-separated): tool:<dtype>, reference:<dtype>; dtype float64/float32")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "CKPT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, ckpt = args.worker
        what, dtype = kind.split(":")
        result = (run_reference if what == "reference" else run_tool)(Path(ckpt), dtype)
        print(json.dumps(result))
        return
    for kind in args.variants.split(","):
        what, _, dtype = kind.partition(":")
        if what not in ("tool", "reference") or dtype not in ("float64", "float32"):
            sys.exit(f"--variants: {kind!r} is not tool:<dtype> or reference:<dtype>, dtype float64 or float32")
    shape = {k: max(1, v // 4) for k, v in REAL.items()} if args.quick else REAL
    with tempfile.TemporaryDirectory(prefix="bench_spectra_") as tmp:
        t0 = time.perf_counter()
        bf16 = write_layer(Path(tmp), shape)
        print(f"wrote one FP8 layer ({', '.join(f'{k} {v}' for k, v in shape.items())}) in "
              f"{time.perf_counter() - t0:.0f}s; its attention weights in bf16: {bf16 / 2**20:.0f} MB")
        results = {}
        for kind in args.variants.split(","):
            results[kind] = worker(kind, Path(tmp))
            r = results[kind]
            print(f"  {kind:17s} {r['seconds']:8.1f} s   peak RSS growth {r['peak_mb'] - r['base_mb']:7.0f} MB",
                  flush=True)
    rows = []
    none = {"seconds": float("nan"), "svals": None}
    for kind, r in results.items():
        # each variant against the reference of its own precision; and against the float32 reference
        ref, ref32 = results.get("reference:" + kind.split(":")[1], none), results.get("reference:float32", none)
        growth = max(0.0, r["peak_mb"] - r["base_mb"])
        rows.append({"variant": kind, "shape": shape, "s_per_layer": r["seconds"],
                     "projected_61_layers_min": r["seconds"] * LAYERS / 60, "rss_after_imports_mb": r["base_mb"],
                     "peak_rss_mb": r["peak_mb"], "rss_growth_mb": growth,
                     "rss_growth_vs_bf16": growth / (bf16 / 2**20),
                     "speedup_vs_reference": ref["seconds"] / r["seconds"],
                     "speedup_vs_float32_reference": ref32["seconds"] / r["seconds"],
                     "max_rel_diff_vs_reference": (max_rel_diff(r["svals"], ref["svals"]) if ref["svals"]
                                                   else float("nan"))})
    print(f"\n{'variant':17s} {'s/layer':>8s} {'61 layers':>10s} {'RSS growth':>11s} {'/ bf16':>7s} "
          f"{'speedup':>8s} {'vs fp32 ref':>11s} {'max |ds|/s_1':>13s}")
    for r in rows:
        print(f"{r['variant']:17s} {r['s_per_layer']:8.1f} {r['projected_61_layers_min']:8.1f} m "
              f"{r['rss_growth_mb']:8.0f} MB {r['rss_growth_vs_bf16']:6.2f}x {r['speedup_vs_reference']:7.1f}x "
              f"{r['speedup_vs_float32_reference']:10.1f}x {r['max_rel_diff_vs_reference']:13.1e}")
    print(f"\ntargets ({'quick sizes: indicative only' if args.quick else 'real shapes'}; speedup against the "
          "reference of the same precision):")
    for tool in (r for r in rows if r["variant"].startswith("tool")):
        rss_ok, speed_ok = tool["rss_growth_vs_bf16"] < 3, tool["speedup_vs_reference"] >= 5
        print(f"  {tool['variant']}: RSS growth {tool['rss_growth_vs_bf16']:.2f}x bf16 weights "
              f"(< 3x: {'met' if rss_ok else 'NOT met'}), speedup {tool['speedup_vs_reference']:.1f}x "
              f"(>= 5x: {'met' if speed_ok else 'NOT met'})")
    out = Path(args.out)
    write_csv([{**r, "shape": json.dumps(r["shape"])} for r in rows], out.with_suffix(".csv"))
    plot(rows, out.with_suffix(".png"))
    print(f"-> {out.with_suffix('.csv')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
