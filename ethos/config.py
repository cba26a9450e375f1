"""Hydra resolvers and config checks that run before anything heavy is imported or loaded."""

import hashlib
import inspect
import re

from omegaconf import DictConfig, ListConfig, OmegaConf

from ethos.errors import ConfigError


def run_dir_name(run_name: str | None, override_dirname: str) -> str:
    """Stable run directory name: explicit run_name, else the overrides, else 'default'."""
    name = run_name or override_dirname or "default"
    name = re.sub(r"[^A-Za-z0-9=,._+-]", "_", name)
    if len(name) > 120:  # file-system limits: keep a readable head and a hash of the whole
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:10]}"
    return name


def default_precision() -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def register_resolvers() -> None:
    for name, fn in (("run_dir", run_dir_name), ("precision", default_precision)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def _target_params(target: str, key: str):
    from hydra.utils import get_object

    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        raise ConfigError(f"{key}._target_={target!r}: cannot be imported ({type(e).__name__}: {e})") from None
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return None
    return [n for n, p in sig.parameters.items() if p.kind is not p.VAR_POSITIONAL]


def check_keys(node, key: str) -> None:
    """Unknown keys under any `_target_` node -> one line naming the key and the valid ones."""
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if target:
            valid = _target_params(target, key)
            if valid is not None:
                for k in node.keys():
                    if not str(k).startswith("_") and k not in valid:
                        raise ConfigError(f"{key}.{k}: unknown key for {target} "
                                          f"(valid: {', '.join(v for v in valid if v != 'self')})")
        for k in node.keys():
            if not str(k).startswith("_"):
                check_keys(node._get_node(k), f"{key}.{k}")
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_keys(item, f"{key}[{i}]")


def instantiate(node, **kwargs):
    """hydra.utils.instantiate that lets our ConfigError through instead of wrapping it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
