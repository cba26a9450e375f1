"""Decoder training steps: compiled against eager, the document mask against none, the modern recipe against the
reference decoder, side by side in one process.

    python scripts/bench_decoder.py                                   # CPU: compiled vs eager, a few minutes
    python scripts/bench_decoder.py --device cuda --dtype bf16 --seq-len 1024 --batch 32 --repeats 20

Configs (composed from ethos/conf, so the benchmark times what `python train.py` builds):
  reference  task=clm model=mha at the reference decoder's sizes (d 256, 6 layers, 8 x 32 heads, RoPE on all
             channels, SwiGLU 1024, tied head), AdamW
  modern     experiment=modern_decoder (GQA, QK-norm, ReLU^2, untied head, soft-cap, zero-init), Muon + AdamW
Each is timed eager and with its trunk compiled (model.compile=true), each with packed documents under
`data.doc_mask` (documents of --doc-len tokens) and without. One step = forward, backward, optimizer step.
Steps are timed round-robin (ethos.bench.median_times); medians are reported, with tokens/s and, on CUDA,
MFU against the device's dense bf16 peak (--peak-tflops). Ratios: compiled / eager step time, doc-masked /
unmasked step time. Writes <out>.csv and <out>.png.
"""

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ethos.bench import median_times, write_csv
from ethos.config import CONF_DIR, register_resolvers
from ethos.models.flops import TRAIN_FACTOR
from ethos.optim import make_optimizer
from ethos.tasks.clm import CausalLM

CONFIGS = {"reference": ["task=clm", "model=mha", "model.head_dim=32", "model.rope_dims=32"],
           "modern": ["experiment=modern_decoder"]}


def config(name: str, args):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=[*CONFIGS[name], f"model.max_seq_len={args.seq_len}", *args.overrides,
                                           "paths.output_dir=/nonexistent"])


def doc_batch(args, vocab: int, device):
    B, T = args.batch, args.seq_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (B, T + 1), generator=g).to(device)
    t = torch.arange(T, device=device)
    docs = (t // args.doc_len + 1).expand(B, T)
    return ids[:, :-1], ids[:, 1:].clone(), docs, (t % args.doc_len).expand(B, T)


def train_step(net, optimizer, batch, masked: bool, dtype):
    x, labels, docs, pos = batch

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = net.clm_loss(x, None, labels, *((docs, pos) if masked else (None, None)))[0]
        loss.backward()
        optimizer.step()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--configs", default="reference,modern")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--doc-len", type=int, default=50)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every config (toy sizes)")
    p.add_argument("--out", default="bench_results/decoder", help="writes OUT.csv and OUT.png")
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), torch.bfloat16 if args.dtype == "bf16" else torch.float32
    steps, meta = {}, {}
    for name in args.configs.split(","):
        cfg = config(name, args)
        for compiled in (False, True):
            torch.manual_seed(0)
            optim = instantiate(cfg.optim)
            task = CausalLM(instantiate(cfg.model), optim, args.vocab).to(device)  # the task's optimizer rule
            net = task.model
            if compiled:
                net.trunk.compile()
            opt = make_optimizer(task.param_groups(), optim, fused=device.type == "cuda")
            batch = doc_batch(args, args.vocab, device)
            for masked in (False, True):
                key = f"{name} {'compiled' if compiled else 'eager'} {'doc-masked' if masked else 'no mask'}"
                steps[key] = train_step(net, opt, batch, masked, dtype)
                meta[key] = dict(config=name, compiled=compiled, doc_mask=masked,
                                 flops=TRAIN_FACTOR * net.flops_per_token(args.seq_len, args.batch))
    times = median_times(steps, device, args.warmup, args.repeats, desc="steps")
    tokens = args.batch * args.seq_len
    rows = []
    for key, t in times.items():
        m = meta[key]
        eager = times[key.replace("compiled", "eager")]
        unmasked = times[key.replace("doc-masked", "no mask")]
        rows.append(dict(step=key, config=m["config"], compiled=m["compiled"], doc_mask=m["doc_mask"],
                         ms=round(1e3 * t, 2), tokens_per_s=round(tokens / t),
                         mfu=round(m["flops"] * tokens / t / (args.peak_tflops * 1e12), 4)
                         if device.type == "cuda" else "",
                         compiled_over_eager=round(t / eager, 3), masked_over_unmasked=round(t / unmasked, 3)))
        print(f"{key:<36} {1e3 * t:9.1f} ms  {tokens / t:10.0f} tok/s  compiled/eager {t / eager:.2f}  "
              f"masked/unmasked {t / unmasked:.2f}" + (f"  MFU {rows[-1]['mfu']:.3f}" if device.type == "cuda" else ""))
    path = write_csv(rows, Path(args.out).with_suffix(".csv"))
    plot(rows, Path(args.out).with_suffix(".png"), args)
    print(f"wrote {path} and {path.with_suffix('.png')}")


def plot(rows: list[dict], path: Path, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh([r["step"] for r in rows], [r["ms"] for r in rows], color=["C1" if r["compiled"] else "C0" for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("ms per training step (median)")
    ax.set_title(f"decoder steps on {args.device} ({args.dtype}), batch {args.batch} x {args.seq_len}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
