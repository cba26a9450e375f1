"""Hydra resolvers and config checks that run before anything heavy is imported or loaded."""

import functools
import glob
import inspect
import json
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal, Union, get_args, get_origin

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from ethos.errors import ConfigError
from ethos.rundir import run_dir_name, run_dir_of
from ethos.signatures import Keys, Opaque, signatures
from ethos.types import Gt, Le, NonNegativeFloat, NonNegativeInt, PositiveInt

# The configs ship inside the package (package data), so an installed `ethos-train` finds them from any directory
CONF_DIR = Path(__file__).resolve().parent / "conf"


def default_precision() -> str:
    # no NVIDIA device node (nor WSL's): no CUDA, and no 3 s torch import just to learn that, so a bad config
    # fails fast; ETHOS_PROBE_CUDA=1 asks torch anyway
    no_device = not glob.glob("/dev/nvidia[0-9]*") and not os.path.exists("/dev/dxg")
    if no_device and os.environ.get("ETHOS_PROBE_CUDA") != "1":
        return "32-true"
    import torch  # 3 s: only where a GPU may be there to ask about

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def pretrained_tokenizer(pretrained: str | None) -> str | None:
    """`${pretrained_tokenizer:${pretrained}}`: the tokenizer saved beside a pretrained run, or null."""
    return str(run_dir_of(pretrained) / "tokenizer") if pretrained else None


