"""The retrofit's runs of the model on its own data: the covariance C = X^T X of W_O's inputs on calibration
batches (what the activation-aware truncation whitens by), and the validation loss before and after."""

import copy
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ethos.analysis.surgery import out_projections
from ethos.config import instantiate


def run_data(task, ckpt: dict, run_dir: Path):
    """The data module the run trained on (its checkpoint's record), with the run's own saved tokenizer."""
    data = copy.deepcopy(ckpt["ethos"]["data"])
    if (run_dir / "tokenizer").is_dir() and "tokenizer" in data:
        data["tokenizer"] = str(run_dir / "tokenizer")
    dm = instantiate(data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def take(loader, n: int) -> list:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@torch.no_grad()
def covariances(task, batches) -> list[Tensor]:
    """Per layer, X^T X over the real tokens of `batches`, X the input of W_O (B*T x H*d_v)."""
    outs = out_projections(task.model)
    covs = [torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for m in outs]
    keep = {}

    def hook(i):
        def pre(_, args):
            x = args[0][keep["mask"]].double()  # (real tokens, H*d_v)
            covs[i].addmm_(x.T, x)
        return pre

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(outs)]
    try:
        for batch in tqdm(batches, desc="calibration", unit="batch", disable=None):
            keep["mask"] = batch["attention_mask"].bool()
            task._step(batch)
    finally:
        for h in handles:
            h.remove()
    return covs


@torch.no_grad()
def val_loss(task, batches) -> float:
    """Token-weighted mean loss of the task over `batches`."""
    total, count = 0.0, 0
    for batch in batches:
        loss, _, n = task._step(batch)
        total, count = total + float(loss) * n, count + n
    return total / max(count, 1)
