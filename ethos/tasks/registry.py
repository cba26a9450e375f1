"""The data modality and objective choose backbone and task; `model=` only chooses the blocks."""

from omegaconf import DictConfig

from ethos.errors import ConfigError

OBJECTIVES = {"text": ("mlm",)}


def modality(cfg: DictConfig) -> str:
    from hydra.utils import get_class

    return getattr(get_class(cfg.data._target_), "modality", "text")


def _check(cfg: DictConfig) -> str:
    mod = modality(cfg)
    if cfg.objective not in OBJECTIVES.get(mod, ()):
        raise ConfigError(f"objective={cfg.objective!r}: valid for {mod} data are "
                          f"{', '.join(OBJECTIVES.get(mod, ()))}")
    return mod


def backbone_for(cfg: DictConfig):
    """A callable model_cfg -> nn.Module, used for the dry build on the meta device."""
    _check(cfg)
    from ethos.models.encoder import Encoder

    return lambda model_cfg: Encoder(model_cfg, vocab_size=8)


def task_for(cfg: DictConfig):
    _check(cfg)
    from ethos.tasks.mlm import MaskedLM

    return MaskedLM
