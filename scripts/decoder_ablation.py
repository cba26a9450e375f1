"""The modern decoder against today's, and what each of its keys contributes: one run per row, same data, tokenizer,
seed and tokens, val/bpb at every evaluation.

    python scripts/decoder_ablation.py                    # one pass over the offline corpus (batch 128 x 128)
    python scripts/decoder_ablation.py --steps 600 --batch-size 32 --rows baseline,modern_adamw,untied

Rows: `baseline` is today's decoder (task=clm model=mha, at the modern recipe's sizes) with document masking,
`baseline_leaky` the same without it (the former default); `modern` is experiment=modern_decoder. Every other
row is the baseline plus one key of the modern recipe (add one in), so the baseline's val/bpb minus the row's is
that key's contribution (positive: the key helps). Add-one-in rather than leave-one-out: every leave-one-out row
but one would run Muon, and on a CPU without bf16 matmul units torch's Muon (whose Newton-Schulz runs in
bfloat16) costs ~0.5 s per hidden matrix and step, ~15 s a step for this model; add one in runs it twice.
Runs go one after another through `train.py` (a subprocess each, logger=csv) under --out; a finished run is read,
not rerun. Prints the table (final and best val/bpb, the contribution, whether the row is below the baseline at
every evaluation) and writes <out>/ablation.csv, <out>/ablation.md and <out>/ablation.png (the val/bpb curves).
Wall times are not compared, so other work may share the machine; the figures do not change.

`--steps one-pass` (the default) takes the number of steps that reads the train split once: repeated tokens
reward memorisation, not a better recipe. Evaluations run every steps // --evals steps, and "final" is the last
of them. Rows differing in document masking score slightly different targets
(with the mask, a document's first token is not predicted from the previous document): say so when reading them.
"""

import argparse
import math
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ethos.rundir import read_status_record  # noqa: E402

BASE = ["task=clm", "model=mha"]
ROWS = {
    "baseline": BASE,
    "baseline_leaky": [*BASE, "data.doc_mask=false"],
    "modern": ["experiment=modern_decoder"],
    "modern_lr5e-4": ["experiment=modern_decoder", "optim.lr=5e-4"],  # AdamW's part at the baseline's lr
    # add one in: the baseline plus one key of experiment=modern_decoder
    "lr3e-3": [*BASE, "optim.lr=3e-3"],  # the recipe's AdamW lr (all of the baseline's parameters)
    "no_reset_positions": [*BASE, "data.reset_positions=false"],
    "gqa": ["task=clm", "model=gqa", "model.attn.n_kv_heads=4"],
    "qk_norm": [*BASE, "model.attn.qk_norm=true"],
    "relu2": [*BASE, "model/ffn=relu2", "model.ffn.d_ff=1536"],
    "untied": [*BASE, "model.tie_embeddings=false"],
    "softcap": [*BASE, "model.logit_softcap=15"],
    "zero_init": [*BASE, "model.zero_init=true"],
    "wsd": [*BASE, "optim.schedule=wsd", "optim.warmup=0.05"],
    "muon": [*BASE, "optim=muon"],
    "modern_adamw": ["experiment=modern_decoder", "optim=adamw", "optim.schedule=wsd", "optim.warmup=0.05"],
}


def one_pass_steps(batch_size: int, seq_len: int) -> int:
    """Steps that read the offline corpus's train split once, from the data module itself (cached)."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from ethos.config import CONF_DIR, register_resolvers

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["task=clm", f"data.seq_len={seq_len}", "paths.output_dir=/nonexistent"])
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    return len(dm.splits["train"]) // batch_size


def curve(run: Path) -> list[tuple[int, float]]:
    import pandas as pd

    path = run / "csv" / "metrics.csv"
    if not path.exists():
        return []
    df = pd.read_csv(path)
    if "val/bpb" not in df:
        return []
    df = df.dropna(subset=["val/bpb"])
    return [(int(s), float(b)) for s, b in zip(df["step"], df["val/bpb"])]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--steps", default="one-pass", help="optimizer steps, or one-pass")
    p.add_argument("--evals", type=int, default=5, help="evaluations over the run (plus step 0)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", default="outputs/ablation/decoder")
    p.add_argument("--extra", nargs="*", default=[], help="overrides added to every row")
    args = p.parse_args(argv)
    steps = one_pass_steps(args.batch_size, args.seq_len) if args.steps == "one-pass" else int(args.steps)
    every = max(1, steps // args.evals)
    out = Path(args.out) / f"steps{steps}"
    names = args.rows.split(",")
    common = ["trainer=cpu", "logger=csv", f"trainer.max_steps={steps}", f"trainer.val_check_interval={every}",
              f"data.batch_size={args.batch_size}", f"data.seq_len={args.seq_len}", f"seed={args.seed}",
              "print_config=false", *args.extra]
    curves = {}
    for name in tqdm(names, desc=f"runs ({steps} steps of {args.batch_size} x {args.seq_len})"):
        run = out / name
        if (read_status_record(run) or {}).get("status") != "done":  # finished runs are read, not rerun
            cmd = [sys.executable, str(ROOT / "train.py"), *ROWS[name], *common, f"hydra.run.dir={run}", "resume=never"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"{name}: train.py failed ({r.returncode}):\n{r.stderr[-3000:]}")
        curves[name] = curve(run)
        report(curves, names[:len(curves)], steps, out)  # the table so far: a long ablation can be read as it goes


def report(curves: dict, names: list[str], steps: int, out: Path) -> None:
    rows = []
    base = dict(curves.get("baseline", []))
    base_final = curves["baseline"][-1][1] if curves.get("baseline") else math.nan
    for name in names:
        c = curves[name]
        final, best = c[-1][1], min(b for _, b in c)
        below = all(b < base[s] for s, b in c if s > 0 and s in base) if base and name != "baseline" else ""
        rows.append(dict(row=name, final_bpb=round(final, 4), best_bpb=round(best, 4),
                         contribution=round(base_final - final, 4) if name != "baseline" and base else "",
                         below_baseline_at_every_eval=below, overrides=" ".join(ROWS[name])))
    from ethos.bench import write_csv

    write_csv(rows, out / "ablation.csv")
    head = "| row | final val/bpb | best val/bpb | contribution (baseline − row) | below baseline at every eval |"
    lines = [f"val/bpb after {steps} steps", "", head, "|---|---|---|---|---|"]
    lines += [f"| {r['row']} | {r['final_bpb']} | {r['best_bpb']} | {r['contribution']} | "
              f"{r['below_baseline_at_every_eval']} |" for r in rows]
    text = "\n".join(lines)
    (out / "ablation.md").write_text(text + "\n")
    print(text)
    plot(curves, names, out / "ablation.png", steps)
    print(f"wrote {out / 'ablation.csv'}, {out / 'ablation.md'} and {out / 'ablation.png'}")


def plot(curves: dict, names: list[str], path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        c = [(s, b) for s, b in curves[name] if s > 0]
        style = dict(lw=2.5) if name in ("modern", "baseline") else dict(lw=1, alpha=0.8)
        ax.plot([s for s, _ in c], [b for _, b in c], marker="o", ms=3, label=name, **style)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("val/bpb")
    ax.set_title(f"decoder ablation, {steps} steps")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
