"""How a fine-tune changed each attention head: the update of its pattern and message matrices,

    ΔW_QK^h = (W_Q^h + ΔW_Q^h)(W_K^h + ΔW_K^h)ᵀ - W_Q^h W_K^hᵀ,   ΔW_VO^h likewise,

    python -m ethos.analysis.lora RUN --out DIR [--base SOURCE] [--dtype float64]

RUN: an ethos LoRA fine-tune (task.lora.r > 0), read as its adapters merged (in float64) against the weights they
were added to; or, with --base, any checkpoint against another of the same layout (a full fine-tune against the
run it started from, an ethos run or HF checkpoints alike: ethos/analysis/sources.py reads them). Every head is
read in residual coordinates (ethos/analysis/circuits.py), so an update of MLA's down-projections shows in every
head that reads them. Per layer, head and matrix (qk, vo), in updates.csv / updates.json:

    delta_fro, delta_sigma1   ||ΔW||_F and its σ1, from the factors [A', A] [B', -B]ᵀ (never the d x d matrix)
    rel                       ||ΔW||_F / ||W||_F: the update against the head's own matrix
    rank                      numerical rank of ΔW (above max(m, n) eps σ1(W))
    in_col, in_row            the share of ||ΔW||_F² inside the column / row space of the head's own W
    in_subspace               the share inside both (U_Wᵀ ΔW V_W): an update that only re-weighs what the head
                              already reads and writes gives 1, one into new directions less

ranked.csv lists the heads by rel (which heads and layers moved most); updates.png is a layers x heads heatmap of
rel for both matrices, layers.png the update per layer.
"""

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ethos.analysis import circuits
from ethos.analysis.spectra import r_factor
from ethos.analysis.store import write_csv
from ethos.errors import ConfigError, exits_on_config_error
from ethos.files import atomic_write

COLUMNS = ["layer", "head", "kind", "delta_fro", "delta_sigma1", "base_fro", "rel", "rank", "in_col", "in_row",
           "in_subspace"]


def update_measures(before: tuple[Tensor, Tensor], after: tuple[Tensor, Tensor], dtype=torch.float64) -> dict:
    """Per head (tensors (H,)): the measures of ΔW = A' B'ᵀ - A Bᵀ from the factors before (A, B) and after."""
    (a, b), (a2, b2) = [(x.to(dtype), y.to(dtype)) for x, y in (before, after)]
    f, g = torch.cat([a2, a], -1), torch.cat([b2, -b], -1)  # ΔW = f gᵀ
    rf, rg = r_factor(f, dtype), r_factor(g, dtype)             # svdvals(f gᵀ) = svdvals(R_f R_gᵀ)
    s_delta = torch.linalg.svdvals(rf @ rg.mT)
    left, s_base, right = circuits.product_svd(a, b, dtype)
    shape = (a.shape[1], b.shape[1])
    r = circuits.numerical_rank(s_base, shape)
    rank = circuits.numerical_rank(s_delta, shape, sigma_1=s_base[:, :1])
    keep = (torch.arange(left.shape[-1]) < r[:, None])[:, None, :]  # the head's own subspaces: its rank r
    u, v = left * keep, right * keep
    x, y = u.mT @ f, v.mT @ g                                       # (H, k, 2 d_k): ΔW's factors seen from them
    total = s_delta.pow(2).sum(-1)
    share = lambda m: m.pow(2).sum((-1, -2)) / total.clamp_min(torch.finfo(dtype).tiny)  # noqa: E731
    return {"delta_fro": total.sqrt(), "delta_sigma1": s_delta[:, 0], "base_fro": s_base.norm(dim=-1),
            "rel": total.sqrt() / s_base.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny), "rank": rank,
            "in_col": share(x @ rg.mT), "in_row": share(rf @ y.mT), "in_subspace": share(x @ y.mT)}


