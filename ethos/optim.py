"""The optimizer config and the learning-rate schedule, one for every task and variant: AdamW with one
weight-decay rule (`decays`), or under optim=muon Muon for the hidden matrices and AdamW for the rest (one
optimizer rule, `uses_muon`; one composite optimizer, `MuonAdamW`); linear warm-up, then linear / cosine decay,
constant, or warm-up-stable-decay (wsd); every schedule extendable on resume (docs/design.md §10.5)."""

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ethos.types import HalfOpenUnit, NonNegativeFloat, OpenUnit, PositiveFloat, PositiveInt, Probability

# weight-decayed parameters: the weights of these module types, plus what a module lists in `projections`
PROJECTIONS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class OptimConfig:
    name: Literal["adamw", "muon"] = "adamw"  # muon: Muon for the hidden matrices (uses_muon), AdamW for the rest
    # AdamW: every parameter, or under name=muon every parameter that is not Muon's
    lr: PositiveFloat = 5e-4
    weight_decay: NonNegativeFloat = 0.01
    betas: tuple[OpenUnit, OpenUnit] = (0.9, 0.98)
    eps: PositiveFloat = 1e-6
    fused: bool | None = None  # None = fused AdamW on CUDA unless gradients are clipped under AMP
    # Muon (torch.optim.Muon), only with name=muon; defaults of Keller Jordan's Muon, modded-nanogpt and nanochat
    muon_lr: PositiveFloat = 0.02
    muon_momentum: HalfOpenUnit = 0.95
    muon_nesterov: bool = True
    muon_ns_steps: PositiveInt = 5  # Newton-Schulz iterations
    muon_weight_decay: NonNegativeFloat = 0.0  # decoupled: each step W -= muon_lr * factor * this * W
    muon_adjust_lr: Literal["original", "match_rms_adamw", "spectral_unclamped"] | None = None  # None: original
    # the schedule, one for both optimizers (each group's lr times the same factor)
    warmup: NonNegativeFloat = 0.1  # < 1: fraction of max_steps; >= 1: steps
    schedule: Literal["linear", "cosine", "constant", "wsd"] = "linear"
    min_lr_ratio: HalfOpenUnit = 0.0  # the decay ends at lr * min_lr_ratio
    decay_fraction: Probability = 0.2  # wsd: the decay runs over this last fraction of the steps

    def __post_init__(self):
        self.betas = tuple(self.betas)


def decays(module: nn.Module, name: str) -> bool:
    """The weight-decay rule, one for every task and variant: decay every projection matrix (Linear
    and conv weights, and the matrices a module lists in `projections`, e.g. the latent-expert
    generator); nothing else: no norms, biases, embeddings (tokens, positions, cls token), expert keys
    or expert tables. Tables are looked up, not multiplied: decay would only shrink rarely-used rows."""
    if isinstance(module, PROJECTIONS):
        return name == "weight"
    return name in getattr(module, "projections", ())


def uses_muon(path: str, module: nn.Module, name: str, p: torch.Tensor) -> bool:
    """The optimizer rule under optim=muon, one for every task and variant: Muon takes the weight-decayed
    (`decays`) 2-D matrices of the hidden stack, the parameters under a module path with a `trunk` part (the
    Transformer blocks of every backbone): attention and FFN projections, gates, the router's query
    projection, the latent-expert generator. AdamW takes everything else: token and position embeddings, the
    vocabulary head (tied or not), task heads, norms, biases, scalars (the attention sink), expert tables and
    product keys, the ViT patch projection and cls token.

    Muon orthogonalises a matrix's update, a step of the same size in every direction of a map from
    activations to activations; an input or output layer, or a table that is looked up row by row (tokens,
    experts) is no such map (Jordan 2024; modded-nanogpt and nanochat split the same way). torch's Muon
    takes 2-D matrices only: a `projections` entry of another shape stays with AdamW."""
    return "trunk" in path.split(".") and p.ndim == 2 and decays(module, name)


class MuonAdamW(torch.optim.Optimizer):
    """torch's Muon and AdamW over disjoint parameters, as the one optimizer Lightning's automatic
    optimization takes.

    `param_groups` are the inner optimizers' group dicts themselves (Muon's first), so the LR schedule and
    Lightning's gradient clipping and unscaling act on them; `state` is one dict both inner optimizers write
    into (their parameters are disjoint), so Lightning's device moves reach every tensor. `step` evaluates
    the closure once, then steps both; `zero_grad` is torch's, over the joint groups. `state_dict` is
    torch's own format over the joint groups (parameters numbered across them, Muon's first), and
    `load_state_dict` gives each inner optimizer its part: a resumed run continues bit for bit. Save and load
    through this object: an inner optimizer's own state_dict would meet the other's parameters in `state`.
    """

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW):
        self.muon, self.adamw = muon, adamw
        # the same dicts, not copies; no defaults, so no key of one optimizer is added to the other's groups
        super().__init__(muon.param_groups + adamw.param_groups, defaults={})
        self._share_state()

    def _share_state(self) -> None:
        state = defaultdict(dict, {p: s for opt in (self.muon, self.adamw) for p, s in opt.state.items()})
        self.state.clear()  # in place: the object Lightning and the LR scheduler already hold stays valid
        self.state.update(state)
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        saved = iter(state_dict["param_groups"])
        for opt in (self.muon, self.adamw):
            groups = [next(saved) for _ in opt.param_groups]
            ids = {i for g in groups for i in g["params"]}
            opt.load_state_dict({"state": {i: s for i, s in state_dict["state"].items() if i in ids},
                                 "param_groups": groups})
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups  # torch rebuilt the dicts
        self._share_state()


