"""What a run prints: the config tree, one line per log record, and no warnings a user cannot act on."""

import logging
import warnings

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.tree import Tree


def quiet_warnings() -> None:
    # Lightning 2.6 vs torch 2.14 internals; says nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # our train sampler restarts from the restored global step (ethos/data/sampling.py), which
    # Lightning cannot see: its "dataloader is not resumable" warning does not apply
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    # a streaming train loader's length is the run's by construction (one reader), so Lightning's caveat
    # about lengths of iterable datasets read by several workers does not apply
    warnings.filterwarnings("ignore", message=r".*IterableDataset.* has .__len__. defined")


def print_config(cfg: DictConfig) -> None:
    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(Syntax(text, "yaml", theme="ansi_dark"))
    Console().print(tree)


def one_line_per_message() -> None:
    """Lightning gives the `lightning` logger a console handler of its own and still propagates to the
    root logger, where Hydra's handler prints every record a second time: keep Hydra's (it also writes
    the run's log file). Its advertising tips go."""
    import lightning  # noqa: F401  (adds the handler on import)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
            logger.removeHandler(handler)
        logger.propagate = True
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(getattr(f, "ethos_tips", False) for f in tips.filters):
        no_tips = lambda record: not record.getMessage().startswith("💡 Tip")
        no_tips.ethos_tips = True
        tips.addFilter(no_tips)
