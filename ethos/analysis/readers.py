"""Named tensors of a checkpoint's safetensors files, one tensor per read, FP8 block-scaled weights dequantised.

- FileReader: files on disk (a local directory, or hub files downloaded on first use by `hub_fetch`); each read
  opens its file with `safe_open` and closes it, so no mapped shard stays resident.
- HubRangeReader: files on the hub read by byte ranges through huggingface_hub (each file's tensor table from
  `parse_safetensors_file_metadata`, the bytes by ranged reads of `HfFileSystem`): only the tensors asked for
  are fetched, not the shards around them (DeepSeek-V3 keeps attention and experts in the same shards).
"""

from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import torch
from huggingface_hub import constants
from huggingface_hub.errors import (
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors import safe_open
from torch import Tensor

from ethos.analysis.fp8 import FP8, dequantize_fp8
from ethos.errors import ConfigError, DataUnavailable
from ethos.hub import hub_reachable

# safetensors' dtype names (its format spec) -> torch
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class TensorReader:
    """`reader[name]`: the tensor in `dtype`, an FP8 weight dequantised with its `<name>_scale_inv` (which may sit
    in another file than its weight). Subclasses say how a tensor's stored value is read (`raw`)."""

    def __init__(self, weight_map: dict[str, str], block=(128, 128), dtype: torch.dtype = torch.float32):
        self.weight_map, self.block, self.dtype = weight_map, tuple(block), dtype

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def raw(self, name: str) -> Tensor:
        raise NotImplementedError

    def __getitem__(self, name: str) -> Tensor:
        t = self.raw(name)
        if t.dtype in FP8:
            scale = name + "_scale_inv"
            if scale not in self.weight_map:
                raise ConfigError(f"{name}: an FP8 weight without {scale} (only block-scaled FP8 is supported)")
            return dequantize_fp8(t, self.raw(scale), self.block, self.dtype)
        return t.to(self.dtype)


class FileReader(TensorReader):
    """Safetensors files on disk; `fetch(filename)` gives a file's local path (a path join, or a hub download on
    first use)."""

    def __init__(self, weight_map: dict[str, str], fetch: Callable[[str], Path], block=(128, 128),
                 dtype: torch.dtype = torch.float32):
        super().__init__(weight_map, block, dtype)
        self.fetch = fetch

    def raw(self, name: str) -> Tensor:
        with safe_open(str(self.fetch(self.weight_map[name])), framework="pt") as f:  # torch, never numpy
            return f.get_tensor(name)


class HubRangeReader(TensorReader):
    """Safetensors files of a hub repo, read by byte ranges: per file, its tensor table once (dtype, shape and
    data_offsets of each tensor), then only the bytes of the tensors asked for."""

    def __init__(self, weight_map: dict[str, str], repo: str, revision: str | None = None, block=(128, 128),
                 dtype: torch.dtype = torch.float32):
        super().__init__(weight_map, block, dtype)
        self.repo, self.revision = repo, revision
        self.fs = huggingface_hub.HfFileSystem()
        self.files = {}

    def file(self, filename: str):
        """(the file's tensor table: SafetensorsFileMetadata.tensors, the file open for ranged reads, where its
        data start), each got once."""
        if filename not in self.files:
            tensors = huggingface_hub.parse_safetensors_file_metadata(self.repo, filename,
                                                                      revision=self.revision).tensors
            # cache_type "none": each read is one range request for exactly its bytes, no read-ahead
            f = self.fs.open(f"{self.repo}/{filename}", "rb", revision=self.revision, cache_type="none")
            # data_offsets count from the end of the header, and the data fill the file to its end (safetensors
            # allows no holes): the header ends at the file's size less the last offset
            self.files[filename] = tensors, f, f.size - max((t.data_offsets[1] for t in tensors.values()), default=0)
        return self.files[filename]

    def raw(self, name: str) -> Tensor:
        filename = self.weight_map[name]
        tensors, f, start = self.file(filename)
        info = tensors[name]
        a, b = info.data_offsets
        dtype = SAFETENSORS_DTYPES[info.dtype]
        if a == b:
            return torch.empty(info.shape, dtype=dtype)
        f.seek(start + a)
        data = f.read(b - a)
        if len(data) != b - a:
            raise DataUnavailable(f"{self.repo}: {filename}: the hub ignored a byte range request; run without "
                                  "--ranges")
        return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info.shape)  # a copy torch may own


def hub_fetch(repo: str, revision: str | None = None) -> Callable[[str], Path]:
    """fetch(filename) -> the local path of a file of a hub repo, downloaded (or taken from the HF cache) on its
    first use. Without a connection only the HF cache is read, at once, instead of minutes of HTTP retries."""
    cached: dict[str, Path] = {}
    cache_only = not constants.HF_HUB_OFFLINE and not hub_reachable()

    def fetch(filename: str) -> Path:
        if filename not in cached:
            try:
                cached[filename] = Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision,
                                                                        etag_timeout=5,
                                                                        local_files_only=cache_only))
            except (RepositoryNotFoundError, RevisionNotFoundError) as e:
                raise ConfigError(f"{repo}: no such repo or revision on the hub ({type(e).__name__})") from None
            except RemoteEntryNotFoundError:
                raise  # no such file in the repo: the caller decides (no index -> one model.safetensors)
            except LocalEntryNotFoundError:
                raise DataUnavailable(
                    f"{repo}: the hub cannot be reached and {filename} is not in the HF cache; pass a local copy of "
                    f"the repo as SOURCE (a directory with config.json and safetensors, e.g. from "
                    f"`hf download {repo}` on a machine with network)") from None
            except OSError as e:  # connection errors
                raise DataUnavailable(f"{repo}: the hub cannot be reached ({type(e).__name__}); pass a local "
                                      "copy of the repo (config.json + safetensors) as SOURCE") from None
        return cached[filename]

    return fetch