def register_resolvers() -> None:
    for name, fn in (("run_dir", run_dir_name), ("precision", default_precision),
                     ("pretrained_tokenizer", pretrained_tokenizer)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


GROUPS = ("model", "data", "task", "optim", "trainer", "logger", "callbacks")

# The run-level keys of ethos/conf/train.yaml (everything else at the top level is a config group)
RUN_KEYS = {
    "task_name": str, "run_name": str | None, "seed": NonNegativeInt, "resume": Literal["auto", "never"],
    "ckpt_path": str | None, "validate_first": bool, "print_config": bool,
    "pretrained": str | None,
}
# Third-party signatures say `int` where only some ints make sense for us
EXTRA = {
    "lightning.pytorch.Trainer": {
        "max_steps": PositiveInt,  # pretraining is step-based: schedules and the sampler need the length
        "accumulate_grad_batches": PositiveInt, "log_every_n_steps": PositiveInt,
        "gradient_clip_val": NonNegativeFloat | None,
        "val_check_interval": PositiveInt | Annotated[float, Gt(0), Le(1)] | None,
    },
    "lightning.pytorch.callbacks.ModelCheckpoint": {"every_n_train_steps": NonNegativeInt | None},
}


def cache_dir(cfg: DictConfig) -> str | None:
    try:
        return OmegaConf.select(cfg, "paths.cache_dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - no cache without a resolvable paths group (bare compose)
        return None


def target_info(cfg: DictConfig, target: str, key: str):
    """What the config check knows of `target` (ethos.signatures): parameters, modality."""
    return signatures(cache_dir(cfg)).get(target, key)


def describe(t) -> str:
    """An annotation in words: 'an integer > 0', 'one of 'linear', 'cosine'', 'a string or null'."""
    if isinstance(t, Keys):
        return f"a mapping of {', '.join(k for k, _ in t.fields)}"
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        ops = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        bounds = [f"{sym} {getattr(m, op)}" for m in args[1:] for op, sym in ops.items() if hasattr(m, op)]
        return " ".join([describe(args[0]), " and ".join(bounds)]).strip()
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        literals = [a for arg in args if get_origin(arg) is Literal for a in get_args(arg)]
        parts = [describe(Literal[tuple(literals)])] if literals else []
        parts += [describe(a) for a in args if get_origin(a) is not Literal and a is not Opaque]
        return " or ".join(dict.fromkeys(parts))
    if origin in (list, tuple, set, Sequence):
        fixed = origin is tuple and args and args[-1] is not ...
        each = [describe(a) for a in args if a is not ...]
        return ("a list" + (f" of {len(args)}" if fixed else "")
                + (f", each {each[0]}" if each and len(set(each)) == 1 else ""))
    if origin is dict:
        return "a mapping"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    return names.get(t, getattr(t, "__name__", str(t)))


@functools.cache
def _adapter(annotation):
    from pydantic import ConfigDict, TypeAdapter  # pydantic's import is most of a check's time: only when one runs

    # strict JSON mode: no 'abc' -> int or true -> 1 coercion, but ints are numbers and lists are tuples
    return TypeAdapter(annotation, config=ConfigDict(strict=True, arbitrary_types_allowed=True))


def _keys(t):
    """The Keys (a TypedDict, ethos.signatures) in `t` or `t | None`, else None."""
    if get_origin(t) in (Union, types.UnionType):
        args = [a for a in get_args(t) if a is not type(None)]
        t = args[0] if len(args) == 1 else None
    return t if isinstance(t, Keys) else None


def check_value(key: str, value, annotation) -> None:
    """One line naming the key, the value and what is valid, if `value` does not fit `annotation`."""
    from pydantic import ValidationError  # see _adapter

    if annotation is inspect.Parameter.empty:
        return
    keys = _keys(annotation)
    if keys is not None:  # a nested mapping: check and name each of its keys
        if value is None and annotation is not keys:
            return
        if not isinstance(value, dict):
            raise ConfigError(f"{key}={value!r}: must be {describe(keys)}")
        fields = dict(keys.fields)
        for k, v in value.items():
            if k not in fields:
                raise ConfigError(f"{key}.{k}: unknown key (valid: {', '.join(fields)})")
            check_value(f"{key}.{k}", v, fields[k])
        return
    if annotation is Opaque:  # a library class: nothing a config value could be checked against
        return
    try:
        adapter = _adapter(annotation)
    except Exception:  # noqa: BLE001 - an annotation pydantic cannot express: nothing to check
        return
    try:
        adapter.validate_json(json.dumps(value))
    except ValidationError:
        raise ConfigError(f"{key}={value!r}: must be {describe(annotation)}") from None
    except (TypeError, ValueError):  # not JSON-like (cannot come from YAML or the command line)
        return


def _plain(node):
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, (DictConfig, ListConfig)) else node


def check_node(node, key: str, root: DictConfig) -> None:
    """Every `_target_` node under `node`: unknown keys and values that do not fit the signature's types."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            check_node(item, f"{key}[{i}]", root)
        return
    if not isinstance(node, DictConfig):
        return
    target = node.get("_target_") if "_target_" in node else None
    info = target_info(root, target, key) if target else None
    params, open_ended = (info.params, info.open) if info else ({}, True)
    extra = EXTRA.get(target, {})
    for k in node.keys():
        k = str(k)
        if k.startswith("_"):
            continue
        child = node._get_node(k)
        if target and not open_ended and k not in params:
            valid = ", ".join(params)
            raise ConfigError(f"{key}.{k}: unknown key for {target} (valid: {valid})")
        if isinstance(child, DictConfig) and "_target_" in child:
            check_node(child, f"{key}.{k}", root)  # built by Hydra: its own signature applies
            continue
        if k in params or k in extra:
            check_value(f"{key}.{k}", _plain(node[k]), extra.get(k, params.get(k)))
        check_node(child, f"{key}.{k}", root)


def validate(cfg: DictConfig, groups: tuple[str, ...] = GROUPS) -> None:
    """Config checks that need no data: run keys, then the keys and value types of `groups`."""
    for k in cfg.keys():
        if k not in RUN_KEYS and k not in GROUPS and k not in ("paths", "experiment", "debug", "hydra",
                                                               "finetune_after"):
            valid = ", ".join([*GROUPS, *RUN_KEYS])
            raise ConfigError(f"{k}: unknown top-level key (valid: {valid})")
    for k, annotation in RUN_KEYS.items():
        if k in cfg:
            check_value(k, cfg[k], annotation)
    try:
        for group in groups:
            if cfg.get(group):
                check_node(cfg[group], group, cfg)
    finally:  # what was read is kept, also when a value was bad: the next try reports in a second
        signatures(cache_dir(cfg)).save()


def instantiate(node, **kwargs):
    """hydra.utils.instantiate that lets our ConfigError through instead of wrapping it."""
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