def make_optimizer(groups: list[dict], o: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    """AdamW over the groups; under optim=muon, Muon over those marked "muon" (Task.param_groups, by
    `uses_muon`) and AdamW over the rest, as one MuonAdamW. Each group's own lr and weight_decay win."""
    adamw = torch.optim.AdamW([g for g in groups if not g.get("muon")], lr=o.lr, betas=o.betas, eps=o.eps,
                              fused=fused)
    muon = [g for g in groups if g.get("muon")]
    if not muon:  # optim=adamw, or nothing of the trunk trains (a linear probe)
        return adamw
    return MuonAdamW(torch.optim.Muon(muon, lr=o.muon_lr, weight_decay=o.muon_weight_decay,
                                      momentum=o.muon_momentum, nesterov=o.muon_nesterov, ns_steps=o.muon_ns_steps,
                                      adjust_lr_fn=o.muon_adjust_lr), adamw)


def clips_under_amp(trainer) -> bool:
    """Lightning refuses to clip the gradients of a fused optimizer under mixed precision (it unscales
    them inside its step), so the default on CUDA falls back to the foreach AdamW when clipping."""
    return bool(getattr(trainer, "gradient_clip_val", None)) and "mixed" in str(getattr(trainer, "precision", ""))


class LRSchedule:
    """lr / peak at a step: linear warm-up from 0, then linear or cosine decay to `min_ratio` at `total`,
    constant, or wsd (warm-up, stable, decay): at the peak until the last `decay_fraction` of the steps,
    then linear to `min_ratio` at `total` (nanochat's warmdown). The values of transformers' `polynomial`
    (power 1), `cosine_with_min_lr` and `constant_with_warmup` schedules (tested value by value), plus one
    thing they lack: `extend`.

    The decay runs linearly (cosine: along a half cosine) from (start, start_factor) to (total, min_ratio):
    start is the end of warm-up (linear, cosine) or of the stable phase (wsd), start_factor 1 until a resume
    moves them (`extend`).

    An object, not a function: LambdaLR saves a callable object's attributes with its state, so the
    checkpoint holds where the decay started and what it aims at.
    """

    def __init__(self, kind: str, warmup: int, total: int, min_ratio: float = 0.0, decay_fraction: float = 0.2):
        self.kind, self.warmup, self.total, self.min_ratio = kind, warmup, total, min_ratio
        self.decay_fraction = decay_fraction
        self.start, self.start_factor = self.decay_start(total), 1.0

    def decay_start(self, total: int) -> int:
        """Where the decay of a run of `total` steps starts: after warm-up, for wsd after the stable phase."""
        if self.kind != "wsd":
            return self.warmup
        return max(self.warmup, total - round(self.decay_fraction * total))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.kind == "constant" or step < self.start:  # (only wsd's stable phase is ever before start)
            return 1.0
        p = min(1.0, (step - self.start) / max(1, self.total - self.start))
        shape = 0.5 * (1 + math.cos(math.pi * p)) if self.kind == "cosine" else 1 - p
        return self.min_ratio + (self.start_factor - self.min_ratio) * shape

    def extend(self, step: int, total: int) -> None:
        """A resumed run with another max_steps, without a jump in the LR. Once the decay has begun (`step`
        past its start), the same decay runs from the factor reached at `step` to the floor at the new
        `total` (at the floor already if the run had finished). Before it has begun, wsd stays at the peak
        and its decay moves to the last decay_fraction of the new total (at once from `step` if that is
        already past); linear and cosine decay from the end of warm-up to the new total."""
        if total == self.total:
            return
        if step > self.start:
            self.start, self.start_factor = step, self(step)
        elif self.kind == "wsd":
            self.start = max(step, self.decay_start(total))
        self.total = total


def schedule(optimizer: torch.optim.Optimizer, o: OptimConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = int(o.warmup * total) if o.warmup < 1 else int(o.warmup)
    fn = LRSchedule(o.schedule, warmup, total, o.min_lr_ratio, o.decay_fraction)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
