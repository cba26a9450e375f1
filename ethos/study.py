"""A run, and with `finetune_after=<protocol>` the fine-tune of what it trained, in the same job: so one multirun
runs a whole study (variants x seeds, each judged downstream) and one results table gathers it.

The fine-tune config is the pretraining run's with the task, data and `pretrained` swapped and the protocol's
overrides (ethos/conf/finetune_after/*.yaml) applied: model, trainer, logger and paths stay the run's own, so it
runs where the pretraining ran (the same SLURM array job) and resumes the same way after a requeue.
"""

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf, open_dict

from ethos.checks import check
from ethos.config import CONF_DIR
from ethos.errors import ConfigError
from ethos.fit import fit
from ethos.rundir import write_status
from ethos.tasks.registry import task_target

CAUSAL = "ethos.tasks.clm.CausalLM"


def group_nodes(overrides: list[str]) -> DictConfig:
    """The task and data nodes of ethos/conf/ for these group choices, as Hydra composes them (inside the running
    app, or on their own in a script or test)."""
    if GlobalHydra.instance().is_initialized():
        return compose("train", overrides=overrides)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def finetune_config(cfg: DictConfig, run_dir: Path) -> DictConfig:
    """The config of the fine-tune that follows the pretraining run `cfg` in `run_dir`."""
    spec = cfg.finetune_after
    name = spec.name
    pretraining = task_target(cfg)
    composed = group_nodes(["task=finetune", f"data={spec.data}"])
    ft = cfg.copy()
    with open_dict(ft):
        ft.task, ft.data = composed.task, composed.data
        options = getattr(get_class(pretraining), "finetune_options", None)
        if pretraining == CAUSAL:  # a decoder: its last real token is the only one that saw the whole input
            ft.task.backbone, ft.task.pooling = "decoder", "last"
        elif options is not None:  # the prompt objectives say how their backbone reads an input
            for k, v in options(cfg.task).items():
                ft.task[k] = v
        elif pretraining != "ethos.tasks.mlm.MaskedLM":
            raise ConfigError(f"finetune_after={name}: fine-tunes a text backbone; this run trains "
                              f"{pretraining.rsplit('.', 1)[-1]} (images: task=classify|probe pretrained=<run dir>)")
        ft.pretrained = str(run_dir)
        ft.paths.output_dir = str(run_dir / "finetune" / name)
        ft.run_name = f"{cfg.run_name or run_dir.name}/finetune/{name}"
        ft.finetune_after, ft.ckpt_path = None, None
    # key=value items parsed as the command line's are (1e-3 is a number). A key the group's file lacks may be
    # added (as +key= on the command line): whether its target takes it is the config check's question
    OmegaConf.set_struct(ft, False)
    try:
        ft = OmegaConf.merge(ft, OmegaConf.from_dotlist([str(o) for o in spec.get("overrides") or []]))
    except Exception as e:  # noqa: BLE001 - omegaconf's parse and merge errors, as one line
        raise ConfigError(f"finetune_after.overrides={list(spec.overrides)}: {str(e).splitlines()[0]}") from None
    OmegaConf.set_struct(ft, True)
    return ft


def train(cfg: DictConfig) -> float | None:
    """One run; with `finetune_after`, then the fine-tune of what it trained. The fine-tune's config is checked
    before pretraining starts, not after hours of it. Returns the pretraining's final val/loss."""
    checked = check(cfg)  # the pretraining's own mistakes are reported first
    if not cfg.get("finetune_after"):
        return fit(cfg, checked)
    ft = finetune_config(cfg, Path(cfg.paths.output_dir))  # its own finetune_after is null: one level only
    ft_checked = check(ft)
    metric = fit(cfg, checked)
    try:
        fit(ft, ft_checked)
    except Exception as e:  # marked on the fine-tune; the pretraining run stays done (ethos/cli.py)
        write_status(Path(ft.paths.output_dir), "failed", error=f"{type(e).__name__}: {e}")
        raise
    return metric
