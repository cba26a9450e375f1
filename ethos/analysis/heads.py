"""Patterns and messages, head by head: what each attention head's W_QK^h and W_VO^h do, and how heads share them.

    python -m ethos.analysis.heads SOURCE --out DIR [--first N] [--top 20] [--circuit-vocab N] [--no-circuits]
                                        [--text "..."] [--dtype float64] [--ranges]

SOURCE: what the spectra tool reads (an ethos run dir / .ckpt, a local directory of safetensors in the HF layout,
a hub repo id), one layer at a time with the norms folded as it folds them (ethos/analysis/sources.py). The
matrices, their coordinates and the measures are in ethos/analysis/circuits.py and docs/design.md §11. DIR gets:

  heads.csv            per layer x head: ||W_QK^h||_F, σ1 and rank (and what the pattern covers under RoPE),
                       ||W_VO^h||_F, σ1 and rank, and the copying score of the head's OV circuit
  pattern_pairs.csv    per head the top (query token, key token) pairs of E W_QK^h Eᵀ   } where the model has an
  message_pairs.csv    per head the top (read token, written token) pairs of E W_VO^h U  } embedding; blockwise
  sharing.csv          per layer, side (read / write) and pair of heads (a < b): the mean cos² of the principal
                       angles between their message subspaces, whether they share a GQA group (or MLA's latent), and
                       what random subspaces would give; sharing_summary.csv: within vs across groups
  heads.json, meta.json, layers/layer_XXX.json (each layer's results: a run started again skips those it has)
  PNGs                 heatmaps of the per-head measures; the sharing matrices per layer
  with --text          attention.csv (first-token and previous-token mass per head), lens.csv (the logit lens:
                       nearest vocabulary tokens per layer and position), attention_layer_XXX.png, lens.png
"""

import argparse
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ethos.analysis import circuits
from ethos.analysis.sources import open_source, open_tokenizer
from ethos.analysis.store import start, write_csv
from ethos.errors import exits_on_config_error
from ethos.files import atomic_write

HEAD_COLUMNS = ["layer", "head", "group", "pattern_shape", "pattern_covers", "qk_fro", "qk_sigma1", "qk_rank",
                "message_shape", "vo_fro", "vo_sigma1", "vo_rank", "copying"]
PAIR_COLUMNS = ["layer", "head", "rank", "row_id", "row_token", "col_id", "col_token", "value"]
SHARING_COLUMNS = ["layer", "side", "coords", "head_a", "head_b", "same_group", "overlap", "chance"]
SUMMARY_COLUMNS = ["layer", "side", "within", "across", "chance"]


def layer_heads(src, layer: int, vocab: dict | None, top: int = 20, dtype=torch.float64) -> dict:
    """Every measure of one layer: {"heads", "pattern_pairs", "message_pairs", "sharing"} lists of rows."""
    w = src.read(layer, circuits.READ)
    H = w.n_heads
    group = w.kv_head if w.attention == "mha" else torch.zeros(H, dtype=torch.long)  # MLA: one shared latent
    pattern, message = circuits.pattern_factors(w), circuits.message_factors(w)
    s_qk = circuits.product_svdvals(*pattern, dtype)
    left, s_vo, right = circuits.product_svd(*message, dtype)
    p_shape = (pattern[0].shape[1], pattern[1].shape[1])
    m_shape = (message[0].shape[1], message[1].shape[1])
    r_qk, r_vo = circuits.numerical_rank(s_qk, p_shape), circuits.numerical_rank(s_vo, m_shape)
    copying = [None] * H
    out = {"pattern_pairs": [], "message_pairs": []}
    if vocab is not None:
        v_res, o_t = circuits.message_factors(w, residual=True)
        copying = circuits.copying_scores(v_res, o_t.mT, vocab["ue"], dtype).tolist()
        if vocab.get("circuits"):
            out["pattern_pairs"], out["message_pairs"] = token_circuits(w, vocab, top, layer)
    covers = circuits.covers(w, getattr(src, "rope_dims", None))
    out["heads"] = [{"layer": layer, "head": h, "group": int(group[h]), "pattern_shape": "x".join(map(str, p_shape)),
                     "pattern_covers": covers, "qk_fro": float(s_qk[h].norm()), "qk_sigma1": float(s_qk[h, 0]),
                     "qk_rank": int(r_qk[h]), "message_shape": "x".join(map(str, m_shape)),
                     "vo_fro": float(s_vo[h].norm()), "vo_sigma1": float(s_vo[h, 0]), "vo_rank": int(r_vo[h]),
                     "copying": copying[h]} for h in range(H)]
    out["sharing"] = []
    coords = {"read": "residual" if w.attention == "mha" else "kv latent", "write": "residual"}
    for side, bases in (("read", left), ("write", right)):
        overlap = circuits.subspace_overlap(bases, r_vo)
        n = bases.shape[1]
        for a in range(H):
            for b in range(a + 1, H):  # the overlap is symmetric: one row per pair
                out["sharing"].append({"layer": layer, "side": side, "coords": coords[side], "head_a": a,
                                       "head_b": b, "same_group": bool(group[a] == group[b]),
                                       "overlap": float(overlap[a, b]), "chance": float(max(r_vo[a], r_vo[b]) / n)})
    return out


