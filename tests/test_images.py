"""Image data: HF-schema datasets through the real load_dataset path, ImageFolder with corrupt files,
deterministic shapes set, resume-exact augmentation, and a short run that learns."""

import csv
import io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import compose
from ethos.data.images import HFImageDataModule, ImageFolderDataModule, ImageNet100DataModule, ShapesDataModule
from ethos.data.sampling import StepBatchSampler
from ethos.study import train

COMMON = {"img_size": 16, "batch_size": 4, "crop_pct": 1.0,
          "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}


def png(value: int, size: int = 16) -> bytes:
    """A flat image whose red channel encodes `value`: decoded pixels tell which file was read."""
    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., 0] = value
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def red(x: torch.Tensor) -> int:
    """Undo Normalize(0.5, 0.5) on the red channel of an untouched (eval) image."""
    return round(float((x[0].mean() * 0.5 + 0.5) * 255))


def write_hf(root: Path, image_key: str, names: list[str], splits: dict[str, int], subdir: str,
             pattern: str) -> dict[str, list[int]]:
    """Parquet files written by `datasets` with Image + ClassLabel features (the hub schema)."""
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    feats = Features({image_key: HFImage(), "label": ClassLabel(names=names)})
    labels = {}
    for split, n in splits.items():
        y = [i % len(names) for i in range(n)]
        ds = Dataset.from_dict({image_key: [{"bytes": png(10 * v + 7), "path": None} for v in y], "label": y},
                               features=feats)
        out = root / subdir / pattern.format(split=split)
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(out))
        labels[split] = y
    return labels


def test_imagenette_layout_through_load_dataset(tmp_path):
    # the hub's parquet conversion layout: <config>/<split>/0000.parquet, columns image,label
    names = ["tench", "English springer", "cassette player"]
    labels = write_hf(tmp_path / "imagenette", "image", names, {"train": 12, "validation": 6}, "160px",
                      "{split}/0000.parquet")
    dm = HFImageDataModule(path=str(tmp_path / "imagenette"), data_dir="160px", revision="refs/convert/parquet",
                           cache_dir=str(tmp_path / "cache"), **COMMON)
    dm.prepare_data()
    dm.setup()
    assert dm.train_source.classes == names and dm.task_kwargs()["num_classes"] == 3
    assert dm.train_source.labels == labels["train"] and dm.val_source.labels == labels["validation"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == labels["validation"][:4]
    assert [red(x) for x in batch["image"]] == [10 * y + 7 for y in labels["validation"][:4]]
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (4, 3, 16, 16) and train["skipped"] == 0


def test_cifar10_schema_img_column_and_repo_configs(tmp_path):
    # a snapshot of uoft-cs/cifar10: README with the `configs:` block, plain_text/{train,test}-*.parquet,
    # columns img,label; loaded with the same arguments as the hub default (name=plain_text)
    repo = tmp_path / "cifar10"
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    labels = write_hf(repo, "img", names, {"train": 20, "test": 10}, "plain_text", "{split}-00000-of-00001.parquet")
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: plain_text\n  data_files:\n  - split: train\n    path: plain_text/train-*\n"
        "  - split: test\n    path: plain_text/test-*\n  default: true\n---\n# CIFAR-10 (test copy)\n")
    cfg = compose(["data=cifar10", f"data.path={repo}", f"data.cache_dir={tmp_path / 'cache'}",
                   "data.batch_size=4", "data.eval_batch_size=4", "data.num_workers=0"], output_dir=tmp_path)
    from ethos.config import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup()
    assert dm.train_source.classes == names and len(dm.val_source) == 10
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == labels["test"][:4] == [0, 1, 2, 3]
    # cifar10 normalisation: undo it and compare with the stored red value
    mean, std = cfg.data.mean[0], cfg.data.std[0]
    got = [round(float((x[0].mean() * std + mean) * 255)) for x in batch["image"]]
    assert got == [10 * y + 7 for y in labels["test"][:4]]


def test_imagenet100_hf_labels_map_to_the_class_list(tmp_path):
    # HF imagenet-1k integer labels (sorted-wnid order) -> the 100-class subset, renumbered
    from timm.data import ImageNetInfo

    wnids = ImageNetInfo("imagenet-1k").label_names()
    classes = ["n02869837", "n01749939", "n02488291"]  # first three of the CMC list
    idx = [wnids.index(c) for c in classes]
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as HFImage

    feats = Features({"image": HFImage(), "label": ClassLabel(num_classes=1000)})
    y = [idx[0], 0, idx[1], idx[2], 5, idx[0]]  # 0 and 5 are outside the subset
    for split in ("train", "validation"):
        ds = Dataset.from_dict({"image": [{"bytes": png(v % 256), "path": None} for v in y], "label": y},
                               features=feats)
        (tmp_path / "in1k" / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(tmp_path / "in1k" / "data" / f"{split}-00000-of-00001.parquet"))
    dm = ImageNet100DataModule(path=str(tmp_path / "in1k"), classes=classes, cache_dir=str(tmp_path / "c"),
                               **{**COMMON, "batch_size": 2})
    dm.prepare_data()
    dm.setup()
    order = sorted(classes)
    assert dm.train_source.labels == [order.index(classes[k]) for k in (0, 1, 2, 0)]
    assert dm.task_kwargs()["num_classes"] == 3


