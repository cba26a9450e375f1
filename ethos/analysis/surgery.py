"""An MLA run turned into an MLA-o one: every block's W_O replaced by its factors W_OA W_OB (MLA-o's o_a, o_b),
every other weight copied, written as a run dir that a fine-tune (`pretrained=`) or continued pretraining
(`ckpt_path=`) starts from."""

import copy
import shutil
from pathlib import Path

import torch
from hydra.utils import get_class
from torch import Tensor

from ethos.config import instantiate
from ethos.files import atomic_path
from ethos.models.blocks import Block
from ethos.optim import OptimConfig


def out_projections(model) -> list[torch.nn.Module]:
    """The module applying W_O in every block: MLA / MHA `out` (MLA-o has none to retrofit)."""
    return [b.attn.out for b in model.modules() if isinstance(b, Block)]


def named_outs(model) -> list[tuple[str, torch.nn.Module]]:
    outs = set(map(id, out_projections(model)))
    return [(n, m) for n, m in model.named_modules() if id(m) in outs]


def mla_o_task(task, ckpt: dict, r: int, factors: list[tuple[Tensor, Tensor]]):
    """The task rebuilt with MLA-o attention at output latent r, every weight copied, W_O replaced by its
    factors. Returns (task, its `ethos` record)."""
    record = copy.deepcopy(ckpt["ethos"])
    attn = record["model"]["attn"]
    attn["_target_"], attn["o_latent"] = "ethos.models.attention.MLAO", r
    options = dict(ckpt.get("hyper_parameters", {}))
    if "pretrained" in options:
        options["pretrained"] = None
    new = get_class(record["task"])(model=instantiate(record["model"], _convert_="object"), optim=OptimConfig(),
                                    **options)
    state = dict(task.state_dict())
    for (prefix, _), (w_oa, w_ob) in zip(named_outs(task.model), factors):
        w = state.pop(f"model.{prefix}.weight")
        state[f"model.{prefix.removesuffix('out')}o_a.weight"] = w_oa.T.to(w.dtype).contiguous()
        state[f"model.{prefix.removesuffix('out')}o_b.weight"] = w_ob.T.to(w.dtype).contiguous()
        bias = state.pop(f"model.{prefix}.bias", None)
        if bias is not None:
            state[f"model.{prefix.removesuffix('out')}o_b.bias"] = bias
    new.load_state_dict(state)  # strict: every weight of the MLA-o model accounted for
    new.recipe = record
    return new.eval(), record


def save_run(task, record: dict, ckpt: dict, src: Path, dest: Path) -> Path:
    """A run dir a fine-tune (`pretrained=dest`) or continued pretraining (`ckpt_path=`) starts from: the weights
    only (no optimizer state: training starts at step 0), self-describing, with the source run's tokenizer."""
    (dest / "checkpoints").mkdir(parents=True, exist_ok=True)
    path = dest / "checkpoints" / "last.ckpt"
    with atomic_path(path) as tmp:
        torch.save({"state_dict": task.state_dict(), "ethos": record,
                    "hyper_parameters": ckpt.get("hyper_parameters", {}), "retrofit_of": str(src)}, tmp)
    if (src / "tokenizer").is_dir() and not (dest / "tokenizer").exists():
        shutil.copytree(src / "tokenizer", dest / "tokenizer")
    return path