def layer_updates(before, after, layer: int, dtype=torch.float64) -> list[dict]:
    wb, wa = before.read(layer, circuits.READ), after.read(layer, circuits.READ)
    for part in ("q", "k", "v", "o"):
        if getattr(wb, part).shape != getattr(wa, part).shape:
            raise ConfigError(f"--base: layer {layer}'s {part} is {tuple(getattr(wb, part).shape)} there and "
                              f"{tuple(getattr(wa, part).shape)} in RUN: not the same model")
    rows = []
    for kind, factors in (("qk", circuits.pattern_factors), ("vo", circuits.message_factors)):
        m = update_measures(factors(wb, residual=True), factors(wa, residual=True), dtype)
        rows += [{"layer": layer, "head": h, "kind": kind, **{k: v[h].item() for k, v in m.items()}}
                 for h in range(wb.n_heads)]
    return rows


def open_pair(run: str, base: str | None, dtype=torch.float64):
    """(before, after) weight sources: a LoRA run's base and merged backbones, or --base and RUN."""
    from ethos.analysis.sources import is_ethos_run, open_source

    if base is not None:
        return open_source(base, dtype=dtype), open_source(run, dtype=dtype)
    if not is_ethos_run(run):
        raise ConfigError(f"RUN={run}: not an ethos run dir or .ckpt; to compare two checkpoints pass --base")
    from ethos.analysis.ethos_runs import EthosSource
    from ethos.models import lora
    from ethos.pretrained import load_task

    model = load_task(run)[0].model
    if not lora.is_lora(model):
        raise ConfigError(f"RUN={run}: not a LoRA fine-tune (task.lora.r was 0); for a full fine-tune pass --base "
                          "<the run it started from>")
    return (EthosSource(run, dtype, model=lora.base(model)), EthosSource(run, dtype, model=lora.merged(model, dtype)))


def analyse(run: str, out: str | Path, base: str | None = None, dtype=torch.float64, progress: bool = True,
            plots: bool = True) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    before, after = open_pair(run, base, dtype)
    if before.n_layers != after.n_layers:
        raise ConfigError(f"--base: {before.n_layers} layers there, {after.n_layers} in RUN: not the same model")
    rows = []
    for i in tqdm(range(after.n_layers), desc="layers", unit="layer", disable=not progress):
        rows += layer_updates(before, after, i, dtype)
    write_csv(out / "updates.csv", rows, COLUMNS)
    write_csv(out / "ranked.csv", sorted(rows, key=lambda r: -r["rel"]), COLUMNS)
    atomic_write(out / "updates.json", json.dumps({"run": str(run), "base": base, "rows": rows}))
    if plots:
        plot(out, rows)
    return rows


def plot(out: Path, rows: list[dict]) -> None:
    import numpy as np

    from ethos.analysis.plots import axes_grid, pyplot

    plt = pyplot()
    layers = sorted({r["layer"] for r in rows})
    heads = max(r["head"] for r in rows) + 1
    fig, axes = axes_grid(plt, 2, size=(max(4.0, 1.5 + 0.15 * heads), max(3.0, 1.5 + 0.2 * len(layers))))
    for ax, kind in zip(axes, ("qk", "vo")):
        grid = np.full((len(layers), heads), np.nan)
        for r in rows:
            if r["kind"] == kind:
                grid[layers.index(r["layer"]), r["head"]] = r["rel"]
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_title(f"||ΔW_{kind.upper()}^h||_F / ||W_{kind.upper()}^h||_F", fontsize=9)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "updates.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3))
    for kind in ("qk", "vo"):
        ax.plot(layers, [sum(r["delta_fro"] ** 2 for r in rows if r["layer"] == i and r["kind"] == kind) ** 0.5
                         for i in layers], marker="o", label=f"ΔW_{kind.upper()}")
    ax.set_xlabel("layer")
    ax.set_ylabel("||ΔW||_F over the layer's heads")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "layers.png", dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.analysis.lora", description=__doc__.splitlines()[0])
    p.add_argument("run", help="an ethos LoRA fine-tune run dir / .ckpt, or with --base any checkpoint")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--base", default=None, help="the checkpoint RUN started from (a full fine-tune)")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="compute dtype")
    args = p.parse_args(argv)
    with exits_on_config_error():
        rows = analyse(args.run, args.out, args.base, getattr(torch, args.dtype))
    top = max(rows, key=lambda r: r["rel"])
    print(f"{len(rows)} rows -> {Path(args.out) / 'updates.csv'}; moved most: layer {top['layer']} head "
          f"{top['head']} {top['kind']} (rel {top['rel']:.3g})")


if __name__ == "__main__":
    main()
