"""Probes of prompt encoding (docs/design.md §12): how much a model's reading of a prompt helps, what the reading
holds, and whether a decoder's prompt positions carry next-token "garbage".

    python -m ethos.analysis.prompts RUN [RUN ...] --out DIR [--docs 256] [--split 0.5] [--labels docstrings]

Every model reads a prompt the way its objective trained it to (`Reader`): a causal LM causally after its start
token; a prefix-LM (and the mixture, in its prefix mode with its mode token) bidirectionally as a prefix; an
encoder–decoder with its encoder. Documents come from the run's own validation split, each cut at `split` of its
tokens into a prompt and a continuation.

- prompt help (`help_bpb`): the continuation's bits per byte without its prompt minus with it (positive: the prompt
  helps). Without means the start (or mode) token alone: an empty prefix, an encoder that reads one token. Scored
  are the continuation tokens from its second on, each predicted at a continuation position, so a model that
  ignores its prompt scores exactly 0 (the first one is predicted from the prompt's last position, or from the
  start token, which differ even then).
- linear probe (`probe_acc`): logistic regression (scikit-learn) of a labelled property from the prompt's final
  state (the last real token's, or with `--pool mean` the mean), trained on the labelled set's train split, scored
  on its validation split: the kind of object a standard-library docstring documents (offline), or SST-2 with
  `--labels sst2` (`--labels-path` a local copy of the hub's nyu-mll/glue).
- the "garbage" claim (lens.csv): per layer, at prompt positions (those whose next token is in the prompt) and at
  continuation positions, the logit lens's next-token entropy and accuracy (nostalgebraist 2020: the residual put
  through the final norm and the head), and `unembed_frac`, the share of the residual's energy in the top
  `--directions` right singular directions of the head (final norm gain folded in); k / d for a random subspace.
  At a prefix's positions the next token is visible (bidirectional), so its accuracy there is not a prediction.

Writes prompts.csv (one row per run), lens.csv and prompts.png. The PromptProbes callback (ethos/callbacks/prompts.py)
logs the same help and lens figures during training.
"""

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from ethos.analysis.store import write_csv
from ethos.errors import ConfigError, exits_on_config_error

SUMMARY_COLUMNS = ["run", "objective", "docs", "bpb_with_prompt", "bpb_without_prompt", "help_bpb", "probe_labels",
                   "probe_acc", "probe_chance", "probe_train", "probe_val"]
LENS_COLUMNS = ["run", "layer", "where", "entropy", "accuracy", "unembed_frac", "random_frac", "positions"]


