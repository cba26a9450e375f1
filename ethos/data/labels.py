"""Text classification data for fine-tuning: GLUE through HF `datasets`, local files in GLUE's schema, and an
offline task that needs no download.

Every source gives a DatasetDict with a 'train' and a 'validation' split, columns `label` and one text column
(`sentence`) or two (`sentence1`, `sentence2`): GLUE's schema. The reported score is validation accuracy
(GLUE's test labels are hidden). Batches are the tokenizer's (padded per batch by transformers'
DataCollatorWithPadding); training batches come from the step sampler, so a fine-tune resumes exactly too.
"""

import logging
import random
from pathlib import Path

import lightning as L
from datasets import Dataset, DatasetDict, load_dataset
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from transformers import AutoTokenizer, DataCollatorWithPadding
from typing_extensions import TypedDict  # pydantic (the config check) needs it before Python 3.12

from ethos.data.offline import stdlib_docstrings
from ethos.data.sampling import EvalBatchSampler, StepBatchSampler, run_position, split_key
from ethos.errors import ConfigError
from ethos.types import Annotated, Ge, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

GLUE = {  # name -> (text columns, number of classes); the validation split is the reported one
    "sst2": (("sentence",), 2), "cola": (("sentence",), 2), "mrpc": (("sentence1", "sentence2"), 2),
    "rte": (("sentence1", "sentence2"), 2), "qnli": (("question", "sentence"), 2),
    "qqp": (("question1", "question2"), 2), "stsb": None, "mnli": (("premise", "hypothesis"), 3),
}
KINDS = ("module", "class", "function")
READERS = {"csv": ("csv", {}), "tsv": ("csv", {"delimiter": "\t"}), "json": ("json", {}), "jsonl": ("json", {}),
           "parquet": ("parquet", {})}  # file suffix -> datasets builder and its options


class DataFiles(TypedDict, total=False):
    """`data.data_files`: one file per split, in GLUE's schema."""

    train: str | None
    validation: str | None


def docstring_kinds(min_chars: int = 40, seed: int = 0) -> DatasetDict:
    """The offline task: which kind of object (module, class, function) a standard-library docstring
    documents, from its text alone. Classes are balanced by subsampling (chance = majority = 1/3); 10% of
    the source files are held out for validation, so no file's docstrings are on both sides."""
    by_split = {"train": {k: [] for k in KINDS}, "validation": {k: [] for k in KINDS}}
    for rel, kind, doc in stdlib_docstrings(min_chars):
        split = "validation" if random.Random(f"{seed}:{rel}").random() < 0.1 else "train"
        by_split[split][kind].append(doc)
    out = {}
    for split, docs in by_split.items():
        n = min(len(v) for v in docs.values())
        rng = random.Random(f"{seed}:{split}")
        rows = [(t, i) for i, k in enumerate(KINDS) for t in rng.sample(sorted(docs[k]), n)]
        rng.shuffle(rows)
        out[split] = Dataset.from_dict({"sentence": [t for t, _ in rows], "label": [i for _, i in rows]})
    return DatasetDict(out)


