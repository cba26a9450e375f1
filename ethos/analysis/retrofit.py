"""What a shared output subspace costs: the stacked W_O of every layer cut to rank r (MLA -> MLA-o).

    python -m ethos.analysis.retrofit SOURCE --ranks 64,128,256 --out DIR [--activation-aware] [--write 64]

Per layer, the truncated SVD of the stacked W_O (H*d_v x d) = U S V^T gives W_OA = U_r S_r (H*d_v -> r) and
W_OB = V_r^T (r -> d): the best rank-r W_O in the Frobenius norm (Eckart-Young), so the relative error is
sqrt(sum_{j>r} s_j^2 / sum s_j^2). It saves parameters while r (H*d_v + d) < H*d_v*d, i.e. below the break-even
rank H*d_v*d / (H*d_v + d) (DeepSeek-V3: 4986 of 7168).

Activation-aware (SVD-LLM; docs/design.md §4): with X the inputs of W_O (the concatenated head outputs) on
calibration batches, C = X^T X = L L^T, the SVD of L^T W truncated at r and mapped back with L^-T minimises
||X W - X W_r||_F instead of ||W - W_r||_F. It needs activations, so the model must run here: ethos runs only.

For an ethos MLA run, `--write r` writes an MLA-o run dir per rank and method (<out>/mla_o_r<r>[_aa]: its
self-describing checkpoint with the weights only, and the run's tokenizer) that continued pretraining
(`ckpt_path=<dir>/checkpoints/last.ckpt`, starting at step 0) or a fine-tune (`pretrained=<dir>`) loads, with
the model config `model=mla_o model.attn.o_latent=r` and the run's sizes. With `--eval`, the validation loss on
the run's own data is reported before and after, for each written rank and method.

Here: the command and its report. The factors: ethos/analysis/lowrank.py; the runs on the data (covariances,
validation loss): calibration.py; the MLA-o run dir: surgery.py.
"""

import argparse
import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ethos.analysis.calibration import covariances, run_data, take, val_loss
from ethos.analysis.ethos_runs import EthosSource
from ethos.analysis.lowrank import break_even, factor
from ethos.analysis.sources import is_ethos_run, open_source
from ethos.analysis.surgery import mla_o_task, out_projections, save_run
from ethos.errors import ConfigError
from ethos.models.attention import MLA
from ethos.pretrained import load_task
from ethos.rundir import checkpoint_path, run_dir_of


def retrofit(source: str, ranks: list[int], out: str | Path, activation_aware: bool = False,
             calib_batches: int = 8, write: list[int] = (), evaluate: bool = False, val_batches: int = 20) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    task = ckpt = run_dir = dm = covs = None
    if is_ethos_run(source):  # the task is loaded once: its weights are read, and it runs on its data
        task, ckpt = load_task(source)
        run_dir = run_dir_of(checkpoint_path(source))
        src = EthosSource(source, torch.float64, model=task.model)
    else:
        src = open_source(source, dtype=torch.float64)
    if (activation_aware or write or evaluate) and task is None:
        raise ConfigError(f"SOURCE={source}: --activation-aware, --write and --eval run the model on its data, "
                          "so they need an ethos run dir or .ckpt (a HF checkpoint gets the weight-error table)")
    if write and not out_projections(task.model):
        raise ConfigError(f"--write: {source} has no MLA / MHA output projection to factor")
    if write and not all(isinstance(b.attn, MLA) for b in src.blocks):
        kinds = sorted({type(b.attn).__name__ for b in src.blocks})
        raise ConfigError(f"--write: an MLA-o run comes from an MLA one; {source} has {', '.join(kinds)} layers")
    if activation_aware or evaluate:
        dm = run_data(task, ckpt, run_dir)
    if activation_aware:
        covs = covariances(task, take(dm.train_dataloader(), calib_batches))
    rows, factors = [], {}
    for layer in tqdm(range(src.n_layers), desc="layers", unit="layer", disable=None):
        w = src.read(layer, ("o",)).o
        H, d_v, d = w.shape
        w = w.reshape(H * d_v, d)
        if max([*ranks, *write]) > min(w.shape):
            raise ConfigError(f"--ranks / --write up to {max([*ranks, *write])}: layer {layer}'s stacked W_O is "
                              f"{H * d_v} x {d}, so its rank is at most {min(w.shape)}")
        methods = {"plain": None, **({"activation": covs[layer]} if covs else {})}
        for method, cov in methods.items():
            top = max([*ranks, *write])
            w_oa, w_ob = factor(w, top, cov)
            for r in ranks:
                w_r = w_oa[:, :r] @ w_ob[:r]
                row = {"layer": layer, "method": method, "rank": r, "rows": H * d_v, "cols": d,
                       "weight_rel_error": float((w.double() - w_r).norm() / w.double().norm()),
                       "params_w_o": H * d_v * d, "params_factored": r * (H * d_v + d),
                       "savings": 1 - r * (H * d_v + d) / (H * d_v * d),
                       "break_even_rank": break_even(H * d_v, d)}
                if covs:  # the output error ||X (W - W_r)|| / ||X W|| of these factors (C = X^T X)
                    delta = w.double() - w_r
                    row["output_rel_error"] = math.sqrt(float(torch.trace(delta.T @ covs[layer] @ delta)
                                                              / torch.trace(w.double().T @ covs[layer] @ w.double())))
                rows.append(row)
            for r in write:
                factors.setdefault((r, method), []).append((w_oa[:, :r], w_ob[:r]))
    report = {"source": source, "rows": rows, "written": [], "val_loss": {}}
    if write:
        if evaluate:
            val = take(dm.val_dataloader(), val_batches)
            report["val_loss"]["original"] = val_loss(task, val)
        for (r, method), fs in factors.items():
            new, record = mla_o_task(task, ckpt, r, fs)
            dest = out / f"mla_o_r{r}{'_aa' if method == 'activation' else ''}"
            report["written"].append(str(save_run(new, record, ckpt, run_dir, dest)))
            if evaluate:
                report["val_loss"][f"{method} r={r}"] = val_loss(new, val)
    write_report(out, report, ranks)
    return report