@dataclass
class Reader:
    """How a task reads a prompt (module docstring): `kind` causal | prefix | seq2seq, the token that opens a
    document, and the model."""

    task: object
    kind: str
    start: int
    dec_start: int  # the encoder–decoder's decoder opens with it (ethos/data/prompts.py)

    @classmethod
    def of(cls, task, start_id: int) -> "Reader":
        from ethos.tasks.clm import CausalLM
        from ethos.tasks.prefix_lm import PrefixLM
        from ethos.tasks.seq2seq import Seq2Seq

        if isinstance(task, Seq2Seq):
            kind = "seq2seq"
        elif isinstance(task, PrefixLM):
            kind = "prefix" if "prefix" in task.paradigms else "causal"
        elif isinstance(task, CausalLM):
            kind = "causal"
        else:
            raise ConfigError(f"RUN: a {type(task).__name__} run; the prompt probes read decoders and encoder–decoders "
                              "(task=clm, prefix_lm, mixture, seq2seq)")
        modes = getattr(getattr(task, "tokens", None), "modes", {})
        mode = modes.get("prefix" if kind != "causal" else "clm") if modes else None
        return cls(task, kind, mode if mode is not None else start_id, start_id)

    @property
    def model(self):
        return self.task.model

    def objective(self) -> str:
        t = self.task
        paradigms = "+".join(getattr(t, "paradigms", {}) or ["clm"])
        return f"{type(t).__name__}({paradigms})"

    def device(self):
        return next(self.model.parameters()).device

    def layout(self, prompts: list[list[int]], conts: list[list[int]] | None = None) -> dict:
        """A padded batch of [start] + prompt (+ continuation): ids, mask, prefix spans and where the prompt ends;
        for seq2seq the prompt alone (the encoder's row) and, with `conts`, the decoder's [start] + continuation."""
        if conts is None:
            conts = [[] for _ in prompts]
        seq2seq = self.kind == "seq2seq"
        rows = [[self.start] + p + ([] if seq2seq else c) for p, c in zip(prompts, conts)]
        T = max(map(len, rows))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.bool)
        for r, row in enumerate(rows):
            ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), True
        k = torch.tensor([1 + len(p) for p in prompts])
        out = {"ids": ids, "mask": mask, "k": k}
        if self.kind == "prefix":
            out["prefix"] = (torch.arange(T)[None] < k[:, None]).long() * mask
        if seq2seq and any(conts):
            dec = [[self.dec_start] + c for c in conts]
            Td = max(map(len, dec))
            out["dec"] = torch.zeros(len(dec), Td, dtype=torch.long)
            out["dec_mask"] = torch.zeros(len(dec), Td, dtype=torch.bool)
            for r, row in enumerate(dec):
                out["dec"][r, :len(row)], out["dec_mask"][r, :len(row)] = torch.tensor(row), True
        return out

    @torch.no_grad()
    def hidden(self, b: dict, residuals: list | None = None) -> Tensor:
        """The final hidden states of the row that reads the prompt (the decoder-only row, or the encoder's);
        with `residuals` a list, it receives that trunk's residual stream per layer (embedding first)."""
        m, dev = self.model, self.device()
        trunk = m.encoder if self.kind == "seq2seq" else m.trunk
        handles = hook_residuals(trunk, residuals) if residuals is not None else []
        try:
            ids, mask = b["ids"].to(dev), b["mask"].to(dev)
            if self.kind == "seq2seq":
                return m.encode(ids, mask)
            prefix = b["prefix"].to(dev) if "prefix" in b else None
            return m(ids, mask, None, None, prefix)
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def continuation_logits(self, b: dict) -> tuple[Tensor, Tensor]:
        """(logits (B, Tc, V), targets (B, Tc), -100 where not scored) of the continuation tokens from the second
        on, each predicted at the continuation position before it."""
        m, dev = self.model, self.device()
        if self.kind == "seq2seq":
            memory = self.hidden(b)
            dec, dmask = b["dec"].to(dev), b["dec_mask"].to(dev)
            cross = b["mask"].to(dev)[:, None, None, :].expand(-1, 1, dec.shape[1], -1)
            h = m.decode(dec, memory, cross, dmask)
            # decoder position j holds continuation token j - 1 and predicts token j: score j >= 2
            target = dec[:, 1:].masked_fill(~dmask[:, 1:], -100)
            target[:, 0] = -100
            return m.logits(h[:, :-1]), target
        h = self.hidden(b)
        ids, mask = b["ids"].to(dev), b["mask"].to(dev)
        target = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        pos = torch.arange(1, ids.shape[1], device=dev)[None]
        target = target.masked_fill(pos <= b["k"].to(dev)[:, None], -100)  # prompt tokens and the first after
        return m.logits(h[:, :-1]), target


def hook_residuals(trunk, store: list) -> list:
    blocks = list(trunk.blocks)

    def before(module, args, kwargs):
        store.append(args[0].detach())

    def after(module, args, out):
        store.append(out.detach())

    return [blocks[0].register_forward_pre_hook(before, with_kwargs=True)] + [b.register_forward_hook(after)
                                                                             for b in blocks]


# ---------------------------------------------------------------- documents
def documents(blocks, start_id: int | None, n: int, min_tokens: int = 16) -> list[tuple[list[int], list[int]]]:
    """Up to n (token ids, bytes) documents of at least min_tokens from packed blocks (the block's start token
    dropped), in order."""
    from ethos.data.prompts import block_documents

    out = []
    for row in blocks:
        for doc, byt in block_documents(row):
            if doc and doc[0] == start_id:
                doc, byt = doc[1:], byt[1:]
            if len(doc) >= min_tokens:
                out.append((doc, byt))
                if len(out) == n:
                    return out
    return out


