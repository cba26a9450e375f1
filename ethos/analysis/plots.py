"""PNG plots of a spectra store (ethos.analysis.store, written by ethos.analysis.spectra): effective rank vs layer
per kind, a layers x heads heatmap per per-head kind, the spectra of chosen layers."""

from pathlib import Path

import numpy as np

from ethos.analysis.store import HEAD_KINDS, TAUS, layer_path, load_layer

TITLES = {"o_head": "W_O per head", "o": "W_O stacked", "qk": "W_QK per head", "vo": "W_VO per head",
          "qa": "W_qa", "kva": "W_kva", "kr": "W_kr (rope key)"}


def pyplot():
    import matplotlib  # half a second to import: only when plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def axes_grid(plt, n: int, size=(4.0, 3.0)):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(size[0] * cols, size[1] * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def plot_erank(out: Path, rows: list[dict]) -> None:
    """Effective rank vs layer, one panel per kind: per-head kinds as the median over heads with a min-max band."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator  # matplotlib: only when plotting (see pyplot)

    kinds = [k for k in TITLES if any(r["kind"] == k for r in rows)]
    fig, axes = axes_grid(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        sel = [r for r in rows if r["kind"] == kind]
        layers = sorted({r["layer"] for r in sel})
        for tau, style in zip(TAUS, ("--", "-")):
            per = [np.array([r[f"erank_{tau}"] for r in sel if r["layer"] == i]) for i in layers]
            med = [np.median(v) for v in per]
            line, = ax.plot(layers, med, style, marker=".", label=f"tau {tau}")
            if kind in HEAD_KINDS:
                ax.fill_between(layers, [v.min() for v in per], [v.max() for v in per], alpha=0.15,
                                color=line.get_color())
        ax.set_title(f"{TITLES[kind]} (of {sel[0]['n_sv']})", fontsize=9)
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("effective rank" + (" (median, min-max)" if kind in HEAD_KINDS else ""), fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "erank.png", dpi=110)
    plt.close(fig)


def plot_heatmaps(out: Path, rows: list[dict], tau: float = TAUS[-1]) -> None:
    plt = pyplot()
    for kind in HEAD_KINDS:
        sel = [r for r in rows if r["kind"] == kind]
        if not sel:
            continue
        layers = sorted({r["layer"] for r in sel})
        heads = max(r["head"] for r in sel) + 1
        grid = np.full((len(layers), heads), np.nan)
        for r in sel:
            grid[layers.index(r["layer"]), r["head"]] = r[f"erank_{tau}"]
        fig, ax = plt.subplots(figsize=(min(14, max(5.5, 3 + heads * 0.08)), min(12, max(3, 2 + len(layers) * 0.15))))
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(f"{TITLES[kind]}: effective rank at tau {tau} (of {sel[0]['n_sv']})", fontsize=9)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"heatmap_{kind}.png", dpi=110)
        plt.close(fig)


def plot_spectra(out: Path, layer: int) -> None:
    """Normalised spectra s_j / s_1 of one layer, one panel per kind (every head a thin line)."""
    plt = pyplot()
    svals, _ = load_layer(layer_path(out, layer))
    kinds = [k for k in TITLES if k in svals]
    fig, axes = axes_grid(plt, len(kinds))
    for ax, kind in zip(axes, kinds):
        s = svals[kind].double()
        s = s if s.ndim == 2 else s[None]
        for row in s:
            ax.semilogy((row / row[0].clamp_min(1e-300)).numpy(), lw=0.6, alpha=0.5 if len(s) > 1 else 1)
        ax.set_title(TITLES[kind], fontsize=9)
        ax.set_xlabel("index j")
        ax.set_ylabel("s_j / s_1", fontsize=8)
    fig.suptitle(f"layer {layer}")
    fig.tight_layout()
    fig.savefig(out / f"spectra_layer_{layer}.png", dpi=110)
    plt.close(fig)


def plot_all(out: Path, rows: list[dict], layers: list[int]) -> None:
    if not rows:
        return
    plot_erank(out, rows)
    plot_heatmaps(out, rows)
    for i in layers:
        plot_spectra(out, i)
