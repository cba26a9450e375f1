"""Where images come from and how one is read: sources of (undecoded image, label) and `ImageSet`, which
decodes and transforms them.

Sources: a local ImageFolder (torchvision's class discovery) or a HF dataset (`load_dataset`, real
hub names by default, `path=` a local copy in the same layout). Both hand back undecoded files /
bytes; decoding happens in `ImageSet`, where an unreadable image is replaced by the next readable one
(deterministic: index i -> i+1 -> ...) and counted; the count travels in the batch (`skipped`) so the
task logs it as `train/skipped_images` / `val/skipped_images`. Validation drops replaced items instead
of scoring a substitute twice. A run never stops mid-epoch on a bad file.
"""

import io
import logging
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ethos.data.image_transforms import mix_seed, seeded
from ethos.data.sampling import split_key
from ethos.errors import ConfigError

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_BAD = 64  # this many unreadable files in a row: the data is broken, not a few files


def decode(data) -> Image.Image:
    """A path, bytes or HF `{"bytes", "path"}` record -> fully decoded RGB image (raises if unreadable)."""
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data)
    img.load()  # decode now: truncated files fail here, inside our try, not later in a transform
    return img.convert("RGB")


# -- sources: __len__, raw(i) (undecoded), labels (list[int]), classes (list[str]) -----------------
class FolderSource:
    """ImageFolder layout root/<class>/<image>; `classes` restricts (and orders) the class folders."""

    def __init__(self, root: str | Path, classes: list[str] | None = None):
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
        # datasets takes about a second to import: only a HF source needs it, not a folder
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


def split_folder(source, val_fraction: float, seed: int) -> tuple:
    """Deterministic train/val split of one folder (when it has no separate val folder)."""
    perm = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(len(perm) * val_fraction))
    return Subset(source, sorted(perm[n_val:])), Subset(source, sorted(perm[:n_val]))


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
            with seeded(mix_seed(self.seed, b, i)):
                x = self.transform(img)
        else:
            x = self.transform(img)
        return {"image": x, "label": self.source.labels[j], "skipped": k, "batch_idx": b, "batch_pos": pos}