def token_circuits(w, vocab: dict, top: int, layer: int) -> tuple[list, list]:
    """Top pairs of E W_QK^h Eᵀ and of E W_VO^h U per head, over the first `circuit_vocab` token ids."""
    e, u = vocab["e"], vocab["u"]
    qa, kb = circuits.pattern_factors(w, residual=True)
    va, ob = circuits.message_factors(w, residual=True)
    dtype = vocab["dtype"]
    pattern, message = [], []
    for h in range(w.n_heads):
        for rows, a, b in ((pattern, e @ qa[h].to(dtype), e @ kb[h].to(dtype)),
                           (message, e @ va[h].to(dtype), u.T @ ob[h].to(dtype))):
            values, r, c = circuits.top_pairs(a, b, top)
            rows += [{"layer": layer, "head": h, "rank": j, "row_id": int(r[j]), "row_token": vocab["decode"](r[j]),
                      "col_id": int(c[j]), "col_token": vocab["decode"](c[j]), "value": float(values[j])}
                     for j in range(len(values))]
    return pattern, message


def load_vocab(src, tokenizer, circuits_on: bool, circuit_vocab: int | None, dtype=torch.float64) -> dict | None:
    """The embedding side of the circuits: E, U (final norm folded), U E, and a token decoder."""
    got = src.vocab() if hasattr(src, "vocab") else None
    if got is None:
        return None
    e, u = got
    ue = circuits.unembed_embed(e, u, dtype)
    n = e.shape[0] if circuit_vocab is None else min(circuit_vocab, e.shape[0])

    def decode(i) -> str:
        return tokenizer.id_to_token(int(i)) if tokenizer is not None else ""

    return {"ue": ue, "e": e[:n].to(dtype), "u": u[:, :n].to(dtype), "decode": decode, "circuits": circuits_on,
            "dtype": dtype}


def summarise(sharing: list[dict]) -> list[dict]:
    """Per layer and side: the mean overlap of heads in one group, of heads in different groups, and chance."""
    out = []
    for key in sorted({(r["layer"], r["side"]) for r in sharing}):
        sel = [r for r in sharing if (r["layer"], r["side"]) == key]
        mean = lambda rows: sum(r["overlap"] for r in rows) / len(rows) if rows else None  # noqa: E731
        out.append({"layer": key[0], "side": key[1], "within": mean([r for r in sel if r["same_group"]]),
                    "across": mean([r for r in sel if not r["same_group"]]),
                    "chance": sum(r["chance"] for r in sel) / len(sel)})
    return out


