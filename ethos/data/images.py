"""Image pipeline: a source of (encoded image, label) -> timm transforms -> step-indexed batches.

Sources: a local ImageFolder (torchvision's class discovery) or a HF dataset (`load_dataset`, real
hub names by default, `path=` a local copy in the same layout). Both hand back undecoded files /
bytes; decoding happens in `ImageSet`, where an unreadable image is replaced by the next readable one
(deterministic: index i -> i+1 -> ...) and counted; the count travels in the batch (`skipped`) so the
task logs it as `train/skipped_images` / `val/skipped_images`. Validation drops replaced items instead
of scoring a substitute twice. A run never stops mid-epoch on a bad file.

Augmentation is seeded per item from (seed, micro-batch id, index), and mixup per micro-batch, so a
resumed run sees exactly the images an uninterrupted one would (the loader uses the same
StepBatchSampler as text). The index of a sample identifies its position in the global batch (no
sample repeats within one), so augmentation also differs across ranks and does not depend on the
world size. Mixup cannot: timm pairs the images of one micro-batch (the batch and its flip), so a
process's pairs depend on its micro-batch; it is seeded by (micro-batch id, this rank's first
position), so ranks draw different mixing factors.
"""

import io
import logging
import random
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ethos.data.sampling import EvalBatchSampler, StepBatchSampler, run_position, split_key
from ethos.errors import ConfigError
from ethos.types import Gt, Le, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 64  # this many unreadable files in a row: the data is broken, not a few files
Interpolation = Literal["bicubic", "bilinear", "nearest", "box", "hamming", "lanczos", "random"]  # timm's