def make_folder(root: Path, split: str, per_class: int = 4) -> None:
    for c, name in enumerate(["cat", "dog"]):
        d = root / split / name
        d.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(np.full((16, 16, 3), 40 * c + k, np.uint8)).save(d / f"{k}.jpg", quality=100)


def corrupt(root: Path) -> set[str]:
    (root / "cat" / "1.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")  # garbage after a JPEG header
    good = (root / "dog" / "2.jpg").read_bytes()
    (root / "dog" / "2.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    return {str(root / "cat" / "1.jpg"), str(root / "dog" / "2.jpg")}


def test_corrupt_jpeg_is_skipped_and_counted(tmp_path, caplog):
    make_folder(tmp_path, "train")
    make_folder(tmp_path, "val")
    bad_train = corrupt(tmp_path / "train")
    corrupt(tmp_path / "val")
    dm = ImageFolderDataModule(root=str(tmp_path), cache_dir=str(tmp_path / "c"),
                               **{**COMMON, "batch_size": 2, "eval_batch_size": 3})
    dm.setup()
    ds = dm.train_dataloader().dataset
    bad = [i for i in range(len(ds)) if ds.source.raw(i) in bad_train]
    assert len(bad) == 2
    with caplog.at_level(logging.WARNING, logger="ethos.data.image_sources"):
        items = [ds[(0, i)] for i in range(len(ds))]
    # every item decodes; a bad index is replaced by the next readable one (with its label), counted once
    assert [i for i, it in enumerate(items) if it["skipped"]] == bad
    for i in bad:
        assert items[i]["label"] == ds.source.labels[i + 1]
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2
    # a whole run of the loaders goes through: train keeps full batches, validation drops replaced items
    train = list(dm.train_dataloader())
    assert all(len(b["label"]) == 2 for b in train) and sum(b["skipped"] for b in train) > 0
    val = list(dm.val_dataloader())
    assert sum(b["skipped"] for b in val) == 2
    assert sum(len(b["label"]) for b in val) == 8 - 2
    kept = torch.cat([b["label"] for b in val]).tolist()
    assert kept == [0, 0, 0, 1, 1, 1]


@pytest.mark.slow
def test_train_augmentation_is_a_function_of_the_batch_id(tmp_path):
    dm = ShapesDataModule(cache_dir=str(tmp_path), num_classes=3, train_per_class=8, val_per_class=2,
                          **{**COMMON, "auto_augment": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0})
    dm.prepare_data()
    dm.setup()
    torch.manual_seed(0)
    before = torch.rand(3)
    a = list(dm.train_dataloader())[:5]
    loader = dm.train_dataloader()
    s = loader.batch_sampler  # a resume at micro-batch 3: a sampler that starts there, a fresh dataset
    resumed = [loader.collate_fn([loader.dataset[k] for k in keys])
               for keys in list(StepBatchSampler(s.n, s.bs, s.total, s.seed, start=3))[:2]]
    for x, y in zip(a[3:5], resumed):
        torch.testing.assert_close(x["image"], y["image"], rtol=0, atol=0)
        torch.testing.assert_close(x["target"], y["target"], rtol=0, atol=0)
    assert not torch.equal(a[0]["image"], a[1]["image"])
    t = a[0]["target"]  # mixed targets (the task smooths them), rows of a distribution
    assert t.sum(-1).allclose(torch.ones(4)) and ((t > 0) & (t < 1)).any()
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), before)  # the loader left the global RNG where it was


def test_shapes_generation_is_deterministic(tmp_path):
    kw = dict(num_classes=4, train_per_class=3, val_per_class=2, **COMMON)
    for sub in ("a", "b"):
        ShapesDataModule(cache_dir=str(tmp_path / sub), **kw).prepare_data()
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.png"))
    assert len(files) == 4 * 5
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)


def metrics(run_dir: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    with open(run_dir / "csv" / "metrics.csv") as f:
        for row in csv.DictReader(f):
            for k, v in row.items():
                if k not in ("step", "epoch") and v:
                    out.setdefault(k, []).append(float(v))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_short_shapes_run_learns(cache_dir, tmp_path):
    cfg = compose(["data=shapes", "debug=default", "logger=csv", "trainer.detect_anomaly=false",
                   "model.d_model=64", "model.n_layers=2", "model.n_heads=4", "model.rope_dims=0",
                   "model.ffn.d_ff=128", "data.batch_size=32", "trainer.max_steps=200",
                   "trainer.val_check_interval=50", "trainer.limit_val_batches=1.0", "optim.lr=6e-3",
                   "optim.weight_decay=0.05", "optim.warmup=10", "optim.schedule=cosine"], output_dir=tmp_path)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.1M-parameter model: one thread is faster, and immune to a busy shared box
    try:
        final = train(cfg)
    finally:
        torch.set_num_threads(threads)
    m = metrics(tmp_path)
    loss, acc = m["val/loss"], m["val/acc"]
    assert len(loss) == 5 and loss[-1] < loss[1] - 0.3 and loss[-1] < np.log(6) - 0.6, loss
    assert acc[-1] > 0.5, acc  # chance is 1/6
    assert m["val/acc5"][-1] >= acc[-1] and m["val/skipped_images"][-1] == 0
    assert m["perf/tokens_per_sec"][-1] == pytest.approx(m["perf/samples_per_sec"][-1] * 64)  # 8x8 patches
    assert final == pytest.approx(loss[-1])