def write_tables(out: Path, results: dict[int, dict]) -> dict[str, list]:
    tables = {k: [r for i in sorted(results) for r in results[i][k]]
              for k in ("heads", "pattern_pairs", "message_pairs", "sharing")}
    tables["sharing_summary"] = summarise(tables["sharing"])
    write_csv(out / "heads.csv", tables["heads"], HEAD_COLUMNS)
    write_csv(out / "pattern_pairs.csv", tables["pattern_pairs"], PAIR_COLUMNS)
    write_csv(out / "message_pairs.csv", tables["message_pairs"], PAIR_COLUMNS)
    write_csv(out / "sharing.csv", tables["sharing"], SHARING_COLUMNS)
    write_csv(out / "sharing_summary.csv", tables["sharing_summary"], SUMMARY_COLUMNS)
    atomic_write(out / "heads.json", json.dumps({"heads": tables["heads"],
                                                 "sharing_summary": tables["sharing_summary"]}))
    return tables


def analyse(source: str, out: str | Path, first: int | None = None, top: int = 20, circuit_vocab: int | None = None,
            token_circuits_on: bool = True, text: str | None = None, dtype=torch.float64,
            revision: str | None = None, ranges: bool = False, progress: bool = True,
            plots: bool = True) -> dict[str, list]:
    """Measure every layer of SOURCE (the first `first`), resuming from what `out` holds; returns the tables."""
    out = Path(out)
    src = open_source(source, revision, dtype=dtype, ranges=ranges)
    start(out, {"source": str(source), "description": src.description, "n_layers": src.n_layers}, "layers")
    layers = range(src.n_layers if first is None else min(first, src.n_layers))
    path = lambda i: out / "layers" / f"layer_{i:03d}.json"  # noqa: E731
    results = {i: json.loads(path(i).read_text()) for i in layers if path(i).is_file()}
    todo = [i for i in layers if i not in results]
    tokenizer = open_tokenizer(source, revision)
    vocab = load_vocab(src, tokenizer, token_circuits_on, circuit_vocab, dtype) if todo else None
    tables = None
    for i in tqdm(todo, desc="layers", unit="layer", disable=not progress, initial=len(results), total=len(layers)):
        results[i] = layer_heads(src, i, vocab, top, dtype)
        atomic_write(path(i), json.dumps(results[i]))
        tables = write_tables(out, results)
    if tables is None:  # every layer was there already
        tables = write_tables(out, results)
    if text is not None:
        from ethos.analysis import lens  # runs the model: only when asked to

        tables |= lens.analyse_text(src, tokenizer, text, out, plots=plots)
    if plots:
        from ethos.analysis import head_plots

        head_plots.plot_all(out, tables)
    return tables


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.analysis.heads", description=__doc__.splitlines()[0])
    p.add_argument("source", help="HF repo id, local directory of safetensors, or ethos run dir / .ckpt")
    p.add_argument("--out", required=True, help="output directory (a run on the same one resumes)")
    p.add_argument("--first", type=int, default=None, help="analyse only the first N layers")
    p.add_argument("--top", type=int, default=20, help="token pairs kept per head and circuit")
    p.add_argument("--circuit-vocab", type=int, default=None,
                   help="token circuits over the first N token ids only (V x V pairs cost V^2 d_h per head)")
    p.add_argument("--no-circuits", action="store_true", help="skip the token-level circuits (copying scores stay)")
    p.add_argument("--text", default=None, help="attention patterns and the logit lens on this text")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="compute dtype")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    p.add_argument("--ranges", action="store_true", help="hub: fetch only the tensors' bytes (HTTP range requests)")
    args = p.parse_args(argv)
    for key in ("first", "top", "circuit_vocab"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')}={value}: must be a positive integer")
    with exits_on_config_error():
        tables = analyse(args.source, args.out, args.first, args.top, args.circuit_vocab, not args.no_circuits,
                         args.text, getattr(torch, args.dtype), args.revision, args.ranges)
    print(f"{len(tables['heads'])} heads -> {Path(args.out) / 'heads.csv'}")


if __name__ == "__main__":
    main()