def _mix(*xs: int) -> int:
    """A 63-bit seed from integers (stable across processes, unlike hash() of str)."""
    h = 0x9E3779B97F4A7C15
    for x in xs:
        h = ((h ^ (int(x) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


@contextmanager
def seeded(seed: int):
    """Seed python, numpy and torch (what timm's transforms and Mixup draw from), then restore them:
    with num_workers=0 this runs in the training process and must not disturb its RNG streams."""
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    # the CPU generator only: torch.manual_seed also queues a lazy CUDA seed, which records a stack
    # trace per call (half of this loader's time per image); transforms draw from the CPU one
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def decode(data) -> Image.Image:
    """A path, bytes or HF `{"bytes", "path"}` record -> fully decoded RGB image (raises if unreadable)."""
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()  # decode now: truncated files fail here, inside our try, not later in a transform
    return img.convert("RGB")


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """timm's RandAugment asks for 0 bits at high magnitudes ('Posterize', 'PosterizeIncreasing'):
    Pillow >= 13 raises on that, so one image in a few hundred would crash the loader. 0 bits kept
    is a black image, which is what older Pillow returned."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    from timm.data import auto_augment

    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        auto_augment.NAME_TO_OP[name] = _posterize


# -- sources: __len__, raw(i) (undecoded), labels (list[int]), classes (list[str]) -----------------
class FolderSource:
    """ImageFolder layout root/<class>/<image>; `classes` restricts (and orders) the class folders."""

    def __init__(self, root: str | Path, classes: list[str] | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"image folder {root}: no such directory")
        if classes is None:
            classes, _ = find_classes(str(root))
        missing = [c for c in classes if not (root / c).is_dir()]
        if missing:
            raise ConfigError(f"image folder {root}: {len(missing)} class folders missing "
                              f"(e.g. {', '.join(missing[:3])})")
        self.classes = sorted(classes)
        samples = make_dataset(str(root), {c: i for i, c in enumerate(self.classes)}, IMG_EXTENSIONS)
        self.paths = [p for p, _ in samples]
        self.labels = [y for _, y in samples]

    def __len__(self) -> int:
        return len(self.paths)

    def raw(self, i: int):
        return self.paths[i]


class HFSource:
    """A HF dataset split with an image column (kept undecoded) and an integer label column.
    `label_map` keeps only the listed original labels and renumbers them (class subsets)."""

    def __init__(self, ds, image_key: str, label_key: str, label_map: dict[int, int] | None = None,
                 classes: list[str] | None = None):
        from datasets import ClassLabel
        from datasets import Image as HFImage

        for key in (image_key, label_key):
            if key not in ds.column_names:
                raise ConfigError(f"data: column {key!r} not in the dataset (columns: {', '.join(ds.column_names)})")
        self.ds = ds.cast_column(image_key, HFImage(decode=False)).select_columns([image_key])
        self.image_key = image_key
        labels = list(ds[label_key])
        feat = ds.features[label_key]
        names = classes or (feat.names if isinstance(feat, ClassLabel) else [str(i) for i in range(max(labels) + 1)])
        if label_map is None:
            self.index, self.labels, self.classes = None, labels, names
        else:
            self.index = [i for i, y in enumerate(labels) if y in label_map]
            self.labels = [label_map[labels[i]] for i in self.index]
            self.classes = names

    def __len__(self) -> int:
        return len(self.labels)

    def raw(self, i: int):
        return self.ds[i if self.index is None else self.index[i]][self.image_key]


class Subset:
    """Some indices of a source (a validation split carved out of a train folder)."""

    def __init__(self, source, indices: list[int]):
        self.source, self.indices, self.classes = source, indices, source.classes
        self.labels = [source.labels[i] for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, i: int):
        return self.source.raw(self.indices[i])


class ImageSet(Dataset):
    """Decodes and transforms; keys are (micro-batch id, index) from the step-indexed samplers."""

    def __init__(self, source, transform, seed: int = 0, train: bool = True):
        self.source, self.transform, self.seed, self.train = source, transform, seed, train

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key) -> dict:
        b, pos, i = split_key(key)
        n = len(self.source)
        for k in range(min(n, MAX_CONSECUTIVE_BAD)):
            j = (i + k) % n
            try:
                img = decode(self.source.raw(j))
                break
            except Exception as e:  # noqa: BLE001 - any decoder error means "unreadable"
                where = self.source.raw(j)
                where = where if isinstance(where, str) else (where or {}).get("path") or "<bytes>"
                log.warning(f"skipping unreadable image #{j} ({where}): {type(e).__name__}: {e}")
        else:
            raise RuntimeError(f"{MAX_CONSECUTIVE_BAD} unreadable images in a row from #{i}: check the data")
        if self.train:
            with seeded(_mix(self.seed, b, i)):
                x = self.transform(img)
        else:
            x = self.transform(img)
        return {"image": x, "label": self.source.labels[j], "skipped": k, "batch_idx": b, "batch_pos": pos}


class Collate:
    """Stack a batch; train: optional timm Mixup/CutMix seeded by the micro-batch id; eval: drop
    replaced items. `skipped` = unreadable files met while building this batch."""

    def __init__(self, train: bool, mixup=None, seed: int = 0):
        self.train, self.mixup, self.seed = train, mixup, seed

    def __call__(self, items: list[dict]) -> dict:
        skipped = sum(1 for it in items if it["skipped"])
        if not self.train:
            items = [it for it in items if not it["skipped"]]
        if not items:
            return {"image": torch.zeros(0), "label": torch.zeros(0, dtype=torch.long), "skipped": skipped}
        x = torch.stack([it["image"] for it in items])
        y = torch.tensor([it["label"] for it in items], dtype=torch.long)
        out = {"image": x, "label": y, "skipped": skipped}
        if self.train and self.mixup is not None:
            first = max(0, items[0].get("batch_pos", 0))  # this rank's first position in the global batch
            with seeded(_mix(self.seed, items[0]["batch_idx"], 1 << 32, first)):
                out["image"], out["target"] = self.mixup(x, y)
        return out


class ImageDataModule(L.LightningDataModule):
    """Base for image classification data. Subclasses implement `sources()` -> (train, val)."""

    modality = "image"

    def __init__(self, cache_dir: str, img_size: PositiveInt = 224, batch_size: PositiveInt = 64,
                 eval_batch_size: PositiveInt | None = None, in_chans: PositiveInt = 3,
                 scale: tuple[Probability, Probability] = (0.08, 1.0),
                 hflip: Probability = 0.5, auto_augment: str | None = None, color_jitter: NonNegativeFloat = 0.0,
                 re_prob: Probability = 0.0, interpolation: Interpolation = "bicubic",
                 crop_pct: Annotated[float, Gt(0), Le(1)] = 0.875, mean: tuple[float, ...] = (0.485, 0.456, 0.406),
                 std: tuple[PositiveFloat, ...] = (0.229, 0.224, 0.225), mixup: NonNegativeFloat = 0.0,
                 cutmix: NonNegativeFloat = 0.0, num_workers: NonNegativeInt = 0, seed: int = 0):
        super().__init__()
        if (mixup > 0 or cutmix > 0) and batch_size % 2:
            raise ConfigError(f"data.batch_size={batch_size}: mixup/cutmix pair images, use an even batch")
        if not (0 < scale[0] <= scale[1]):
            raise ConfigError(f"data.scale={list(scale)}: need 0 < min <= max <= 1")
        self.cache_dir, self.img_size, self.in_chans = Path(cache_dir), img_size, in_chans
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.aug = {"scale": tuple(scale), "hflip": hflip, "auto_augment": auto_augment,
                    "color_jitter": color_jitter, "re_prob": re_prob}
        self.interpolation, self.crop_pct = interpolation, crop_pct
        self.mean, self.std = tuple(mean), tuple(std)
        self.mixup_alpha, self.cutmix_alpha = mixup, cutmix
        self.num_workers, self.seed = num_workers, seed
        self.train_source = self.val_source = None

    # -- subclasses ------------------------------------------------------------------------------
    def sources(self) -> tuple:
        raise NotImplementedError

    # -- pipeline --------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_source is not None:
            return
        self.train_source, self.val_source = self.sources()
        if len(self.train_source.classes) < 2:
            raise ConfigError(f"data: {len(self.train_source.classes)} class found, need at least 2")
        for name, src in (("train", self.train_source), ("validation", self.val_source)):
            log.info(f"data {name}: {len(src)} images, {len(src.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.train_source.classes)

    @property
    def num_train_samples(self) -> int:  # trainer.max_epochs counts passes over these
        return len(self.train_source)

    def task_kwargs(self) -> dict:
        return {"num_classes": self.num_classes, "img_size": self.img_size, "in_chans": self.in_chans}

    def transforms(self, train: bool):
        from timm.data import create_transform, resolve_data_config

        patch_timm_posterize()
        cfg = resolve_data_config({"input_size": (self.in_chans, self.img_size, self.img_size),
                                   "interpolation": self.interpolation, "crop_pct": self.crop_pct,
                                   "mean": self.mean, "std": self.std})
        if train:
            return create_transform(cfg["input_size"], is_training=True, interpolation=cfg["interpolation"],
                                    mean=cfg["mean"], std=cfg["std"], **self.aug)
        return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                                mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"])

    def make_mixup(self):
        if self.mixup_alpha <= 0 and self.cutmix_alpha <= 0:
            return None
        from timm.data import Mixup

        # mixed one-hot targets; the task smooths them (task.label_smoothing): the same targets as smoothing here
        return Mixup(mixup_alpha=self.mixup_alpha, cutmix_alpha=self.cutmix_alpha, label_smoothing=0.0,
                     num_classes=self.num_classes)

    def train_dataloader(self) -> DataLoader:
        pos = run_position(self.trainer)
        sampler = StepBatchSampler(len(self.train_source), self.batch_size, pos["total"], seed=self.seed,
                                   start=pos["start"], rank=pos["rank"], world_size=pos["world_size"])
        ds = ImageSet(self.train_source, self.transforms(True), self.seed, train=True)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collate(True, self.make_mixup(), self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        pos = run_position(self.trainer)
        sampler = EvalBatchSampler(len(self.val_source), self.eval_batch_size, pos["rank"], pos["world_size"])
        ds = ImageSet(self.val_source, self.transforms(False), self.seed, train=False)
        return DataLoader(ds, batch_sampler=sampler, collate_fn=Collate(False), num_workers=self.num_workers)


def split_folder(source, val_fraction: float, seed: int) -> tuple:
    """Deterministic train/val split of one folder (when it has no separate val folder)."""
    perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(perm) * val_fraction))
    return Subset(source, sorted(perm[n_val:])), Subset(source, sorted(perm[:n_val]))


class ImageFolderDataModule(ImageDataModule):
    """`data=image_folder`: root/<train_dir>/<class>/*.jpg and root/<val_dir>/<class>/*; with no val
    folder, `val_fraction` of the train images (seeded) are held out."""

    def __init__(self, root: str, train_dir: str = "train", val_dir: str | None = "val",
                 val_fraction: float = 0.05, classes: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction={val_fraction}: must be in (0, 1)")
        self.root, self.train_dir, self.val_dir = Path(root), train_dir, val_dir
        self.val_fraction, self.classes = val_fraction, list(classes) if classes else None

    def sources(self) -> tuple:
        train = FolderSource(self.root / self.train_dir, self.classes)
        if self.val_dir and (self.root / self.val_dir).is_dir():
            return train, FolderSource(self.root / self.val_dir, train.classes)
        return split_folder(train, self.val_fraction, self.seed)


class HFImageDataModule(ImageDataModule):
    """A HF image dataset: `load_dataset(path, name, data_dir=..., revision=...)`, columns
    `image_key` / `label_key`. `path` may be a hub name or a local copy in the same layout. `offline`
    (debug=smoke): generated shapes at the same image size stand in, so a recipe runs without the hub."""

    def __init__(self, path: str, name: str | None = None, data_dir: str | None = None,
                 revision: str | None = None, train_split: str = "train", val_split: str = "validation",
                 image_key: str = "image", label_key: str = "label", offline: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.path, self.name, self.data_dir, self.revision = path, name, data_dir, revision
        self.train_split, self.val_split = train_split, val_split
        self.image_key, self.label_key, self.offline = image_key, label_key, offline

    def stand_in(self):
        from ethos.data.shapes import ShapesDataModule

        return ShapesDataModule(cache_dir=str(self.cache_dir / "offline_shapes"), img_size=self.img_size)

    def load(self):
        from datasets import load_dataset

        local = Path(self.path).exists()
        # a hub revision means nothing for a local copy (and datasets rejects it there)
        revision = None if local else self.revision
        return load_dataset(self.path, self.name, data_dir=self.data_dir, revision=revision,
                            cache_dir=str(self.cache_dir / "hf"))

    def prepare_data(self) -> None:
        if self.offline:
            return self.stand_in().prepare_data()
        self.load()  # download + arrow conversion once, on rank 0

    def splits(self) -> tuple:
        dd = self.load()
        for split in (self.train_split, self.val_split):
            if split not in dd:
                raise ConfigError(f"data: split {split!r} not in {self.path} (splits: {', '.join(dd)})")
        return dd[self.train_split], dd[self.val_split]

    def sources(self) -> tuple:
        if self.offline:
            return self.stand_in().sources()
        train, val = self.splits()
        return (HFSource(train, self.image_key, self.label_key), HFSource(val, self.image_key, self.label_key))


class ImageNet100DataModule(HFImageDataModule):
    """`data=imagenet100`: the 100-class subset of ImageNet-1k (CMC's list, `classes`).

    `path` is a local ImageFolder root (<root>/train/<wnid>/, <root>/val/<wnid>/) or a HF dataset with
    ImageNet-1k's integer labels (`ILSVRC/imagenet-1k`: label i is the i-th synset in sorted order).
    Classes are numbered in sorted-wnid order either way, so both sources give the same labels.
    """

    def __init__(self, classes: list[str], train_dir: str = "train", val_dir: str = "val", **kwargs):
        super().__init__(**kwargs)
        if len(set(classes)) != len(classes) or len(classes) < 2:
            raise ConfigError(f"data.classes: need at least 2 distinct synsets, got {len(set(classes))}")
        self.classes, self.train_dir, self.val_dir = sorted(classes), train_dir, val_dir

    def prepare_data(self) -> None:
        if self.offline or not (Path(self.path) / self.train_dir).is_dir():
            super().prepare_data()

    def sources(self) -> tuple:
        if self.offline:
            return super().sources()
        root = Path(self.path)
        if (root / self.train_dir).is_dir():
            return FolderSource(root / self.train_dir, self.classes), FolderSource(root / self.val_dir, self.classes)
        from timm.data import ImageNetInfo

        synsets = ImageNetInfo("imagenet-1k").label_names()  # the 1000 wnids, sorted = label order
        pos = {w: i for i, w in enumerate(synsets)}
        unknown = [c for c in self.classes if c not in pos]
        if unknown:
            raise ConfigError(f"data.classes: {unknown[0]!r} is not an ImageNet-1k synset")
        label_map = {pos[c]: k for k, c in enumerate(self.classes)}
        train, val = self.splits()
        return tuple(HFSource(ds, self.image_key, self.label_key, label_map, self.classes) for ds in (train, val))
