"""Singular-value spectra and effective ranks of every attention matrix of a checkpoint, layer by layer.

    python -m ethos.analysis.spectra SOURCE --out DIR [--layers 0,30,60] [--first N] [--dtype float64] [--ranges]

SOURCE: a HF repo id (only the shards holding attention tensors are downloaded; with --ranges only the attention
tensors' bytes), a local directory of
safetensors in the HF layout, or an ethos run dir / .ckpt (ethos/analysis/sources.py reads them all into
one layout). Per layer and, where it has heads, per head (docs/design.md §4):

    o_head  W_O_h (d_v x d)          o    stacked W_O (H d_v x d)
    qk      W_QK_h = W_q_h W_k_g^T   (MLA: nope part, in latent coordinates, r_q x r_kv; MHA/GQA, and our MLA
                                      with partial RoPE: the whole head, i.e. the form at relative position 0)
    vo      W_VO_h = W_v_g W_O_h     (MLA: r_kv x d; MHA/GQA: d x d)
    qa, kva, kr                      the MLA down-projections and the shared rope key head

Fused products are never formed: svdvals(A B^T) = svdvals(R_A R_B^T) with thin QR factors A = Q_A R_A,
B = Q_B R_B, batched over heads; it is exact and reports the min(m, n, k) singular values the product can
have (the rest are exactly 0). Whole matrices go through the eigenvalues of the Gram matrix of their smaller
side, accumulated in --dtype a few rows at a time. Measures: effective rank at tau (smallest r with
sum_{j<=r} s_j^2 / sum s_j^2 >= tau) for tau = 0.99, 0.999; stable rank ||W||_F^2 / s_1^2; s_1.

DIR (its layout: ethos/analysis/store.py) gets svals/layer_XXX.npz (the singular values; `shape_<kind>` holds
each matrix's shape), spectra.csv and spectra.json (one row per layer x kind x head; head is empty for whole
matrices), meta.json, and at the end erank.png, heatmap_<kind>.png and spectra_layer_<i>.png. The npz and the
tables are written after every layer; a run started again on the same DIR skips the layers it already has.
"""

import argparse
import ctypes
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ethos.analysis.plots import plot_all
from ethos.analysis.sources import open_source
from ethos.analysis.store import TAUS, layer_path, load_layer, save_layer, start, write_tables
from ethos.analysis.weights import AttentionWeights
from ethos.errors import exits_on_config_error

# what layer_spectra reads of a layer, in this order: W_O first, measured and let go before the rest is read
READS = (("o",), ("q", "k", "v", "qa", "kva", "kr"))


def effective_rank(s: Tensor, tau: float) -> Tensor:
    """Smallest r with sum_{j<=r} s_j^2 / sum_j s_j^2 >= tau, over the last dim of descending s (0 for W = 0)."""
    e = s.double() ** 2
    total = e.sum(-1, keepdim=True)
    r = (e.cumsum(-1) < tau * total).sum(-1) + 1
    return torch.where(total[..., 0] > 0, r.clamp(max=s.shape[-1]), 0)


def stable_rank(s: Tensor) -> Tensor:
    s = s.double()
    return (s ** 2).sum(-1) / (s[..., 0] ** 2).clamp_min(torch.finfo(torch.float64).tiny)