class ByKey(TorchDataset):
    """A sampler key (micro-batch, position, index) -> the example at index: labels need no seeding."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key):
        return self.ds[split_key(key)[2]]


class TextClassificationDataModule(L.LightningDataModule):
    """Sentence (pair) classification. `source`: `docstrings` (offline), a GLUE task name (`sst2`, `mrpc`,
    ...; read from `path`, the hub's `nyu-mll/glue` or a local copy of it), or `files` (`data_files` with a
    train and a validation file in GLUE's schema). `tokenizer`: a HF name or path; fine-tuning passes the
    pretrained run's own."""

    modality = "text-classification"

    def __init__(self, source: str = "docstrings", tokenizer: str | None = None, path: str = "nyu-mll/glue",
                 data_files: DataFiles | None = None, text_columns: list[str] | None = None,
                 num_classes: PositiveInt | None = None, seq_len: Annotated[int, Ge(8)] = 128,
                 batch_size: PositiveInt = 16, eval_batch_size: PositiveInt | None = None,
                 num_workers: NonNegativeInt = 0, seed: int = 0):
        super().__init__()
        if source not in ("docstrings", "files", *GLUE) or GLUE.get(source, ()) is None:
            valid = ["docstrings", "files", *(k for k, v in GLUE.items() if v)]
            raise ConfigError(f"data.source={source!r}: valid are {', '.join(valid)}")
        cols, classes = (("sentence",), len(KINDS)) if source == "docstrings" else GLUE.get(source, (None, None))
        self.text_columns = tuple(text_columns or cols or ("sentence",))
        self.num_classes = num_classes or classes
        self.source, self.tokenizer_name, self.path, self.data_files = source, tokenizer, path, data_files
        self.seq_len, self.batch_size = seq_len, batch_size
        self.eval_batch_size, self.num_workers, self.seed = eval_batch_size or batch_size, num_workers, seed
        self.tokenizer, self.splits = None, None
        if source == "files":  # the constructor runs before anything is read
            files = dict(data_files or {})
            if not (files.get("train") and files.get("validation")):
                raise ConfigError(f"data.data_files={files}: source=files needs a train and a validation file")
            if self.num_classes is None:
                raise ConfigError("data.num_classes=null: set it for source=files")
            suffixes = {Path(f).suffix[1:] for f in files.values()}
            if len(suffixes) > 1 or not suffixes <= set(READERS):
                raise ConfigError(f"data.data_files={files}: both files in one format (valid suffixes: "
                                  f"{', '.join(READERS)})")

    def load(self) -> DatasetDict:
        if self.source == "docstrings":  # a fixed benchmark: the run's seed orders batches, it does not redraw
            return docstring_kinds()           # the split (seeds of one study are judged on one validation set)
        if self.source == "files":
            builder, options = READERS[Path(self.data_files["train"]).suffix[1:]]
            return load_dataset(builder, data_files=dict(self.data_files), **options)
        return load_dataset(self.path, self.source)  # the hub's GLUE, or a local copy of its repository

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        if not self.tokenizer_name:
            raise ConfigError("data.tokenizer=null: fine-tuning needs the pretrained run's tokenizer (set by "
                              "pretrained=...) or a HF tokenizer name/path")
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name)
        raw = self.load()
        missing = [c for c in (*self.text_columns, "label") if c not in raw["train"].column_names]
        if missing:
            raise ConfigError(f"data.text_columns={list(self.text_columns)}: the data has no column(s) "
                              f"{missing} (it has {raw['train'].column_names})")

        def encode(batch):
            texts = [batch[c] for c in self.text_columns]
            enc = self.tokenizer(*texts, truncation=True, max_length=self.seq_len)
            return {**enc, "labels": batch["label"]}

        self.splits = {k: raw[k].map(encode, batched=True, remove_columns=raw[k].column_names)
                       for k in ("train", "validation")}
        for k, v in self.splits.items():
            labels = v["labels"]
            if labels and not 0 <= min(labels) <= max(labels) < self.num_classes:
                raise ConfigError(f"data.num_classes={self.num_classes}: the {k} split has labels "
                                  f"{min(labels)}..{max(labels)} (labels must be 0..num_classes-1)")
            counts = [0] * self.num_classes
            for y in labels:
                counts[y] += 1
            log.info(f"data {k}: {len(v)} examples, classes {counts} (majority {max(counts) / len(v):.1%})")

    @property
    def num_train_samples(self) -> int:  # trainer.max_epochs counts passes over these
        return len(self.splits["train"])

    def task_kwargs(self) -> dict:
        return {"vocab_size": len(self.tokenizer), "num_classes": self.num_classes,
                "pad_id": self.tokenizer.pad_token_id or 0}

    def _collate(self):
        return DataCollatorWithPadding(self.tokenizer, return_tensors="pt")

    def train_dataloader(self) -> DataLoader:
        pos = run_position(self.trainer)
        sampler = StepBatchSampler(len(self.splits["train"]), self.batch_size, pos["total"], seed=self.seed,
                                   start=pos["start"], rank=pos["rank"], world_size=pos["world_size"])
        return DataLoader(ByKey(self.splits["train"]), batch_sampler=sampler,
                          collate_fn=self._collate(), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        pos = run_position(self.trainer)
        sampler = EvalBatchSampler(len(self.splits["validation"]), self.eval_batch_size, pos["rank"],
                                   pos["world_size"])
        return DataLoader(ByKey(self.splits["validation"]), batch_sampler=sampler,
                          collate_fn=self._collate(), num_workers=self.num_workers)
