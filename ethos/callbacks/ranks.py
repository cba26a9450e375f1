"""Effective rank of each layer's attention matrices while the model trains, so rank can be watched as it forms
(README "Watching rank form during training"; the offline tool is `python -m ethos.analysis.spectra`).

Every `every_n_steps` optimizer steps (0, the default in ethos/conf/callbacks/default.yaml: off) it reads the live
model's attention weights layer by layer (ethos.analysis.ethos_runs.EthosSource: norm gains folded) and measures
them with the analysis' own `layer_spectra` and `effective_rank` (docs/design.md §4), in `dtype` on a CPU copy of
each layer, under no_grad. Logged per layer i, for each tau of `taus`:

    rank/layer{i}/o_{tau}                    stacked W_O (H d_v x d)
    rank/layer{i}/qk_mean_{tau}, qk_min_     fused W_QK_h over heads (MLA: nope part, in latent coordinates)
    rank/layer{i}/vo_mean_{tau}, vo_min_     fused W_VO_h over heads

at step = trainer.global_step, the number of optimizer steps the weights have had (as val/loss is logged), from
step 0 on: the initial weights are measured when training starts. The values go straight to the run's loggers:
`pl_module.log` from a training hook would be written only at multiples of trainer.log_every_n_steps, and then
again at every later one until overwritten.

Global rank 0 measures and logs (under DDP every process holds the same weights). Under trainer=fsdp (FSDP2:
parameters are sharded DTensors) each layer's attention weights are gathered whole, one layer at a time, by
every rank together (a collective), and rank 0 measures them. Lightning's own FSDPStrategy (FSDP1 flat
parameters) is not read: there it skips, with one warning.
"""

from dataclasses import fields, replace
from typing import Annotated, Literal

import lightning as L
import torch
from annotated_types import Gt, Le
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ethos.analysis.ethos_runs import EthosSource, sharded
from ethos.analysis.spectra import READS, effective_rank, layer_spectra
from ethos.types import NonNegativeInt

Tau = Annotated[float, Gt(0), Le(1)]


class AttentionRanks(L.Callback):
    def __init__(self, every_n_steps: NonNegativeInt = 0, taus: tuple[Tau, ...] = (0.99, 0.999),
                 dtype: Literal["float64", "float32"] = "float64"):
        self.every_n_steps, self.taus, self.dtype = every_n_steps, tuple(float(t) for t in taus), getattr(torch, dtype)
        self._last = -1  # the step last measured: with gradient accumulation a step ends several batches
        self._skip = False

    def on_train_start(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:  # the initial weights: where rank starts from
            self._measure(trainer, pl_module)
        else:  # a resume: its step was measured before the checkpoint
            self._last = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step % max(self.every_n_steps, 1) == 0:
            self._measure(trainer, pl_module)

    def _measure(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if not self.every_n_steps or self._skip or step == self._last or not trainer.loggers:
            return
        self._last = step
        if flat_sharded(trainer):
            rank_zero_warn("callbacks.ranks: Lightning's FSDPStrategy shards flat parameters: attention ranks are "
                           "not measured in this run (use trainer=fsdp, or measure its checkpoints with "
                           "python -m ethos.analysis.spectra)")
            self._skip = True
            return
        gathered = any(sharded(p) for p in pl_module.parameters())  # FSDP2: every rank reads
        if not (trainer.is_global_zero or gathered):
            return
        metrics = measure(pl_module.model, self.taus, self.dtype, here=trainer.is_global_zero)
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # straight to the loggers (see the module docstring)
                logger.log_metrics(metrics, step=step)


def flat_sharded(trainer) -> bool:
    """Lightning's FSDPStrategy (FSDP1): no rank holds a whole layer outside its forward, and no layer is read."""
    return isinstance(trainer.strategy, FSDPStrategy)


class OnCPU:
    """A source whose layers are copied to the CPU (the analysis accumulates its Gram matrices there)."""

    def __init__(self, source):
        self.source = source

    def read(self, layer: int, parts):
        w = self.source.read(layer, parts)
        return replace(w, **{f.name: getattr(w, f.name).cpu() for f in fields(w)
                             if isinstance(getattr(w, f.name), Tensor)})


@torch.no_grad()
def measure(model: torch.nn.Module, taus=(0.99, 0.999), dtype: torch.dtype = torch.float64,
            here: bool = True) -> dict[str, float]:
    """The metrics of the module docstring for a live backbone (encoder, decoder, ViT; MHA, MLA, MLA-o).
    `here=False` (ranks other than 0 under FSDP2): read every layer as the measuring rank does, so that each
    gather has all its ranks, and measure nothing."""
    # read in float64: MLA-o's W_O = W_OA W_OB is formed on the model's device, where float32 may mean TF32
    source = EthosSource(type(model).__name__, torch.float64, model=model)
    out: dict[str, float] = {}
    for i in range(source.n_layers):
        if not here:
            for parts in READS:
                source.read(i, parts)
            continue
        svals, _ = layer_spectra(OnCPU(source), i, dtype)
        for tau in taus:
            out[f"rank/layer{i}/o_{tau}"] = float(effective_rank(svals["o"], tau))
            for kind in ("qk", "vo"):
                r = effective_rank(svals[kind], tau).double()  # (H,)
                out[f"rank/layer{i}/{kind}_mean_{tau}"] = float(r.mean())
                out[f"rank/layer{i}/{kind}_min_{tau}"] = float(r.min())
    return out
