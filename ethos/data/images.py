"""Image classification data modules: a source (image_sources.py) -> timm transforms, seeded
(image_transforms.py) -> step-indexed batches. A local ImageFolder (`data=image_folder`), a HF dataset
(`data=cifar10`, ...), the ImageNet-100 subset, and the generated shapes set (`data=shapes`, shapes.py).
"""

import logging
from pathlib import Path
from typing import Annotated

import lightning as L
from torch.utils.data import DataLoader

from ethos.data.image_sources import FolderSource, HFSource, ImageSet, split_folder
from ethos.data.image_transforms import Collate, Interpolation, patch_timm_posterize
from ethos.data.sampling import EvalBatchSampler, StepBatchSampler, run_position
from ethos.data.shapes import SHAPES, generate
from ethos.errors import ConfigError
from ethos.types import Gt, Le, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Probability

log = logging.getLogger(__name__)


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
        # timm takes about a second to import: only the loaders need it
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
        # timm takes about a second to import: only the loaders need it
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


class ShapesDataModule(ImageDataModule):
    """`data=shapes`: the offline default image set (ethos/data/shapes.py), generated on first use into the
    cache and read as an ImageFolder."""

    def __init__(self, num_classes: int = 6, train_per_class: int = 300, val_per_class: int = 60,
                 generator_seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        if not 2 <= num_classes <= len(SHAPES):
            raise ConfigError(f"data.num_classes={num_classes}: must be between 2 and {len(SHAPES)}")
        if train_per_class < 1 or val_per_class < 1:
            raise ConfigError("data.train_per_class / data.val_per_class: must be positive")
        self.n_classes, self.train_per_class, self.val_per_class = num_classes, train_per_class, val_per_class
        self.generator_seed = generator_seed

    @property
    def root(self) -> Path:
        return self.cache_dir / (f"shapes-{self.img_size}px-{self.n_classes}c-{self.train_per_class}-"
                                 f"{self.val_per_class}-s{self.generator_seed}")

    def prepare_data(self) -> None:
        if not self.root.is_dir():
            self.root.parent.mkdir(parents=True, exist_ok=True)
            generate(self.root, self.n_classes, self.train_per_class, self.val_per_class, self.img_size,
                     self.generator_seed)

    def sources(self) -> tuple:
        return FolderSource(self.root / "train"), FolderSource(self.root / "val")


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
        return ShapesDataModule(cache_dir=str(self.cache_dir / "offline_shapes"), img_size=self.img_size)

    def load(self):
        # datasets takes about a second to import: only a HF dataset needs it, not a folder
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
        # timm takes about a second to import: only a HF ImageNet source needs it
        from timm.data import ImageNetInfo

        synsets = ImageNetInfo("imagenet-1k").label_names()  # the 1000 wnids, sorted = label order
        pos = {w: i for i, w in enumerate(synsets)}
        unknown = [c for c in self.classes if c not in pos]
        if unknown:
            raise ConfigError(f"data.classes: {unknown[0]!r} is not an ImageNet-1k synset")
        label_map = {pos[c]: k for k, c in enumerate(self.classes)}
        train, val = self.splits()
        return tuple(HFSource(ds, self.image_key, self.label_key, label_map, self.classes) for ds in (train, val))
