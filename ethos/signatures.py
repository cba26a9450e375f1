"""What the config check needs to know of a `_target_`: its keyword parameters with their types.

Reading a signature means importing the class, and the data modules and the Trainer import Lightning,
torchmetrics and torchvision: about 7 s before a typo could be reported. So what was read is kept in
`<cache dir>/signatures.pkl`, valid for exactly the installed library versions and ethos source files
it was read from. Annotations are stored in a portable form: classes of other libraries become `Opaque`
(no config value is an instance of one), TypedDicts become `Keys`, so loading the cache imports nothing.
"""

import hashlib
import importlib.metadata
import inspect
import os
import pickle
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints

from typing_extensions import is_typeddict  # also knows typing_extensions.TypedDict (Python < 3.12)

from ethos.errors import ConfigError
from ethos.files import atomic_write

PLAIN = (int, float, str, bool, type(None), list, tuple, dict, set, Any)
LIBRARIES = ("torch", "lightning", "datasets", "transformers", "timm", "hydra-core", "pydantic", "torchdata")


class Opaque:
    """Stands for a class of another library in a cached annotation: no YAML value is one of these."""


@dataclass(frozen=True)
class Keys:
    """A TypedDict in a cached annotation: its keys and their (portable) annotations."""

    name: str
    fields: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class Target:
    params: dict[str, Any]  # name -> annotation (inspect.Parameter.empty: none)
    open: bool  # takes **kwargs beyond `params` (unknown keys cannot be reported)
    modality: str | None  # a data module's `modality` class attribute


def portable(t):
    """`t` with library classes replaced by Opaque and TypedDicts by Keys (see the module docstring)."""
    if t is inspect.Parameter.empty or t in PLAIN or t is ...:
        return t
    origin, args = get_origin(t), get_args(t)
    if origin is Annotated:
        return Annotated[(portable(args[0]), *args[1:])]
    if origin is Literal:
        return t
    if origin in (Union, types.UnionType):
        return Union[tuple(portable(a) for a in args)]  # noqa: UP007 - built from a tuple
    if origin in (list, tuple, dict, set):
        return origin[tuple(portable(a) for a in args)] if args else origin
    if origin is Sequence or t is Sequence:
        return list[portable(args[0])] if args else list
    if is_typeddict(t):
        return Keys(t.__name__, tuple((k, portable(v)) for k, v in get_type_hints(t, include_extras=True).items()))
    return Opaque


def read(target: str, key: str) -> Target:
    """Import `target` and read its parameters; a class forwarding **kwargs to its base gets the base's
    too (walking the MRO), so subclasses need no hand-kept signature."""
    from hydra.utils import get_object  # hydra's instantiate machinery: not needed to read a cached signature

    try:
        obj = get_object(target)
    except Exception as e:  # noqa: BLE001 - any import failure is a config error here
        cause = e.__cause__ or e  # Hydra wraps the ImportError in a multi-line message: name the cause
        raise ConfigError(f"{key}._target_={target!r}: cannot be imported ({type(cause).__name__}: "
                          f"{str(cause).splitlines()[0] if str(cause) else ''})") from None
    modality = getattr(obj, "modality", None)
    modality = modality if isinstance(modality, str) else None
    inits = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] if isinstance(obj, type) else [obj]
    params: dict[str, Any] = {}
    for fn in inits:
        try:
            sig = inspect.signature(fn, eval_str=True)
        except (TypeError, ValueError, NameError):
            return Target(params, True, modality)
        for name, p in sig.parameters.items():
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name != "self":
                params.setdefault(name, portable(p.annotation))
        if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
            return Target(params, False, modality)
    return Target(params, True, modality)


def fingerprint() -> str:
    """The installed library versions and every ethos source file's size and mtime."""
    parts = []
    for lib in LIBRARIES:
        try:
            parts.append(f"{lib}={importlib.metadata.version(lib)}")
        except importlib.metadata.PackageNotFoundError:
            parts.append(f"{lib}=-")
    for f in sorted(Path(__file__).parent.rglob("*.py")):
        st = f.stat()
        parts.append(f"{f}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


class Signatures:
    """Targets read once per library/source version and kept on disk; `get` reads what is missing."""

    def __init__(self, cache_dir: str | os.PathLike | None):
        self.path = Path(cache_dir) / "signatures.pkl" if cache_dir else None
        self.key = fingerprint()
        self.targets: dict[str, Target] = {}
        self.dirty = False
        if self.path is not None and self.path.is_file():
            try:
                key, targets = pickle.loads(self.path.read_bytes())
                if key == self.key:
                    self.targets = targets
            except Exception:  # noqa: BLE001 - a broken or old cache is simply rebuilt
                pass

    def get(self, target: str, key: str) -> Target:
        if target not in self.targets:
            self.targets[target] = read(target, key)
            self.dirty = True
        return self.targets[target]

    def save(self) -> None:
        if not self.dirty or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, pickle.dumps((self.key, self.targets)))  # parallel jobs of a sweep write it too
            self.dirty = False
        except OSError:  # a read-only cache dir only costs the import time next run
            pass


_cache: dict[str, Signatures] = {}


def signatures(cache_dir: str | os.PathLike | None) -> Signatures:
    key = str(cache_dir)
    if key not in _cache:
        _cache[key] = Signatures(cache_dir)
    return _cache[key]