@torch.no_grad()
def prompt_help(reader: Reader, docs: list[tuple[list[int], list[int]]], split: float = 0.5, batch_size: int = 32,
                progress: bool = False) -> dict:
    """Continuation bits per byte with and without the prompt, and their difference (module docstring)."""
    nll = {"with": 0.0, "without": 0.0}
    n_bytes = 0
    for i in tqdm(range(0, len(docs), batch_size), desc="prompt help", disable=not progress):
        chunk = docs[i:i + batch_size]
        cut = [max(1, round(len(d) * split)) for d, _ in chunk]
        prompts = [d[:k] for (d, _), k in zip(chunk, cut)]
        conts = [d[k:] for (d, _), k in zip(chunk, cut)]
        n_bytes += sum(sum(b[k + 1:]) for (_, b), k in zip(chunk, cut))
        for key, ps in (("with", prompts), ("without", [[] for _ in prompts])):
            logits, target = reader.continuation_logits(reader.layout(ps, conts))
            sel = target != -100
            nll[key] += float(torch.nn.functional.cross_entropy(logits[sel].double(), target[sel], reduction="sum"))
    bpb = {k: v / (math.log(2) * max(n_bytes, 1)) for k, v in nll.items()}
    return {"bpb_with_prompt": bpb["with"], "bpb_without_prompt": bpb["without"],
            "help_bpb": bpb["without"] - bpb["with"], "docs": len(docs)}


# ---------------------------------------------------------------- the logit lens at prompt positions
def head_directions(model, norm, k: int) -> Tensor:
    """(d, k): the top-k right singular vectors of the vocabulary head with the final norm's gain folded in."""
    weight = model.lm_head.weight if getattr(model, "lm_head", None) is not None else model.embed.weight
    w = weight.float() * norm.weight.float()[None]
    return torch.linalg.svd(w, full_matrices=False).Vh[:k].T


@torch.no_grad()
def lens(reader: Reader, docs: list[tuple[list[int], list[int]]], directions: int = 16, split: float = 0.5,
         batch_size: int = 32, progress: bool = False) -> list[dict]:
    """Per layer and position kind (prompt / continuation): the logit lens's entropy and accuracy and the share of
    the residual in the head's top directions (module docstring)."""
    m = reader.model
    trunk = m.encoder if reader.kind == "seq2seq" else m.trunk
    V = head_directions(m, trunk.norm, directions)
    d = V.shape[0]
    sums: dict = {}
    for i in tqdm(range(0, len(docs), batch_size), desc="lens", disable=not progress):
        chunk = docs[i:i + batch_size]
        cut = [max(1, round(len(doc) * split)) for doc, _ in chunk]
        b = reader.layout([doc[:k] for (doc, _), k in zip(chunk, cut)],
                          [doc[k:] for (doc, _), k in zip(chunk, cut)] if reader.kind != "seq2seq" else None)
        resid: list[Tensor] = []
        reader.hidden(b, resid)
        ids, mask, k = b["ids"], b["mask"], b["k"]
        T = ids.shape[1]
        pos = torch.arange(T - 1)[None]
        nxt = ids[:, 1:]
        real = mask[:, 1:]
        where = {"prompt": real & (pos + 1 < k[:, None]), "continuation": real & (pos >= k[:, None])}
        for layer, x in enumerate(resid):
            x = x[:, :-1]
            logp = m.logits(trunk.norm(x)).double().log_softmax(-1)
            ent = -(logp.exp() * logp).sum(-1)
            hit = (logp.argmax(-1) == nxt.to(logp.device)).float()
            x = x.float()
            frac = (x @ V.to(x.device)).square().sum(-1) / x.square().sum(-1).clamp_min(1e-30)
            for name, sel in where.items():
                sel = sel.to(x.device)
                s = sums.setdefault((layer, name), [0.0, 0.0, 0.0, 0])
                s[0] += float(ent[sel].sum())
                s[1] += float(hit[sel].sum())
                s[2] += float(frac[sel].sum())
                s[3] += int(sel.sum())
    return [{"layer": layer, "where": name, "entropy": e / max(n, 1), "accuracy": a / max(n, 1),
             "unembed_frac": f / max(n, 1), "random_frac": directions / d, "positions": n}
            for (layer, name), (e, a, f, n) in sorted(sums.items()) if n]


