"""`python train.py` / `ethos-train`: compose the config, check it, then data, model, trainer, fit.

Order matters for users: every config mistake is reported in one line before any data is read or
any large module is imported.
"""

import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from ethos.config import check_keys, register_resolvers
from ethos.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("ethos")


def print_config(cfg: DictConfig) -> None:
    from rich.console import Console
    from rich.syntax import Syntax
    from rich.tree import Tree

    tree = Tree("config", guide_style="dim")
    for key, value in cfg.items():
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(str(key)).add(Syntax(text, "yaml", theme="ansi_dark"))
    Console().print(tree)


def find_resume_ckpt(cfg: DictConfig, out_dir: Path) -> str | None:
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise ConfigError(f"ckpt_path={cfg.ckpt_path}: no such checkpoint file")
        return str(path)
    if cfg.resume not in ("auto", "never"):
        raise ConfigError(f"resume={cfg.resume!r}: valid are auto, never")
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.resume == "auto" and last.is_file():
        return str(last)
    return None


def build_model_config(cfg: DictConfig):
    """Instantiate and dry-build the model on the meta device: catches every size mistake in ~1 s."""
    import torch

    from ethos.config import instantiate
    from ethos.tasks.registry import backbone_for

    check_keys(cfg.model, "model")
    model_cfg = instantiate(cfg.model, _convert_="object")
    with torch.device("meta"):
        backbone_for(cfg)(model_cfg)
    return model_cfg


def train(cfg: DictConfig) -> float | None:
    from ethos.config import instantiate

    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = build_model_config(cfg)
    check_keys(cfg.optim, "optim")
    optim = instantiate(cfg.optim)
    for group in ("data", "trainer", "logger", "callbacks"):
        if cfg.get(group):
            check_keys(cfg[group], group)
    ckpt = find_resume_ckpt(cfg, out_dir)
    if not cfg.trainer.get("max_steps") or cfg.trainer.max_steps <= 0:
        raise ConfigError(f"trainer.max_steps={cfg.trainer.get('max_steps')}: pretraining is step-based, "
                          "set a positive number of steps")

    import lightning as L

    from ethos.tasks.registry import task_for

    if cfg.print_config:
        print_config(cfg)
    (out_dir / "config_resolved.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)  # constructors only check arguments; nothing is read yet
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks)
    try:
        datamodule.prepare_data()
        datamodule.setup("fit")
        task = task_for(cfg)(model=model_cfg, optim=optim, **datamodule.task_kwargs())
        for logger in loggers:
            logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if ckpt:
            log.info(f"resuming from {ckpt}")
        elif cfg.validate_first:
            trainer.validate(task, datamodule=datamodule, verbose=False)  # the untrained baseline
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt)
        if getattr(task, "interrupted", False):
            log.warning(f"interrupted at step {trainer.global_step}: re-run the same command to resume")
            sys.exit(130)
        history = getattr(task, "val_history", [])
        if history:
            log.info(f"val/loss {history[0][1]:.3f} (step {history[0][0]}) -> {history[-1][1]:.3f} "
                     f"(step {history[-1][0]}); run dir {out_dir}")
        metric = trainer.callback_metrics.get("val/loss")
        return float(metric) if metric is not None else None
    finally:
        finish_wandb()


def finish_wandb() -> None:
    """Close the W&B run whatever happened, so the next job of a multirun starts cleanly."""
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.finish(exit_code=0 if sys.exc_info()[0] is None else 1)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg)
    except ConfigError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"ethos: {e.kind}: {e}", file=sys.stderr)
        if multirun:
            return None  # one bad job of a sweep must not stop the others
        sys.exit(2)
    except Exception:
        if multirun:
            log.exception("job failed; the sweep goes on")
            return None
        raise


def main() -> None:
    # Lightning 2.6 vs torch 2.14 internals; says nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # our train sampler restarts from the restored global step (ethos/data/sampling.py), which
    # Lightning cannot see: its "dataloader is not resumable" warning does not apply
    warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
    register_resolvers()
    _main()


if __name__ == "__main__":
    main()
