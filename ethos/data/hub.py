"""Text from the Hugging Face hub (`data=wiki`, `data=wikitext103`) or from local files (`data=text_files`).

Everything goes through `datasets.load_dataset`. Hub modules take `path` (default: the hub name) so a
local copy in the hub layout (its README.md with the `configs:` block plus `<name>/<split>-*.parquet`,
e.g. from `huggingface-cli download --repo-type dataset ... --local-dir DIR`) is read by the very
same call. Without network they fail fast, in one line, saying how to point at local data.
"""

import logging
import os
from glob import glob
from pathlib import Path
from typing import Literal

from datasets import Dataset, DatasetDict, IterableDatasetDict, load_dataset

from ethos.data.offline import python_docs_corpus
from ethos.data.text import TextDataModule
from ethos.errors import ConfigError, DataUnavailable  # noqa: F401  (re-exported for callers)
from ethos.hub import hub_reachable

log = logging.getLogger(__name__)

FORMATS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def hub_offline() -> bool:
    flags = (os.environ.get(k, "").upper() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "ON", "YES", "TRUE") for f in flags)


def _unavailable(path: str, name: str | None, why: str) -> DataUnavailable:
    return DataUnavailable(
        f"data.path={path!r} (config {name!r}): dataset could not be reached ({why}); point at a local copy: "
        f"data.path=<dir in the hub layout>, or data=text_files data.data_files=<files>, or a populated "
        f"HF cache with HF_DATASETS_OFFLINE=1")


class HubTextDataModule(TextDataModule):
    """A hub text dataset: `load_dataset(path, name)`; its `text_column` is the document text."""

    supports_streaming = True
    default_path: str = ""
    default_name: str | None = None

    def __init__(self, *args, path: str | None = None, name: str | None = None, text_column: str = "text",
                 revision: str | None = None, offline: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.path, self.name = path or self.default_path, name or self.default_name
        self.text_column, self.revision, self.offline = text_column, revision, offline

    def fingerprint(self) -> dict:
        # the path is part of it: a partial local copy must not share the full dataset's cache entry
        fp = {**super().fingerprint(), "path": self.path, "name": self.name, "text_column": self.text_column,
              "revision": self.revision}
        return {**fp, "offline": True} if self.offline else fp

    def load_documents(self, streaming: bool = False) -> DatasetDict:
        if self.offline:  # debug=smoke: the offline corpus stands in, so a recipe runs without the hub
            docs = Dataset.from_dict({"text": python_docs_corpus()})
            return IterableDatasetDict(train=docs.to_iterable_dataset()) if streaming else DatasetDict(train=docs)
        local = Path(self.path).exists()
        if not local and not hub_offline() and not hub_reachable():
            raise _unavailable(self.path, self.name, "no connection to the hub within 3 s")
        kwargs = {"name": self.name}
        if local and not (Path(self.path) / "README.md").exists() and (Path(self.path) / str(self.name)).is_dir():
            kwargs = {"data_dir": self.name}  # a bare copy of <name>/*.parquet without the hub README
        try:
            if not streaming:
                kwargs["num_proc"] = self.num_proc
            docs = load_dataset(self.path, revision=self.revision, streaming=streaming, **kwargs)
        except ConnectionError as e:  # offline mode and nothing cached, or the hub went away
            raise _unavailable(self.path, self.name, str(e).splitlines()[0][:200]) from None
        return select_text(docs, self.text_column, f"{self.path}:{self.name}")


def select_text(docs, column: str, what: str):
    """Keep only the text column, renamed 'text' (ids, urls, titles are not trained on)."""
    first = next(iter(docs.values()))
    cols = first.column_names
    if cols is not None and column not in cols:
        raise ConfigError(f"data.text_column={column!r}: not a column of {what} (valid: {', '.join(cols)})")
    docs = docs.select_columns([column])
    return docs.rename_column(column, "text") if column != "text" else docs


class WikipediaDataModule(HubTextDataModule):
    """`data=wiki`: wikimedia/wikipedia (one article per row; no validation split: one is held out)."""

    default_path, default_name = "wikimedia/wikipedia", "20231101.en"


class C4DataModule(HubTextDataModule):
    """`data=c4`: allenai/c4 (English, ~365M documents, with a validation split): streamed."""

    default_path, default_name = "allenai/c4", "en"


class WikiText103DataModule(HubTextDataModule):
    """`data=wikitext103`: Salesforce/wikitext, one line per row, with its own validation split."""

    default_path, default_name = "Salesforce/wikitext", "wikitext-103-raw-v1"


class TextFilesDataModule(TextDataModule):
    """`data=text_files`: local .txt (one document per line/paragraph/file), .jsonl or .parquet files.

    The file list is checked in the constructor (globs expanded, nothing read); empty files are
    skipped and counted when the data is loaded.
    """

    supports_streaming = True

    def __init__(self, *args, data_files: str | list[str] | None = None, text_column: str = "text",
                 sample_by: Literal["line", "paragraph", "document"] = "line", **kwargs):
        super().__init__(*args, **kwargs)
        self.data_files, self.text_column, self.sample_by = data_files, text_column, sample_by
        self.files = resolve_files(data_files) if data_files is not None else None

    def fingerprint(self) -> dict:
        # the files' names, sizes and mtimes: editing a file makes a new cache entry
        files = [(f, os.path.getsize(f), int(os.path.getmtime(f))) for f in self.files or []]
        return {**super().fingerprint(), "files": files, "text_column": self.text_column,
                "sample_by": self.sample_by}

    def load_documents(self, streaming: bool = False) -> DatasetDict:
        if self.files is None:
            raise ConfigError("data.data_files=null: set it to a path, glob or list of .txt, .jsonl or "
                              ".parquet files, e.g. data.data_files='corpus/*.txt'")
        files = [f for f in self.files if os.path.getsize(f) > 0]
        if len(files) < len(self.files):
            skipped = sorted(set(self.files) - set(files))
            log.warning(f"data: skipped {len(skipped)} empty file(s): {', '.join(skipped[:5])}"
                        + (" ..." if len(skipped) > 5 else ""))
        if not files:
            raise ConfigError(f"data.data_files={self.data_files!r}: every matching file is empty")
        self.skipped_files = len(self.files) - len(files)
        fmt = FORMATS[Path(files[0]).suffix.lower()]
        extra = {"sample_by": self.sample_by} if fmt == "text" else {}
        if not streaming:
            extra["num_proc"] = self.num_proc
        docs = load_dataset(fmt, data_files={"train": files}, streaming=streaming, **extra)
        return select_text(docs, self.text_column, str(self.data_files))


def resolve_files(data_files: str | list[str]) -> list[str]:
    """Expand globs; every pattern must match, and all files must share one known format."""
    patterns = [data_files] if isinstance(data_files, str) else list(data_files)
    valid = "a path, glob or list of .txt, .jsonl/.json or .parquet files"
    files: list[str] = []
    for p in patterns:
        found = sorted(glob(os.path.expanduser(str(p)), recursive=True))
        found = [f for f in found if os.path.isfile(f)]
        if not found:
            raise ConfigError(f"data.data_files={data_files!r}: no file matches {p!r}; valid: {valid}")
        files += found
    kinds = {FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in kinds or len(kinds) > 1:
        bad = sorted({Path(f).suffix or f for f in files})
        raise ConfigError(f"data.data_files={data_files!r}: file types {', '.join(bad)}; valid: {valid}, "
                          "all of one format")
    return list(dict.fromkeys(files))