def write_report(out: Path, report: dict, ranks: list[int]) -> None:
    import pandas as pd  # half a second to import: only for the report

    df = pd.DataFrame(report["rows"])
    df.to_csv(out / "retrofit.csv", index=False)
    err = [c for c in ("weight_rel_error", "output_rel_error") if c in df]
    summary = df.groupby(["method", "rank"])[[*err, "savings"]].mean().reset_index()
    lines = [f"# Shared output subspace: {report['source']}", "",
             f"Break-even rank (W_OA + W_OB = W_O in parameters): {df['break_even_rank'].iloc[0]:.0f}", "",
             "| method | rank | " + " | ".join(f"mean {c}" for c in err) + " | parameter savings |",
             "|---|---|" + "---|" * len(err) + "---|"]
    for _, r in summary.iterrows():
        lines.append(f"| {r['method']} | {r['rank']} | " + " | ".join(f"{r[c]:.4f}" for c in err)
                     + f" | {r['savings']:.1%} |")
    if report["val_loss"]:
        lines += ["", "| weights | validation loss |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in report["val_loss"].items()]
    (out / "retrofit.md").write_text("\n".join(lines) + "\n")
    (out / "retrofit.json").write_text(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=2))
    plot(df, out / "retrofit.png")


def plot(df, path: Path) -> None:
    import matplotlib  # half a second to import: only for the report

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for (method, layer), g in df.groupby(["method", "layer"]):
        a.plot(g["rank"], g["weight_rel_error"], marker="o", alpha=0.6,
               ls="-" if method == "plain" else "--", label=f"L{layer} {method}")
        if "output_rel_error" in g and g["output_rel_error"].notna().any():
            b.plot(g["rank"], g["output_rel_error"], marker="o", alpha=0.6,
                   ls="-" if method == "plain" else "--", label=f"L{layer} {method}")
    a.set(xlabel="rank r", ylabel="||W - W_r|| / ||W||", title="weight error of the stacked W_O")
    b.set(xlabel="rank r", ylabel="||X(W - W_r)|| / ||XW||", title="output error (calibration data)")
    be = df["break_even_rank"].iloc[0]
    for ax in (a, b):
        ax.axvline(be, color="k", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    a.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.analysis.retrofit", description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="an ethos run dir / .ckpt, a directory of safetensors, or a HF repo id")
    p.add_argument("--ranks", required=True, help="comma-separated ranks, e.g. 64,128,256")
    p.add_argument("--out", required=True)
    p.add_argument("--activation-aware", action="store_true", help="also truncate in the whitened basis")
    p.add_argument("--calib-batches", type=int, default=8)
    p.add_argument("--write", default="", help="ranks to write as MLA-o run dirs (ethos MLA runs)")
    p.add_argument("--eval", action="store_true", help="validation loss before and after (with --write)")
    p.add_argument("--val-batches", type=int, default=20)
    a = p.parse_args(argv)
    try:
        ranks = sorted({int(r) for r in a.ranks.split(",") if r})
        write = sorted({int(r) for r in a.write.split(",") if r})
        if not ranks or min(ranks + write) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--ranks={a.ranks} --write={a.write}: comma-separated positive integers")
    try:
        report = retrofit(a.source, ranks, a.out, a.activation_aware, a.calib_batches, write, a.eval, a.val_batches)
    except ConfigError as e:
        p.exit(2, f"ethos: {e}\n")
    print((Path(a.out) / "retrofit.md").read_text())
    for path in report["written"]:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
