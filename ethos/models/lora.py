"""LoRA (Hu et al. 2021) on a fine-tuned backbone, through HF peft: W x + (alpha / r) B A x on the chosen
projections, the pretrained weights frozen (docs/design.md §11.2).

`task.lora.targets` names Linear modules of our blocks by their attribute names (peft matches the end of a
module's path): `qkv` (MHA/GQA's fused [W_q; W_k; W_v]), `out` (W_O), MLA's `qkv_a` (the fused down-projection
[W_qa; W_kva; W_kr]), `q_b` and `kv_b` (the up-projections from the latents), MLA-o's `o_a` and `o_b`, and the
FFN's matrices; null (the default) takes every projection of the attention. A fused matrix gets one adapter:
its update B A spans q, k and v (or the q and kv latents) together, and is read head by head after the split
the forward uses (python -m ethos.analysis.lora).
"""

import copy

from torch import nn
from typing_extensions import TypedDict

from ethos.errors import ConfigError
from ethos.types import HalfOpenUnit, NonNegativeInt, PositiveFloat


class LoraOptions(TypedDict, total=False):
    """`task.lora`: r 0 is off (a full fine-tune)."""

    r: NonNegativeInt
    alpha: PositiveFloat
    dropout: HalfOpenUnit
    targets: list[str] | None


DEFAULTS = {"r": 0, "alpha": 16.0, "dropout": 0.0, "targets": None}


def options(lora) -> dict | None:
    """`task.lora` with its defaults, as a plain dict; None when off."""
    opts = {**DEFAULTS, **dict(lora or {})}
    opts["targets"] = None if opts["targets"] is None else list(opts["targets"])
    return opts if opts["r"] > 0 else None


def linear_paths(model: nn.Module, within: str = ".blocks.") -> list[str]:
    """The module paths of `model`'s Linear layers inside its blocks (`within` ".attn.": inside their attention)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and within in f".{name}."]


def linear_names(model: nn.Module) -> list[str]:
    """The attribute names of the Linear layers of `model`'s blocks: what `targets` may name."""
    return sorted({path.rsplit(".", 1)[-1] for path in linear_paths(model)})


def targets(model: nn.Module, opts: dict) -> list[str]:
    """The target names, checked: a name that is not a projection of the blocks is a one-line error."""
    if opts["targets"] is None:  # full paths: a bare name such as `gate` would also match an MoE router
        return linear_paths(model, ".attn.")
    valid = linear_names(model)
    bad = [t for t in opts["targets"] if t not in valid]
    if bad or not opts["targets"]:
        raise ConfigError(f"task.lora.targets={opts['targets']}: {', '.join(bad) or 'empty'} is not a projection "
                          f"of this model's blocks (valid: {', '.join(valid)})")
    return opts["targets"]


def attach(model: nn.Module, opts: dict) -> nn.Module:
    """`model` as a peft model: LoRA adapters on the target projections, every other weight frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=opts["r"], lora_alpha=opts["alpha"], lora_dropout=opts["dropout"],
                        target_modules=targets(model, opts))
    return get_peft_model(model, config)


def is_lora(model: nn.Module) -> bool:
    return type(model).__module__.startswith("peft.")  # without importing peft (a second) for plain models


def merged(model: nn.Module, dtype=None) -> nn.Module:
    """A copy of a peft model with its adapters merged into the weights (W + (alpha / r) B A): a plain backbone.
    `dtype` (e.g. float64): merge in that precision, so that the update is not rounded into float32 weights."""
    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype)
    return model.merge_and_unload()


def base(model: nn.Module) -> nn.Module:
    """A copy of a peft model without its adapters: the pretrained backbone it started from."""
    return copy.deepcopy(model).unload()
