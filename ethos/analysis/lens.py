"""A model run on given text: each head's attention pattern and the logit lens over the residual stream.

The whole model runs here (unlike the weight readers, which hold one layer): an ethos run's backbone, or a
transformers checkpoint loaded by `AutoModelForCausalLM` (a local directory, or a hub repo downloaded whole).

- attention: per layer and head, the weights on the first token (the sink mass the AttentionStats callback
  measures: ethos/callbacks/attention_stats.py) and on the previous token, averaged over the query positions
  after the first, and the mean entropy of a query's weights.
- logit lens (nostalgebraist 2020): the residual stream after the embedding (layer 0) and after every block
  (layer l), put through the final norm and the unembedding, as if the model stopped there: the nearest
  vocabulary tokens per position, their probabilities and the distribution's entropy. At the last layer it is the
  model's own output.
"""

from pathlib import Path

import torch
from torch import Tensor

from ethos.analysis.ethos_runs import EthosSource
from ethos.analysis.store import write_csv
from ethos.errors import ConfigError

ATTENTION_COLUMNS = ["layer", "head", "first_mass", "prev_mass", "entropy"]
LENS_COLUMNS = ["layer", "position", "input_token", "top1_token", "top1_prob", "entropy", "top5"]


@torch.no_grad()
def run(src, ids: list[int]) -> tuple[list[Tensor], list[Tensor], callable]:
    """(attention weights per layer (H, T, T), residual stream per layer (T, d): embeddings first, then each
    block's output, and the lens: residual -> logits)."""
    if isinstance(src, EthosSource):
        return _run_ethos(src, ids)
    return _run_hf(src, ids)


def _residual_hooks(blocks, resid: list):
    def before(module, args):
        if not resid:
            resid.append(args[0][0].float())

    def after(module, args, out):
        resid.append((out[0] if isinstance(out, tuple) else out)[0].float())

    return [blocks[0].register_forward_pre_hook(before)] + [b.register_forward_hook(after) for b in blocks]


def _run_ethos(src: EthosSource, ids: list[int]):
    from ethos.models.scores import Attend, record_attention

    model = src.model.eval()
    if getattr(model, "embed", None) is None:
        raise ConfigError(f"--text: {src.name} is a {type(model).__name__}, which reads images, not text")
    layer_of = {id(b.attn.attend): i for i, b in enumerate(src.blocks) if isinstance(getattr(b.attn, "attend", None),
                                                                                     Attend)}
    attn: dict[int, Tensor] = {}
    resid: list[Tensor] = []

    def probe(attend, p, allowed):
        if id(attend) in layer_of:
            attn[layer_of[id(attend)]] = p[0].float()

    handles = _residual_hooks(src.blocks, resid)
    device = next(model.parameters()).device
    try:
        with record_attention(model, probe):
            model(torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    head = model.logits if hasattr(model, "logits") else model.mlm_logits
    dtype = next(model.parameters()).dtype
    lens = lambda x: head(model.trunk.norm(x.to(device, dtype))).float()  # noqa: E731
    return [attn[i] for i in sorted(attn)], resid, lens


def _run_hf(src, ids: list[int]):
    from transformers import AutoModelForCausalLM

    path = Path(src.name).expanduser()
    if not path.is_dir():  # a hub repo: the whole model, as transformers loads it
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(src.name))
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager").eval()
    blocks = model.model.layers
    resid: list[Tensor] = []
    handles = _residual_hooks(blocks, resid)
    try:
        out = model(torch.tensor([ids]), output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    lens = lambda x: model.lm_head(model.model.norm(x)).float()  # noqa: E731
    return [a[0].float() for a in out.attentions], resid, lens


def attention_rows(attn: list[Tensor]) -> list[dict]:
    rows = []
    for layer, p in enumerate(attn):
        T = p.shape[-1]
        q = torch.arange(1, T)
        first = p[:, 1:, 0].mean(-1)
        prev = p[:, q, q - 1].mean(-1)
        r = p / p.sum(-1, keepdim=True).clamp_min(1e-30)
        entropy = -torch.special.xlogy(r, r).sum(-1).mean(-1)
        rows += [{"layer": layer, "head": h, "first_mass": float(first[h]), "prev_mass": float(prev[h]),
                  "entropy": float(entropy[h])} for h in range(p.shape[0])]
    return rows


@torch.no_grad()
def lens_rows(resid: list[Tensor], lens, tokens: list[str], decode) -> list[dict]:
    rows = []
    for layer, x in enumerate(resid):
        logp = lens(x).log_softmax(-1)
        p = logp.exp()
        entropy = -(p * logp).sum(-1)
        top_p, top_i = p.topk(min(5, p.shape[-1]), dim=-1)
        rows += [{"layer": layer, "position": t, "input_token": tokens[t], "top1_token": decode(top_i[t, 0]),
                  "top1_prob": float(top_p[t, 0]), "entropy": float(entropy[t]),
                  "top5": " ".join(f"{decode(i)}:{float(v):.3f}" for i, v in zip(top_i[t], top_p[t]))}
                 for t in range(len(tokens))]
    return rows


def analyse_text(src, tokenizer, text: str, out: Path, plots: bool = True) -> dict[str, list]:
    """attention.csv, lens.csv (and their PNGs) of SOURCE on `text`."""
    if tokenizer is None:
        raise ConfigError(f"--text: no tokenizer.json comes with {src.name} (an ethos run's tokenizer/, or the "
                          "checkpoint directory's own)")
    ids = tokenizer.encode(text).ids
    if len(ids) < 2:
        raise ConfigError(f"--text={text!r}: {len(ids)} token(s); give at least two")
    tokens = [tokenizer.id_to_token(i) for i in ids]
    attn, resid, lens = run(src, ids)
    tables = {"attention": attention_rows(attn),
              "lens": lens_rows(resid, lens, tokens, lambda i: tokenizer.id_to_token(int(i)) or str(int(i)))}
    write_csv(out / "attention.csv", tables["attention"], ATTENTION_COLUMNS)
    write_csv(out / "lens.csv", tables["lens"], LENS_COLUMNS)
    if plots:
        from ethos.analysis import head_plots

        head_plots.plot_text(out, attn, tokens, tables["lens"])
    return tables
