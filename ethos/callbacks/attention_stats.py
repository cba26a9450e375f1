"""Attention artifacts per layer, the ones alternative score functions target (README "Attention score
functions"), measured on the callback's own small fixed batch, never in the training step.

Every `every_n_val` validations it runs the model on the first `batch_size` rows of the first validation
batch (kept for the whole run, so the values of different steps compare), one row at a time so the
T x T weights of only one layer and one row are alive at once. The attention modules compute their
weights on the plain path only inside `record_attention`; training keeps its fast paths. Logged per layer
i (averaged over heads and real query tokens):

    artifacts/layer{i}/first_mass      weight on position 0 ([CLS] / BOS, the ViT's cls token)
    artifacts/layer{i}/sep_mass        weight on separator tokens ([SEP] / EOS; text only)
    artifacts/layer{i}/entropy         entropy (nats) of the weights renormalised to sum 1: where a head
                                       looks, whatever mass it spends (sigmoid and relu do not sum to 1)
    artifacts/layer{i}/null_mass       softmax1 / sink: the mass given to nothing, 1 - sum of the weights
    artifacts/layer{i}/max_activation  the largest |x| in the residual stream after the block (outlier
                                       features, what off-by-one attention claims to remove)

The prompt objectives (ethos/tasks/prefix_lm.py, seq2seq.py) run their own forward (`forward_hidden`): prefix
attention, and for an encoder–decoder both trunks' self-attention (cross-attention is not measured).

With several processes each rank measures the rows of its own first validation batch (as many as every rank
has): the logged averages are the mean over ranks, max_activation the largest on any rank.
"""

import lightning as L
import torch
from torch import Tensor

from ethos.data.tokenizer import special_ids
from ethos.models.blocks import Block
from ethos.models.scores import NULL_KEY, Attend, record_attention
from ethos.types import PositiveInt


class AttentionStats(L.Callback):
    def __init__(self, every_n_val: PositiveInt = 1, batch_size: PositiveInt = 4):
        self.every_n_val, self.batch_size = every_n_val, batch_size
        self.validations = 0  # kept in checkpoints: a resumed run measures at the same validations
        self._batch: dict | None = None

    def state_dict(self) -> dict:
        return {"validations": self.validations}

    def load_state_dict(self, state: dict) -> None:
        self.validations = state.get("validations", 0)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._batch is None and isinstance(batch, dict):  # the run's first validation batch, for good
            self._batch = {k: v[: self.batch_size].detach().clone() for k, v in batch.items()
                           if isinstance(v, Tensor)}

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self._batch is None:
            return
        self.validations += 1
        if (self.validations - 1) % self.every_n_val:
            return
        metrics = measure(pl_module, self._batch, separator_id(trainer), rows=common_rows(self._batch, pl_module))
        if metrics:
            # each rank measures its own rows: the averages are averaged over ranks, the largest activation is
            # the largest on any rank
            peaks = {k: metrics.pop(k) for k in list(metrics) if k.endswith("/max_activation")}
            pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=True)
            pl_module.log_dict(peaks, on_step=False, on_epoch=True, sync_dist=True, reduce_fx="max")


def common_rows(batch: dict, pl_module) -> int:
    """The rows every rank has (a rank's first validation batch may be one short): under FSDP each forward
    gathers parameters with the other ranks, so all ranks must run the same number."""
    rows = next(iter(batch.values())).shape[0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        n = torch.tensor([rows], device=pl_module.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MIN)
        rows = int(n)
    return rows


def separator_id(trainer) -> int | None:
    tokenizer = getattr(getattr(trainer, "datamodule", None), "tokenizer", None)
    try:
        return special_ids(tokenizer)[1] if tokenizer is not None else None
    except Exception:  # noqa: BLE001 - a tokenizer without a separator: no separator mass
        return None


@torch.no_grad()
def measure(pl_module, batch: dict, sep_id: int | None, rows: int | None = None) -> dict[str, float]:
    """The artifact metrics of the first `rows` rows of `batch` (all by default; see the module docstring), one
    row per forward."""
    blocks = [m for m in pl_module.modules() if isinstance(m, Block)]
    layer_of = {id(b.attn.attend): i for i, b in enumerate(blocks) if isinstance(getattr(b.attn, "attend", None),
                                                                               Attend)}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    peaks = [0.0] * len(blocks)
    row: dict = {}

    def add(key: str, total: Tensor, n: Tensor | float) -> None:
        sums[key] = sums.get(key, 0.0) + float(total)
        counts[key] = counts.get(key, 0.0) + float(n)

    def probe(attend: Attend, p: Tensor, allowed: Tensor | None) -> None:
        i = layer_of.get(id(attend))
        if i is None:
            return
        p = p.float()  # (1, H, T, T)
        real = row["real"][:, None, :].expand(p.shape[:3])  # real query tokens, every head
        n = real.sum()
        mass = p.sum(-1)
        add(f"layer{i}/first_mass", p[..., 0][real].sum(), n)
        if row["sep"] is not None:
            add(f"layer{i}/sep_mass", (p * row["sep"][:, None, None, :]).sum(-1)[real].sum(), n)
        r = p / mass.clamp(min=1e-30)[..., None]
        entropy = -torch.special.xlogy(r, r).sum(-1)
        looks = real & (mass > 0)  # a row with no weight at all has no distribution
        add(f"layer{i}/entropy", entropy[looks].sum(), looks.sum())
        if attend.score in NULL_KEY:
            add(f"layer{i}/null_mass", (1 - mass)[real].sum(), n)

    def peak(i: int):
        def hook(module, args, out: Tensor) -> None:
            x = out[0] if isinstance(out, tuple) else out
            peaks[i] = max(peaks[i], float(x.float().abs()[row["real"]].max()))
        return hook

    handles = [b.register_forward_hook(peak(i)) for i, b in enumerate(blocks)]
    model = pl_module.model
    try:
        with record_attention(model, probe):
            for j in range(next(iter(batch.values())).shape[0] if rows is None else rows):
                one = {k: v[j: j + 1].to(pl_module.device) for k, v in batch.items()}
                if "input_ids" in one:
                    mask = one.get("attention_mask")
                    ids = one["input_ids"]
                    row["real"] = mask.bool() if mask is not None else torch.ones_like(ids, dtype=torch.bool)
                    if "enc_attention_mask" in one:  # an encoder–decoder: real in either row (same width)
                        row["real"] = row["real"] | one["enc_attention_mask"].bool()
                    row["sep"] = (one["input_ids"] == sep_id).float() if sep_id is not None else None
                    if hasattr(pl_module, "forward_hidden"):  # the prompt objectives: their own masks and rows
                        pl_module.forward_hidden(one)
                    else:
                        model(one["input_ids"], one.get("attention_mask"))
                elif "image" in one:
                    T = model.num_prefix + model.patch_embed.num_patches
                    row["real"], row["sep"] = torch.ones(1, T, dtype=torch.bool, device=pl_module.device), None
                    model(one["image"])
                else:
                    return {}
    finally:
        for h in handles:
            h.remove()
    out = {f"artifacts/{k}": sums[k] / max(counts[k], 1.0) for k in sums}
    out |= {f"artifacts/layer{i}/max_activation": v for i, v in enumerate(peaks)}
    return out
