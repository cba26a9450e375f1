"""PNG plots of the heads tool (ethos.analysis.heads): layers x heads heatmaps of the per-head measures, the
message-sharing matrices of each layer, and with --text the attention patterns and the logit lens."""

from pathlib import Path

import numpy as np

from ethos.analysis.plots import axes_grid, pyplot

MEASURES = {"qk_fro": "||W_QK^h||_F", "vo_fro": "||W_VO^h||_F", "copying": "copying score (OV through E, U)"}


def heatmaps(out: Path, heads: list[dict]) -> None:
    plt = pyplot()
    layers = sorted({r["layer"] for r in heads})
    n_heads = max(r["head"] for r in heads) + 1
    keys = [k for k in MEASURES if any(r[k] is not None for r in heads)]
    fig, axes = axes_grid(plt, len(keys), size=(max(4.0, 1.5 + 0.12 * n_heads), max(3.0, 1.5 + 0.12 * len(layers))))
    for ax, key in zip(axes, keys):
        grid = np.full((len(layers), n_heads), np.nan)
        for r in heads:
            if r[key] is not None:
                grid[layers.index(r["layer"]), r["head"]] = r[key]
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="RdBu_r" if key == "copying" else "viridis",
                       **({"vmin": -1, "vmax": 1} if key == "copying" else {}))
        ax.set_yticks(range(len(layers)), [str(i) for i in layers], fontsize=6)
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
        ax.set_title(MEASURES[key], fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "heads.png", dpi=110)
    plt.close(fig)


def sharing(out: Path, rows: list[dict]) -> None:
    """Per layer, the head x head overlap of the message subspaces, read side and write side."""
    plt = pyplot()
    for layer in sorted({r["layer"] for r in rows}):
        sel = [r for r in rows if r["layer"] == layer]
        n = max(max(r["head_a"], r["head_b"]) for r in sel) + 1
        fig, axes = axes_grid(plt, 2, size=(4.2, 3.6))
        for ax, side in zip(axes, ("read", "write")):
            grid = np.eye(n)
            for r in sel:
                if r["side"] == side:
                    grid[r["head_a"], r["head_b"]] = grid[r["head_b"], r["head_a"]] = r["overlap"]
            coords = next((r["coords"] for r in sel if r["side"] == side), "")
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="magma", interpolation="nearest")
            ax.set_title(f"{side} subspaces ({coords}): mean cos²", fontsize=8)
            ax.set_xlabel("head")
            ax.set_ylabel("head")
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"layer {layer}: message sharing", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"sharing_layer_{layer:03d}.png", dpi=110)
        plt.close(fig)


def plot_all(out: Path, tables: dict) -> None:
    if tables.get("heads"):
        heatmaps(out, tables["heads"])
    if tables.get("sharing"):
        sharing(out, tables["sharing"])


def plot_text(out: Path, attn: list, tokens: list[str], lens: list[dict]) -> None:
    """attention_layer_XXX.png (every head's weights on the text) and lens.png (the logit lens's top token per
    layer and position, coloured by its probability)."""
    plt = pyplot()
    T = len(tokens)
    labels = tokens if T <= 48 else None
    for layer, p in enumerate(attn):
        fig, axes = axes_grid(plt, p.shape[0], size=(3.2, 3.0))
        for h, ax in enumerate(axes[:p.shape[0]]):
            ax.imshow(p[h].numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h}", fontsize=8)
            if labels:
                ax.set_xticks(range(T), labels, rotation=90, fontsize=5)
                ax.set_yticks(range(T), labels, fontsize=5)
        fig.suptitle(f"layer {layer}: attention weights (query rows, key columns)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"attention_layer_{layer:03d}.png", dpi=110)
        plt.close(fig)
    layers = sorted({r["layer"] for r in lens})
    grid = np.zeros((len(layers), T))
    fig, ax = plt.subplots(figsize=(min(24, 2 + 0.9 * T), 1.5 + 0.4 * len(layers)))
    for r in lens:
        grid[layers.index(r["layer"]), r["position"]] = r["top1_prob"]
        if T <= 48:
            ax.text(r["position"], layers.index(r["layer"]), r["top1_token"][:8], ha="center", va="center", fontsize=6)
    im = ax.imshow(grid, aspect="auto", cmap="YlGn", vmin=0, vmax=1, interpolation="nearest", origin="lower")
    ax.set_yticks(range(len(layers)), ["emb" if i == 0 else str(i) for i in layers], fontsize=7)
    if labels:
        ax.set_xticks(range(T), labels, rotation=90, fontsize=7)
    ax.set_ylabel("residual stream after layer")
    ax.set_title("logit lens: top token and its probability", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out / "lens.png", dpi=110)
    plt.close(fig)
