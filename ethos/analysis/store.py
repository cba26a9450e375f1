"""The spectra of one checkpoint on disk (python -m ethos.analysis.spectra writes it, the plots read it):

    DIR/meta.json              the source, its description and layer count: a DIR holds one checkpoint's spectra
       svals/layer_XXX.npz     per kind its singular values (per-head kinds (H, k), whole matrices (k,)) and
                               `shape_<kind>`, the shape of the matrix they are of
       spectra.csv, .json      one row per layer x kind x head (head empty for whole matrices): COLUMNS

Each file is written whole or not at all (ethos.files), so a run stopped at any point leaves a DIR that a run
started again resumes from.
"""

import csv
import json
from pathlib import Path

import numpy as np
import torch

from ethos.errors import ConfigError
from ethos.files import atomic_path, atomic_write

TAUS = (0.99, 0.999)  # the energy fractions an effective rank is reported at
HEAD_KINDS = ("o_head", "qk", "vo")  # measured per head
COLUMNS = ["layer", "kind", "head", "rows", "cols", "n_sv", "sigma_1", "stable_rank",
           *[f"erank_{t}" for t in TAUS]]


def start(out: Path, meta: dict, subdir: str = "svals") -> None:
    """Make `out` the store of the checkpoint `meta` describes: a fresh DIR, or one holding that checkpoint's
    results already (a resume); another checkpoint's is refused. `subdir`: where the per-layer files go."""
    (out / subdir).mkdir(parents=True, exist_ok=True)
    if (out / "meta.json").is_file():
        old = json.loads((out / "meta.json").read_text())
        if old.get("description") != meta["description"]:
            raise ConfigError(f"--out {out}: holds the results of {old.get('source')} ({old.get('description')}), "
                              f"not of {meta['source']}: choose another --out")
    atomic_write(out / "meta.json", json.dumps(meta, indent=1))


def layer_path(out: Path, layer: int) -> Path:
    return out / "svals" / f"layer_{layer:03d}.npz"


def save_layer(out: Path, layer: int, svals: dict, shapes: dict) -> None:
    arrays = {k: v.double().numpy() for k, v in svals.items()}
    arrays.update({f"shape_{k}": np.array(v) for k, v in shapes.items()})
    with atomic_path(layer_path(out, layer)) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_layer(path: Path) -> tuple[dict, dict]:
    """({kind: singular values}, {kind: (rows, cols)}) of one layer's npz."""
    with np.load(path) as z:
        svals = {k: torch.from_numpy(z[k]) for k in z.files if not k.startswith("shape_")}
        shapes = {k.removeprefix("shape_"): tuple(int(x) for x in z[k]) for k in z.files if k.startswith("shape_")}
    return svals, shapes


def write_tables(out: Path, rows: list[dict]) -> None:
    rows = sorted(rows, key=lambda r: (r["layer"], r["kind"], -1 if r["head"] is None else r["head"]))
    write_csv(out / "spectra.csv", rows, COLUMNS)
    atomic_write(out / "spectra.json", json.dumps(rows))


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """A table, written whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
