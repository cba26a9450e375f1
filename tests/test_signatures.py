"""The config check's signature cache: portable annotations, invalidation, and no heavy imports."""

import pickle
import subprocess
import sys
from typing import Annotated, Union

from conftest import ROOT, compose
from ethos import signatures as sig
from ethos.config import validate
from ethos.types import Gt


def test_portable_annotations_load_without_their_libraries():
    from lightning.pytorch import Trainer

    from ethos.data.labels import TextClassificationDataModule

    t = sig.read("lightning.pytorch.Trainer", "trainer")
    assert not t.open and t.params["max_steps"] is int
    assert t.params["accelerator"] == Union[str, sig.Opaque]  # noqa: UP007 - what portable() builds
    assert t.params["precision"] is not None and "Opaque" not in repr(t.params["precision"])
    images = sig.read("ethos.data.images.ShapesDataModule", "data")
    assert images.modality == "image" and "num_classes" in images.params and "img_size" in images.params
    files = sig.portable(TextClassificationDataModule.__init__.__annotations__["data_files"])
    keys = next(a for a in files.__args__ if isinstance(a, sig.Keys))
    assert dict(keys.fields) == {"train": str | None, "validation": str | None}
    blob = pickle.dumps(t)
    assert b"lightning" not in blob  # unpickling imports nothing of Lightning
    assert pickle.loads(blob) == t
    assert sig.portable(Annotated[int, Gt(0)] | None) == Annotated[int, Gt(0)] | None
    assert Trainer  # imported above only to show read() works on the real class


def test_cache_is_rebuilt_when_sources_or_versions_change(tmp_path, monkeypatch):
    cache = sig.Signatures(tmp_path)
    cache.get("ethos.optim.OptimConfig", "optim")
    cache.save()
    assert "ethos.optim.OptimConfig" in sig.Signatures(tmp_path).targets
    monkeypatch.setattr(sig, "fingerprint", lambda: "another version")
    assert sig.Signatures(tmp_path).targets == {}


def test_warm_check_imports_neither_lightning_nor_datasets(tmp_path):
    cache = tmp_path / "cache"
    cfg = compose(["trainer.max_steps=5", f"paths.cache_dir={cache}"], output_dir=tmp_path)
    validate(cfg)  # the first run reads (imports) every target and keeps what it read
    assert (cache / "signatures.pkl").is_file()
    code = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import compose
from ethos.config import validate
from ethos.errors import ConfigError
cfg = compose(["trainer.max_steps=abc", "paths.cache_dir={cache}"], output_dir={str(tmp_path)!r})
try:
    validate(cfg)
except ConfigError as e:
    print(e)
print("heavy:", sorted(m for m in ("lightning", "datasets", "transformers", "torchmetrics") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "trainer.max_steps='abc': must be an integer > 0" in out.stdout
    assert "heavy: []" in out.stdout, out.stdout