# ---------------------------------------------------------------- the linear probe
@torch.no_grad()
def features(reader: Reader, examples: list[list[int]], pool: str = "last", batch_size: int = 32,
             progress: bool = False) -> Tensor:
    """(N, d) prompt states: the final hidden state of each prompt's last real token, or their mean."""
    out = []
    for i in tqdm(range(0, len(examples), batch_size), desc="probe features", disable=not progress):
        b = reader.layout(examples[i:i + batch_size])
        h = reader.hidden(b).float().cpu()
        mask = b["mask"]
        if pool == "mean":
            out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
        else:
            out.append(h[torch.arange(len(h)), mask.sum(1) - 1])
    return torch.cat(out)


def linear_probe(train_x: Tensor, train_y: list[int], val_x: Tensor, val_y: list[int], seed: int = 0) -> float:
    """Validation accuracy of a logistic regression (standardised features, L2, scikit-learn)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    clf.fit(train_x.numpy(), train_y)
    return float(clf.score(val_x.numpy(), val_y))


def labelled(labels: str, tokenizer, seq_len: int, path: str = "nyu-mll/glue", limit: int = 3000):
    """(train ids, train labels, val ids, val labels, number of classes) of a labelled text set (the fine-tuning
    sources of ethos/data/labels.py), tokenised without special tokens (the reader adds its own start token),
    each split capped at `limit`."""
    from ethos.data.labels import TextClassificationDataModule

    dm = TextClassificationDataModule(source=labels, path=path, seq_len=seq_len)
    raw = dm.load()
    col = dm.text_columns[0]

    def encode(split):
        ds = raw[split]
        ds = ds.select(range(min(limit, len(ds))))
        texts, ys = list(ds[col]), list(ds["label"])
        enc = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=seq_len - 1)
        keep = [i for i, ids in enumerate(enc["input_ids"]) if ids]
        return [enc["input_ids"][i] for i in keep], [int(ys[i]) for i in keep]

    (tx, ty), (vx, vy) = encode("train"), encode("validation")
    return tx, ty, vx, vy, dm.num_classes


def probe(reader: Reader, tokenizer, labels: str, seq_len: int, path: str = "nyu-mll/glue", limit: int = 3000,
          pool: str = "last", progress: bool = False) -> dict:
    """The linear probe's figures (module docstring) for the prompt states of `reader`."""
    tx, ty, vx, vy, classes = labelled(labels, tokenizer, seq_len, path, limit)
    acc = linear_probe(features(reader, tx, pool, progress=progress), ty, features(reader, vx, pool, progress=progress),
                       vy)
    return {"probe_labels": f"{labels} ({pool})", "probe_acc": acc,
            "probe_chance": max(vy.count(c) for c in range(classes)) / len(vy), "probe_train": len(ty),
            "probe_val": len(vy)}


# ---------------------------------------------------------------- a run
def open_run(run: str):
    """(task, run dir, the data module, set up) of a pretraining run."""
    from ethos.config import instantiate
    from ethos.pretrained import load_task
    from ethos.rundir import run_dir_of

    task, _ = load_task(run)
    root = run_dir_of(Path(run))
    dm = instantiate(dict(task.recipe["data"]))
    if not hasattr(dm, "splits"):
        raise ConfigError(f"RUN={run}: trained on {type(dm).__name__}, not packed text")
    dm.prepare_data()
    dm.setup()
    return task, root, dm


def analyse_run(run: str, n_docs: int = 256, split: float = 0.5, labels: str | None = "docstrings",
                labels_path: str = "nyu-mll/glue", pool: str = "last", directions: int = 16,
                probe_limit: int = 3000, progress: bool = True) -> tuple[dict, list[dict]]:
    task, root, dm = open_run(run)
    from ethos.data.tokenizer import special_ids

    start = special_ids(dm.tokenizer)[0]
    reader = Reader.of(task.eval(), start if start is not None else special_ids(dm.tokenizer)[1])
    docs = documents(dm.splits["validation"], start, n_docs)
    if not docs:
        raise ConfigError(f"RUN={run}: no validation document of 16 tokens or more")
    row = {"run": str(run), "objective": reader.objective(), **prompt_help(reader, docs, split, progress=progress)}
    lens_rows = [{"run": str(run), **r} for r in lens(reader, docs, directions, split, progress=progress)]
    if labels:
        row |= probe(reader, dm.tokenizer, labels, dm.seq_len, labels_path, probe_limit, pool, progress)
    return row, lens_rows


