"""Which reader a SOURCE argument names, and what it gives: `open_source(SOURCE).read(layer, parts)` returns one
layer's `AttentionWeights` whatever the checkpoint, one layer in memory at a time.

SOURCE: an ethos run dir / .ckpt (the task rebuilt from its checkpoint), a local directory of (sharded)
safetensors in the HF layout, or a HF repo id (files fetched lazily: config, index, then only the shards that
hold the tensors asked for, or with `ranges` only those tensors' bytes). Each tensor is read on its own, so what
stays resident is the layer's tensors asked for, not the shards' pages.
"""

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub.errors import EntryNotFoundError
from safetensors import safe_open

from ethos.analysis.ethos_runs import EthosSource
from ethos.analysis.layouts import HFSource, layout
from ethos.analysis.readers import FileReader, HubRangeReader, hub_fetch
from ethos.errors import ConfigError, DataUnavailable
from ethos.rundir import run_dir_of

USAGE = "SOURCE: a HF repo id, a directory with config.json and safetensors, or an ethos run dir / .ckpt"


def is_ethos_run(source: str | Path) -> bool:
    """A .ckpt, or a run dir (one with checkpoints/)."""
    path = Path(source).expanduser()
    return path.suffix == ".ckpt" or (path.is_dir() and (path / "checkpoints").is_dir())


def open_source(source: str, revision: str | None = None, dtype=torch.float32, ranges: bool = False):
    """HFSource or EthosSource for a SOURCE argument: an ethos run dir / .ckpt, a local directory, or a hub repo id
    (whole shards, or with `ranges` the attention tensors' bytes only)."""
    path = Path(source).expanduser()
    if is_ethos_run(path):
        return EthosSource(str(path), dtype)
    if path.is_dir():
        return local_source(path, dtype)
    if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return hub_source(source, revision, dtype, ranges)
    raise ConfigError(f"SOURCE={source}: not a directory, .ckpt or hub repo id ({USAGE})")


def local_source(root: Path, dtype=torch.float32) -> HFSource:
    if not (root / "config.json").is_file():
        raise ConfigError(f"{root}: no config.json ({USAGE})")
    return hf_source(str(root), lambda filename: root / filename, dtype)


def hub_source(repo: str, revision: str | None = None, dtype=torch.float32, ranges: bool = False) -> HFSource:
    """A repo on the hub: config.json and the index first, then each shard when a tensor in it is first read,
    or with `ranges` only the bytes of the tensors read (HubRangeReader)."""
    return hf_source(repo, hub_fetch(repo, revision), dtype, ranges=ranges, revision=revision)


def hf_source(name: str, fetch: Callable[[str], Path], dtype=torch.float32, ranges: bool = False,
              revision: str | None = None) -> HFSource:
    """The checkpoint whose files `fetch` gives (config.json, the index; with `ranges`, `name` is a hub repo whose
    safetensors are read by byte ranges instead of fetched)."""
    config = json.loads(Path(fetch("config.json")).read_text())
    layout(config, name)  # before any weight is fetched
    try:
        weight_map = json.loads(Path(fetch("model.safetensors.index.json")).read_text())["weight_map"]
    except (FileNotFoundError, EntryNotFoundError, DataUnavailable):
        try:
            path = fetch("model.safetensors")
        except EntryNotFoundError:
            path = None
        if path is None or not Path(path).is_file():
            raise ConfigError(f"{name}: neither model.safetensors.index.json nor model.safetensors there") from None
        with safe_open(str(path), framework="pt") as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    block = (config.get("quantization_config") or {}).get("weight_block_size") or (128, 128)
    reader = (HubRangeReader(weight_map, name, revision, block, dtype) if ranges
              else FileReader(weight_map, fetch, block, dtype))
    return HFSource(name, config, reader)


def open_tokenizer(source: str, revision: str | None = None):
    """The tokenizer that goes with SOURCE (a `tokenizers.Tokenizer` from its tokenizer.json): an ethos run's
    tokenizer/ dir, a local directory's own, or the hub repo's; None where there is none (ids stay unnamed)."""
    from tokenizers import Tokenizer

    path = Path(source).expanduser()
    if is_ethos_run(path):
        file = run_dir_of(path) / "tokenizer" / "tokenizer.json"
    elif path.is_dir():
        file = path / "tokenizer.json"
    elif path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return None
    else:
        try:
            file = Path(hub_fetch(source, revision)("tokenizer.json"))
        except (EntryNotFoundError, DataUnavailable, ConfigError, OSError):
            return None
    return Tokenizer.from_file(str(file)) if file.is_file() else None
