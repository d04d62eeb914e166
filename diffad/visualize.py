"""Turning maps into pictures: colour-mapped overlays and mask outlines (matplotlib colormaps, no pyplot)."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from scipy import ndimage


def display_range(mask_threshold: float) -> tuple[float, float]:
    """Colour scale for calibrated maps: 0 (normal on average) to twice the mask threshold."""
    top = 2.0 * mask_threshold if np.isfinite(mask_threshold) and mask_threshold > 0 else 10.0
    return 0.0, top


def heatmap(amap: np.ndarray, vmin: float, vmax: float, cmap: str = "jet") -> np.ndarray:
    """(H, W) float -> (H, W, 3) uint8 coloured with a matplotlib colormap."""
    scaled = np.clip((np.asarray(amap, dtype=np.float64) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    return (colormaps[cmap](scaled)[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a heat map over an (H, W, 3) uint8 image."""
    colours = heatmap(amap, vmin, vmax, cmap).astype(np.float32)
    return (image.astype(np.float32) * (1 - alpha) + colours * alpha).round().astype(np.uint8)


def anomaly_picture(image: np.ndarray, amap: np.ndarray, calibrated_threshold: float, mask_threshold: float | None = None,
                    known_mask: np.ndarray | None = None) -> np.ndarray:
    """A calibrated anomaly map over the image: known defect outlined in white, predicted mask in green (at
    `mask_threshold`, default the calibrated one)."""
    picture = overlay(image, amap, *display_range(calibrated_threshold))
    if known_mask is not None:
        picture = outline(picture, known_mask, colour=(255, 255, 255))
    threshold = calibrated_threshold if mask_threshold is None else mask_threshold
    if np.isfinite(threshold):
        picture = outline(picture, amap > threshold, colour=(0, 255, 0), width=2)
    return picture


def outline(image: np.ndarray, mask: np.ndarray, colour=(255, 255, 255), width: int = 1) -> np.ndarray:
    """Draw the boundary of a boolean mask onto a copy of an (H, W, 3) uint8 image."""
    mask = np.asarray(mask, dtype=bool)
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    result = image.copy()
    result[edge] = colour
    return result