def plot(out: Path, rows: list[dict], lens_rows: list[dict]) -> None:
    from ethos.analysis.plots import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.6))
    names = [f"{i}: {r['objective']}" for i, r in enumerate(rows)]  # runs of one objective stay apart by index
    colors = [f"C{i}" for i in range(len(rows))]
    axes[0].bar(range(len(rows)), [r["help_bpb"] for r in rows], color=colors)
    axes[0].set_title("prompt help (bpb without - with)")
    if all(r.get("probe_acc") is not None for r in rows):
        axes[1].bar(range(len(rows)), [r["probe_acc"] for r in rows], color=colors)
        axes[1].axhline(rows[0]["probe_chance"], color="k", ls="--", lw=1)
        axes[1].set_title(f"linear probe: {rows[0]['probe_labels']} (dashed: majority)")
    for ax in axes[:2]:
        ax.set_xticks(range(len(rows)), [str(i) for i in range(len(rows))])
        ax.set_xlabel("run")
    for ax, key in zip(axes[2:], ("entropy", "unembed_frac")):
        for r, name, color in zip(rows, names, colors):
            for where, style in (("prompt", "-"), ("continuation", ":")):
                pts = [(x["layer"], x[key]) for x in lens_rows if x["run"] == r["run"] and x["where"] == where]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, marker="o", ms=3,
                            label=name if where == "prompt" else None)
        ax.set_xlabel("layer (0: embedding)")
        ax.set_title({"entropy": "logit-lens entropy (nats)", "unembed_frac": "residual share in the head's top dirs"
                      }[key] + "\nsolid: prompt positions, dotted: continuation", fontsize=10)
    fig.legend(*axes[2].get_legend_handles_labels(), loc="lower center", ncol=min(4, len(rows)), fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out / "prompts.png", dpi=110)
    plt.close(fig)


def analyse(runs: list[str], out: str | Path, **kw) -> tuple[list[dict], list[dict]]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, lens_rows = [], []
    for run in runs:
        row, lr = analyse_run(run, **kw)
        rows.append(row)
        lens_rows += lr
    write_csv(out / "prompts.csv", rows, SUMMARY_COLUMNS)
    write_csv(out / "lens.csv", lens_rows, LENS_COLUMNS)
    plot(out, rows, lens_rows)
    return rows, lens_rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ethos.analysis.prompts", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="ethos run dirs (or .ckpt) of task=clm, prefix_lm, mixture or seq2seq")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--docs", type=int, default=256, help="validation documents scored")
    p.add_argument("--split", type=float, default=0.5, help="the prompt's share of each document's tokens")
    p.add_argument("--labels", default="docstrings", help="docstrings | sst2 | none: the probe's labelled set")
    p.add_argument("--labels-path", default="nyu-mll/glue", help="GLUE on the hub, or a local copy of it")
    p.add_argument("--pool", default="last", choices=["last", "mean"], help="the prompt state the probe reads")
    p.add_argument("--directions", type=int, default=16, help="the head's top directions for unembed_frac")
    p.add_argument("--probe-limit", type=int, default=3000, help="labelled examples per split, at most")
    args = p.parse_args(argv)
    if not 0 < args.split < 1:
        p.error(f"--split={args.split}: a fraction strictly between 0 and 1")
    for key in ("docs", "directions", "probe_limit"):
        if getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')}={getattr(args, key)}: must be a positive integer")
    if args.labels not in ("docstrings", "sst2", "none"):
        p.error(f"--labels={args.labels}: valid are docstrings, sst2, none")
    with exits_on_config_error():
        rows, _ = analyse(args.runs, args.out, n_docs=args.docs, split=args.split,
                          labels=None if args.labels == "none" else args.labels, labels_path=args.labels_path,
                          pool=args.pool, directions=args.directions, probe_limit=args.probe_limit)
    for r in rows:
        probe = f", probe {r['probe_acc']:.3f} (majority {r['probe_chance']:.3f})" if r.get("probe_acc") is not None \
            else ""
        print(f"{r['run']}: {r['objective']} help {r['help_bpb']:+.4f} bpb ({r['bpb_without_prompt']:.4f} -> "
              f"{r['bpb_with_prompt']:.4f}){probe}")
    print(f"-> {Path(args.out) / 'prompts.csv'}, lens.csv, prompts.png")


if __name__ == "__main__":
    main()