def r_factor(x: Tensor, dtype: torch.dtype, max_elems: int = 1 << 20) -> Tensor:
    """R of the thin QR of each matrix of a batch (B, m, k) -> (B, min(m, k), k), a few matrices at a time: a
    `dtype` copy of the whole batch would double the layer's memory."""
    step = max(1, max_elems // max(1, x.shape[1] * x.shape[2]))
    # R is a view into the whole (m x k) factorisation: clone it, or every chunk's workspace stays alive
    return torch.cat([torch.linalg.qr(x[i:i + step].to(dtype), mode="r").R.clone() for i in range(0, len(x), step)])


def gram(w: Tensor, dtype: torch.dtype, max_elems: int = 1 << 20, block: int = 1024) -> Tensor:
    """The lower triangle (all `gram_svdvals` reads) of the Gram matrix of the smaller side of a 2-D matrix (any
    strides), accumulated in `dtype` over slices of the larger side: never a `dtype` copy of the whole matrix, and
    one product per block of rows against the columns up to its diagonal, about half the multiply-adds."""
    if w.shape[0] < w.shape[1]:
        w = w.T
    m, n = w.shape
    g = torch.zeros(n, n, dtype=dtype)
    step = max(1, max_elems // n)
    for i in range(0, m, step):
        x = w[i:i + step].to(dtype)
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            g[lo:hi, :hi].addmm_(x[:, lo:hi].T, x[:, :hi])
    return g


def gram_svdvals(g: Tensor) -> Tensor:
    """Singular values (descending) of the matrix whose Gram matrix has lower triangle g."""
    return torch.linalg.eigvalsh(g, UPLO="L").flip(-1).clamp_min(0).sqrt()


def release_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them after the many mid-sized temporaries of QR and
    GEMM): without it they stay resident beside the next stage's tensors."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def layer_spectra(source, layer: int, dtype: torch.dtype = torch.float64) -> tuple[dict, dict]:
    """({kind: singular values}, {kind: (rows, cols)}) of one layer: per-head kinds (H, k), whole ones (k,).
    W_O is read and measured first and let go before the rest is read, so peak memory is the larger stage."""
    svals, shapes = {}, {}
    w: AttentionWeights = source.read(layer, READS[0])
    H, d_v, d = w.o.shape
    r_o = r_factor(w.o.transpose(1, 2), dtype)  # W_O_h^T = Q R: svdvals(W_O_h) = svdvals(R), and R serves W_VO_h
    svals["o_head"], shapes["o_head"] = torch.linalg.svdvals(r_o), (d_v, d)
    release_memory()
    g = gram(w.o.reshape(H * d_v, d), dtype)
    del w  # W_O goes before the eigensolver copies the Gram matrix: peak is W_O + Gram or 2 Gram, not the sum
    release_memory()
    svals["o"], shapes["o"] = gram_svdvals(g), (H * d_v, d)
    del g
    release_memory()
    w = source.read(layer, READS[1])
    kv, d_k = w.kv_head, w.k.shape[-1]
    r_q, r_k = r_factor(w.q[..., :d_k], dtype), r_factor(w.k, dtype)
    svals["qk"], shapes["qk"] = torch.linalg.svdvals(r_q @ r_k[kv].mT), (w.q.shape[1], w.k.shape[1])
    r_v = r_factor(w.v, dtype)
    svals["vo"], shapes["vo"] = torch.linalg.svdvals(r_v[kv] @ r_o.mT), (w.v.shape[1], d)
    for kind in ("qa", "kva", "kr"):
        m = getattr(w, kind)
        if m is not None:
            svals[kind], shapes[kind] = gram_svdvals(gram(m, dtype)), tuple(m.shape)
    return svals, shapes


def rows_of(layer: int, svals: dict, shapes: dict) -> list[dict]:
    rows = []
    for kind, s in svals.items():
        s = torch.as_tensor(s)
        per_head = s.ndim == 2
        s2 = s if per_head else s[None]
        er = {t: effective_rank(s2, t) for t in TAUS}
        sr = stable_rank(s2)
        for h in range(len(s2)):
            rows.append({"layer": layer, "kind": kind, "head": h if per_head else None,
                         "rows": int(shapes[kind][0]), "cols": int(shapes[kind][1]), "n_sv": s2.shape[-1],
                         "sigma_1": float(s2[h, 0]), "stable_rank": float(sr[h]),
                         **{f"erank_{t}": int(er[t][h]) for t in TAUS}})
    return rows


def analyse(source: str, out: str | Path, plot_layers: list[int] | None = None, first: int | None = None,
            dtype: torch.dtype = torch.float64, revision: str | None = None, progress: bool = True,
            plots: bool = True, ranges: bool = False) -> list[dict]:
    """Measure every layer of SOURCE (the first `first`), resuming from what `out` holds; returns the rows."""
    out = Path(out)
    src = open_source(source, revision, ranges=ranges)
    start(out, {"source": str(source), "description": src.description, "n_layers": src.n_layers})
    layers = range(src.n_layers if first is None else min(first, src.n_layers))
    rows, todo = [], []
    for i in layers:
        path = layer_path(out, i)
        if path.is_file():
            rows += rows_of(i, *load_layer(path))
        else:
            todo.append(i)
    for i in tqdm(todo, desc="layers", unit="layer", disable=not progress, initial=len(layers) - len(todo),
                  total=len(layers)):
        svals, shapes = layer_spectra(src, i, dtype)
        save_layer(out, i, svals, shapes)
        rows += rows_of(i, svals, shapes)
        write_tables(out, rows)
    write_tables(out, rows)
    if not plots:
        return rows
    if plot_layers is None:
        plot_layers = sorted({layers[0], layers[len(layers) // 2], layers[-1]}) if len(layers) else []
    plot_all(out, rows, [i for i in plot_layers if i in layers])
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.analysis.spectra", description=__doc__.splitlines()[0])
    p.add_argument("source", help="HF repo id, local directory of safetensors, or ethos run dir / .ckpt")
    p.add_argument("--out", required=True, help="output directory (a run on the same one resumes)")
    p.add_argument("--layers", default=None, help="layers whose spectra are plotted, e.g. 0,30,60 "
                                                  "(default: first, middle, last)")
    p.add_argument("--first", type=int, default=None, help="analyse only the first N layers")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="compute dtype")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--ranges", action="store_true", help="hub: fetch only the attention tensors' bytes (HTTP range "
                                                         "requests), not the whole shards that hold them")
    args = p.parse_args(argv)
    try:
        plot_layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    except ValueError:
        p.error(f"--layers={args.layers}: expected comma-separated layer indices, e.g. 0,30,60")
    with exits_on_config_error():
        rows = analyse(args.source, args.out, plot_layers, args.first, getattr(torch, args.dtype), args.revision,
                       ranges=args.ranges)
    print(f"{len(rows)} rows -> {Path(args.out) / 'spectra.csv'}")


if __name__ == "__main__":
    main()
