"""val_curves.png: the validation loss of every run, one colour per group. The legend (below the axes) names each
group by what differs between groups; the caption (above the axes) says what every run shares. The figure grows to
hold both."""

import textwrap
from pathlib import Path

from ethos.results.table import metrics, shared_overrides

WIDTH = 8.0  # inches
FONT = 8  # points, legend and caption
CHARS = int((WIDTH - 1) * 72 / (FONT * 0.62))  # characters of text at FONT across the axes (1 inch: the y label)
LINE = FONT * 1.45 / 72  # inches per line of text


def val_curves(df, root: Path):
    """The figure (a matplotlib Figure, drawn on the Agg canvas)."""
    from matplotlib import colormaps  # heavy: only when a figure is made
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted(df["group"].astype(str).unique())
    labels = {g: textwrap.fill(g, CHARS - 8, break_on_hyphens=False) for g in groups}  # 8: the line sample
    widest = max((len(line) for label in labels.values() for line in label.splitlines()), default=0)
    ncol = max(1, min(len(groups), CHARS // (widest + 8)))
    legend_lines = sum(max(labels[g].count("\n") + 1 for g in groups[i:i + ncol]) for i in range(0, len(groups), ncol))
    shared = shared_overrides(df)
    caption = textwrap.fill("every run: " + " ".join(shared), CHARS, break_on_hyphens=False) if shared else ""
    caption_lines = caption.count("\n") + 1 if caption else 0
    fig = Figure(figsize=(WIDTH, 4.2 + LINE * (legend_lines + caption_lines) + 0.3 * bool(groups)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = {g: colormaps["tab10"](i % 10) for i, g in enumerate(groups)}
    labelled = set()
    for _, row in df.iterrows():
        m = metrics(root / row["run"]) if row["status"] != "unreadable" else None
        if m is None or "val/loss" not in m:
            continue
        val = m[["step", "val/loss"]].dropna()
        group = str(row["group"])
        ax.plot(val["step"], val["val/loss"], color=colours[group], alpha=0.8,
                linestyle="-" if row["status"] == "done" else ":", marker=".",
                label=None if group in labelled else labels[group])
        labelled.add(group)
    ax.set_xlabel("step")
    ax.set_ylabel("val/loss")
    fig.suptitle("validation loss per run (dotted: not finished)")
    ax.set_title(caption, fontsize=FONT, loc="left", color="0.3")
    if labelled:
        fig.legend(loc="outside lower center", ncols=min(ncol, len(labelled)), fontsize=FONT, frameon=False)
    return fig


def plot_curves(df, root: Path, path: Path) -> None:
    val_curves(df, root).savefig(path, dpi=120)
