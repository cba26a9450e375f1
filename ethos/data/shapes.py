"""The shapes image set (`data=shapes`, the offline default): drawing it and writing it as an ImageFolder.

One class per shape (circle, square, triangle, cross, ring, diamond, ...), each drawn with a random
size, position, rotation-free jitter and colour on a random dark background with pixel noise, so
neither colour nor position gives the class away: the model has to see the shape. Drawn at 4x and
downsampled (antialiased edges). Image k of a split is a pure function of (seed, split, k), so the same
settings always give byte-identical PNGs. `ShapesDataModule` (images.py) generates the set on first use
into the cache and loads it through the same FolderSource path as any user folder.
"""

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star")
SS = 4  # supersampling factor


def _star(cx: float, cy: float, r: float, points: int = 5) -> list[tuple[float, float]]:
    ang = np.pi / 2 + np.arange(2 * points) * np.pi / points
    rad = np.where(np.arange(2 * points) % 2 == 0, r, r * 0.45)
    return list(zip(cx + rad * np.cos(ang), cy - rad * np.sin(ang)))


def draw_shape(shape: str, size: int, rng: np.random.Generator) -> Image.Image:
    S = size * SS
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    fg = tuple(int(v) for v in rng.integers(120, 256, 3))
    img = Image.new("RGB", (S, S), bg)
    d = ImageDraw.Draw(img)
    r = S * rng.uniform(0.2, 0.35)  # half-extent of the shape
    cx, cy = rng.uniform(r + S * 0.05, S - r - S * 0.05, 2)
    w = max(SS, r * 0.35)  # stroke width for the line shapes
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fg)
    elif shape == "square":
        d.rectangle((cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85), fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fg)
    elif shape == "cross":
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fg)
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
    elif shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fg, width=int(w))
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fg)
    elif shape == "bar":
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
    elif shape == "star":
        d.polygon(_star(cx, cy, r), fill=fg)
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    noise = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def generate(root: Path, num_classes: int, train_per_class: int, val_per_class: int, size: int, seed: int) -> None:
    """Write root/{train,val}/<shape>/<k>.png; built in a temp dir and renamed, so a crash or a
    concurrent run never leaves a half-written set behind."""
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        for c, shape in enumerate(SHAPES[:num_classes]):
            out = tmp / split / shape
            out.mkdir(parents=True)
            for k in range(per_class):
                rng = np.random.default_rng([seed, split_id, c, k])
                draw_shape(shape, size, rng).save(out / f"{k:05d}.png", optimize=False)
    try:
        tmp.rename(root)
    except OSError:  # another process finished first: theirs is identical
        shutil.rmtree(tmp, ignore_errors=True)

