"""Painting a defect (the app's "Paint a defect" tab), without the UI: the painted pixels are the ground truth.

A person paints on a photo, or places one of diffad.synth's defect kinds at a point; what they changed is the mask,
and the pixel AUROC of the anomaly map against that mask says how well the map finds their defect.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .data import read_image
from .metrics import auroc
from .synth import add_defect

# A pixel counts as painted when a channel moved by more than this (of 255): a browser canvas that re-encodes the
# photo may move unpainted pixels by a level or two, and those are not the person's defect.
PAINT_TOLERANCE = 8
# Larger photos are shrunk to this long side before painting: the map is shown at 512 px and the model sees less.
PAINT_SIDE = 1024


def as_rgb(picture) -> np.ndarray:
    """(H, W, 3) uint8 from an array (grey, RGB or RGBA: transparency on white, as read_image does) or a file."""
    if isinstance(picture, np.ndarray):
        picture = Image.fromarray(np.ascontiguousarray(picture, dtype=np.uint8))
    return np.asarray(read_image(picture))


def canvas(photo, side: int = PAINT_SIDE) -> np.ndarray:
    """The photo to paint on: RGB, its long side at most `side` (never enlarged)."""
    image = read_image(photo)
    if max(image.size) > side:
        scale = side / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BICUBIC)
    return np.asarray(image)


def painted_mask(original, painted, tolerance: int = PAINT_TOLERANCE) -> np.ndarray:
    """(H, W) bool: where `painted` differs from `original` by more than `tolerance` in any channel."""
    original, painted = as_rgb(original), as_rgb(painted)
    if original.shape != painted.shape:
        raise ValueError(f"the painting is {painted.shape[1]}×{painted.shape[0]} px but the photo under it is "
                         f"{original.shape[1]}×{original.shape[0]} px")
    return (np.abs(painted.astype(np.int16) - original.astype(np.int16)).max(axis=-1) > tolerance)


def place_defect(image, kind: str, point: tuple[float, float], seed: int = 0,
                 size: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synth defect of `kind` centred on `point` (x, y). Returns (new image, its mask, an RGBA layer holding only
    the defect), the layer being what an image editor stacks on the photo so the person can still hide or erase it."""
    image = as_rgb(image)
    result, mask = add_defect(image, kind, seed=seed, size=size, centre=point)
    layer = np.zeros((*mask.shape, 4), np.uint8)
    layer[mask, :3] = result[mask]
    layer[mask, 3] = 255
    return result, mask, layer


def pixel_auroc(amap: np.ndarray, mask: np.ndarray) -> float:
    """Pixel AUROC of an anomaly map against a mask, the map resized (bilinear) to the mask's size; NaN when the mask
    is empty or covers everything (there is then nothing to rank painted pixels against)."""
    mask = np.asarray(mask, dtype=bool)
    amap = np.asarray(amap, dtype=np.float32)
    if amap.shape != mask.shape:
        amap = np.asarray(Image.fromarray(amap).resize((mask.shape[1], mask.shape[0]), Image.BILINEAR))
    return auroc(mask, amap)


def auroc_sentence(value: float, mask: np.ndarray) -> str:
    """What pixel_auroc says about the painted defect, in words; an undefined AUROC says why."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return "Pixel AUROC is undefined: nothing is painted, so there is no defect to find."
    if mask.all():
        return ("Pixel AUROC is undefined: the painting covers the whole image, so there are no unpainted pixels "
                "to tell it apart from.")
    return (f"The map finds your painted defect with pixel AUROC **{value:.2f}** (1.0 = perfect, 0.5 = chance): "
            f"the chance that a painted pixel scores higher on the combined map than an unpainted one. "
            f"You painted {100 * mask.mean():.1f}% of the image.")
