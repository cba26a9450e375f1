"""The MoE layer's forward+backward against the naive per-expert loop and against dense SwiGLU of equal active
parameters, side by side in one process.

    python scripts/bench_moe.py                                     # CPU, float32, a few minutes: run it alone
    python scripts/bench_moe.py --device cuda --dtype bf16 --tokens 16384

Timed, each on the same tokens and (for the MoE rows) the same weights:
  moe            ours (ethos.models.moe.MoE, impl=auto: the grouped GEMM here, in fp32 on CPU and bf16 on CUDA)
  moe-grouped    ours, impl=grouped (torch's grouped GEMM; CPU float32 or bf16, CUDA bf16)
  moe-padded     ours, impl=padded
  loop           the naive reference: our router, then a Python loop over the experts, each gathering its tokens
                 (x vs loop, the figure the 3x target reads, is this row's time over each)
  hf-loop        transformers' DeepseekV3MoE with our weights copied, its default experts: the same kind of loop
  hf-grouped     the same module with transformers' grouped_mm experts (both left out, with a note, where the
                 installed transformers has no such module)
  dense          SwiGLU of d_ff = (top_k + n_shared) x d_expert: the dense FFN of equal active parameters
Configs: `ablation` is experiment=ffn_ablation's MoE (d 256, 64 experts of 128, top 6, 2 shared: DeepSeekMoE's
counts); `mid` doubles d and the expert width; `v3` has DeepSeek-V3's counts (256 experts, top 8, 1 shared) and
about its expert width over d (2048 / 7168, here 128 / 512); `ethos_ref` the same counts at the width of the
reference study's ETHOS decoder (d 1024, experts of 256), the layer an MoE baseline for it would have.
Reported: median ms, the naive loop's time over each (x vs loop), each over dense's, peak memory of a step
(ethos.bench.step_peak_mb), parameters total and active, and the largest deviation of our output from the loop's
and from transformers' (checks that all compute the same layer). Writes <out>/bench_moe.csv and .png.
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, step_peak_mb, write_csv
from ethos.models.ffn import SwiGLU
from ethos.models.moe import MoE

CONFIGS = {
    "ablation": dict(d_model=256, num_experts=64, top_k=6, d_expert=128, n_shared=2),
    "mid": dict(d_model=512, num_experts=64, top_k=6, d_expert=256, n_shared=2),
    "v3": dict(d_model=512, num_experts=256, top_k=8, d_expert=128, n_shared=1),
    "ethos_ref": dict(d_model=1024, num_experts=256, top_k=8, d_expert=256, n_shared=1),
}


class Loop(nn.Module):
    """The naive per-expert loop on m's router and weights: what a first implementation does."""

    def __init__(self, m: MoE):
        super().__init__()
        self.m = m

    def forward(self, x):
        m, xf = self.m, x.reshape(-1, x.shape[-1])
        idx, gates, _ = m.route(xf)
        y = torch.zeros_like(xf)
        for e in range(m.num_experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if len(token):
                gate, up = (xf[token] @ m.w13[e]).chunk(2, dim=-1)
                y = y.index_add(0, token, ((F.silu(gate) * up) @ m.w2[e]) * gates[token, slot, None].to(x.dtype))
        return (y + m.shared(xf)).view_as(x)


def hf_twin(m: MoE, implementation: str):
    """transformers' DeepseekV3MoE (one group, sigmoid scores, normalised top-k) holding m's weights."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE
    from transformers.utils import logging

    logging.set_verbosity_error()  # a standalone experts module: its dispatch warns that it has no model config

    d, f = m.gate.in_features, m.d_expert
    cfg = DeepseekV3Config(hidden_size=d, moe_intermediate_size=f, n_routed_experts=m.num_experts,
                           num_experts_per_tok=m.top_k, n_shared_experts=m.n_shared, n_group=1, topk_group=1,
                           norm_topk_prob=m.norm_topk, routed_scaling_factor=m.route_scale, hidden_act="silu")
    cfg._experts_implementation = None if implementation == "eager" else implementation
    hf = DeepseekV3MoE(cfg)
    with torch.no_grad():
        hf.gate.weight.copy_(m.gate.weight)
        hf.gate.e_score_correction_bias.copy_(m.bias)
        hf.experts.gate_up_proj.copy_(m.w13.transpose(1, 2))
        hf.experts.down_proj.copy_(m.w2.transpose(1, 2))
        shared = m.n_shared * f
        hf.shared_experts.gate_proj.weight.copy_(m.shared.w13.weight[:shared])
        hf.shared_experts.up_proj.weight.copy_(m.shared.w13.weight[shared:])
        hf.shared_experts.down_proj.weight.copy_(m.shared.w2.weight)
    return hf


def make_step(module, x, grad, impl=None):
    def step():
        if impl is not None:
            module.impl = impl
        x.grad = None
        module.zero_grad(set_to_none=True)
        module(x).backward(grad)
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--configs", default="ablation,mid,v3,ethos_ref", help="comma list of: " + ", ".join(CONFIGS))
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step (32 x 128 by default)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="bench_results", help="folder for bench_moe.csv / .png")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device available")
    from rich.console import Console
    from rich.table import Table

    grouped_ok = hasattr(F, "grouped_mm") and (device.type == "cpu" or dtype == torch.bfloat16)
    rows = []
    for name in args.configs.split(","):
        c = CONFIGS[name]
        torch.manual_seed(0)
        moe = MoE(**c, impl="auto").to(device).train()
        with torch.no_grad():  # a trained router's spread of scores, not init's near-ties
            moe.gate.weight.normal_(0, c["d_model"] ** -0.5)
        dense = SwiGLU(c["d_model"], (c["top_k"] + c["n_shared"]) * c["d_expert"]).to(device)
        try:
            hf = {impl: hf_twin(moe, impl).to(device).train() for impl in ("eager", "grouped_mm")}
        except Exception as e:  # another transformers (no DeepseekV3MoE, or another expert layout)
            print(f"transformers' DeepseekV3MoE left out: {type(e).__name__}: {e}")
            hf = {}
        moe, dense, hf = moe.to(dtype), dense.to(dtype), {k: v.to(dtype) for k, v in hf.items()}
        loop = Loop(moe)
        x = torch.randn(1, args.tokens, c["d_model"], device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn_like(x)
        with torch.no_grad():
            moe.eval()
            y = moe(x)
            deviation = {"loop": float((y - loop(x)).abs().max())}
            if hf:
                deviation["transformers"] = float((y - hf["eager"](x)).abs().max())
            moe.train()
        steps = {"moe": make_step(moe, x, grad, "auto")}
        if grouped_ok:
            steps["moe-grouped"] = make_step(moe, x, grad, "grouped")
        steps["moe-padded"] = make_step(moe, x, grad, "padded")
        steps["loop"] = make_step(loop, x, grad)
        if hf:
            steps["hf-loop"] = make_step(hf["eager"], x, grad)
            if grouped_ok:
                steps["hf-grouped"] = make_step(hf["grouped_mm"], x, grad)
        steps["dense"] = make_step(dense, x, grad)
        ms = {k: 1e3 * t for k, t in median_times(steps, device, args.warmup, args.repeats, desc=name).items()}
        total = MoE.param_count(**c)
        for key in steps:
            is_dense = key == "dense"
            rows.append(dict(config=name, impl=key, tokens=args.tokens, dtype=args.dtype, ms=round(ms[key], 2),
                             x_vs_loop=round(ms["loop"] / ms[key], 2), x_dense=round(ms[key] / ms["dense"], 2),
                             peak_mb=step_peak_mb(steps[key], device),
                             params_m=round((dense_params(dense) if is_dense else total) / 1e6, 3),
                             active_params_m=round((dense_params(dense) if is_dense else MoE.active_param_count(**c))
                                                   / 1e6, 3),
                             max_abs_dev_vs_loop=deviation["loop"],
                             max_abs_dev_vs_hf=deviation.get("transformers", "")))
    table = Table(title=f"MoE layer fwd+bwd, {args.tokens} tokens, {device.type} {args.dtype}, "
                        f"{torch.get_num_threads()} threads, median of {args.repeats}")
    for col in ("config", "impl", "ms", "x vs loop", "time / dense", "peak MB", "params M", "active M"):
        table.add_column(col, justify="left" if col in ("config", "impl") else "right")
    for r in rows:
        table.add_row(r["config"], r["impl"], f"{r['ms']:.1f}", f"{r['x_vs_loop']:.2f}", f"{r['x_dense']:.2f}",
                      "-" if r["peak_mb"] is None else f"{r['peak_mb']:.0f}", f"{r['params_m']:.2f}",
                      f"{r['active_params_m']:.2f}")
    Console(width=140).print(table)
    for name in args.configs.split(","):
        r = next(r for r in rows if r["config"] == name)
        hf = r["max_abs_dev_vs_hf"]
        print(f"{name}: our output against the loop's, max |diff| {r['max_abs_dev_vs_loop']:.2e}"
              + ("" if hf == "" else f"; against transformers' DeepseekV3MoE on the same weights {hf:.2e}"))
    out = Path(args.out)
    write_csv(rows, out / "bench_moe.csv")
    plot(rows, out / "bench_moe.png", args)
    print(f"wrote {out / 'bench_moe.csv'} and {out / 'bench_moe.png'}")


def dense_params(m: SwiGLU) -> int:
    return sum(p.numel() for p in m.parameters())


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 3.5), squeeze=False)
    for ax, name in zip(axes[0], configs):
        rs = [r for r in rows if r["config"] == name]
        ax.barh([r["impl"] for r in rs], [r["ms"] for r in rs],
                color=["C1" if r["impl"].startswith("moe") else "C7" if r["impl"] == "dense" else "C0" for r in rs])
        ax.invert_yaxis()
        ax.set_xlabel("ms per forward+backward (median)")
        ax.set_title(f"{name}, {args.tokens} tokens, {args.device} {args.dtype}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
