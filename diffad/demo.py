"""What the web demo shows, computed without any UI toolkit: analyses, overlays, timestep views, morph frames.

app.py wires these functions to Gradio; keeping them here makes them testable and reusable from other front ends.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .data import DataError, to_uint8
from .calibration import CALIBRATED_TIMESTEPS
from .detector import AnomalyDetector
from .postprocess import verdict
from .visualize import anomaly_picture, heatmap, outline, overlay

VIEW_TIMESTEPS = CALIBRATED_TIMESTEPS
MAP_CHOICES = {"Combined": "anomaly", "Pixel KL": "pixel", "Feature error": "feature", "RGB error": "rgb"}
# Per-timestep maps are shown in z units (standard deviations above normal pixels) on this scale.
STEP_Z_RANGE = (0.0, 8.0)


@dataclass
class Analysis:
    """Everything one analysis shows; scrubbing and threshold changes only read it."""

    category: str
    image: np.ndarray  # (R, R, 3) uint8
    maps: dict  # MAP_CHOICES value -> (R, R) float32
    score: float
    percentile: float
    image_threshold: float
    mask_threshold: float
    steps: list = field(default_factory=list)  # dicts: t, xt, x0_hat, kl, feature (uint8 pictures)
    known_mask: np.ndarray | None = None


def known_examples(examples_root) -> dict[str, dict]:
    """sha256 of each example image -> its manifest entry (with the mask path resolved)."""
    found = {}
    for manifest in Path(examples_root).glob("*/manifest.json"):
        for entry in json.loads(manifest.read_text()).get("images", []):
            entry = dict(entry, path=str(manifest.parent / entry["file"]))
            if entry.get("mask"):
                entry["mask_path"] = str(manifest.parent / entry["mask"])
            if entry.get("sha256"):
                found[entry["sha256"]] = entry
    return found


def sha256_of(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def analyse(detector: AnomalyDetector, image, known_mask: np.ndarray | None = None, seed: int | None = None) -> Analysis:
    prediction = detector.predict(image, seed=seed, view_timesteps=VIEW_TIMESTEPS)
    steps = []
    for step in prediction.steps:
        steps.append({
            "t": step.t,
            "signal": float(detector.diffusion.sqrt_alphas_cumprod[step.t]),
            "xt": to_uint8(step.xt.clamp(-1, 1)),
            "x0_hat": to_uint8(step.x0_hat),
            # z units as the score uses them (centred on the normal images' position means).
            "kl": heatmap(step.kl_z, *STEP_Z_RANGE),
            # The finest map: pooled ones spread one defect over many pixels and saturate this fixed scale on texture.
            "feature": heatmap(step.feature_z, *STEP_Z_RANGE),
        })
    if known_mask is not None and known_mask.shape != prediction.anomaly_map.shape:
        known_mask = np.asarray(Image.fromarray(known_mask.astype(np.uint8) * 255).resize(prediction.anomaly_map.shape[::-1], Image.NEAREST)) > 127
    return Analysis(
        category=detector.category,
        image=to_uint8(prediction.image),
        maps={"anomaly": prediction.anomaly_map.astype(np.float32), "pixel": prediction.pixel_map.astype(np.float32),
              "feature": prediction.feature_map.astype(np.float32), "rgb": prediction.rgb_map.astype(np.float32)},
        score=prediction.score,
        percentile=prediction.percentile,
        image_threshold=prediction.image_threshold,
        mask_threshold=prediction.mask_threshold,
        steps=steps,
        known_mask=known_mask,
    )


def map_picture(analysis: Analysis, map_label: str, mask_threshold: float) -> np.ndarray:
    """The chosen map over the image, the predicted mask outlined in green and a known defect mask in white."""
    key = MAP_CHOICES.get(map_label)
    if key is None:
        raise DataError(f"unknown map {map_label!r}; choose from {', '.join(MAP_CHOICES)}")
    amap = analysis.maps[key]
    if key == "anomaly":
        return anomaly_picture(analysis.image, amap, analysis.mask_threshold, mask_threshold, analysis.known_mask)
    # The other maps have their own units: show them between their median and 99.9th percentile.
    picture = overlay(analysis.image, amap, float(np.median(amap)), float(np.quantile(amap, 0.999)))
    if analysis.known_mask is not None:
        picture = outline(picture, analysis.known_mask, colour=(255, 255, 255))
    return picture


def verdict_markdown(analysis: Analysis, image_threshold: float, mask_threshold: float) -> str:
    anomalous = verdict(analysis.score, image_threshold) == "anomalous"
    area = float(np.mean(analysis.maps["anomaly"] > mask_threshold)) * 100
    icon = "🔴 **Anomalous**" if anomalous else "🟢 **Normal**"
    return (
        f"### {icon}\n"
        f"Score **{analysis.score:.2f}** (threshold {image_threshold:.2f}) — higher than "
        f"**{analysis.percentile:.1f}%** of held-out normal `{analysis.category}` images.  \n"
        f"Flagged area: {area:.2f}% of the image (mask threshold {mask_threshold:.2f})."
    )


STEP_TEXT = (
    "At t = {t} the image is mixed with noise (signal kept: {signal:.0%}). The model sees only x_t and estimates the "
    "clean image x̂0. Where the input is normal, the model's reverse step matches the true one and the KL map stays "
    "dark; a defect looks like noise the model wants to remove, so the KL (and the feature error) light up there. "
    "Small t shows fine detail, large t shows larger structures."
)


def step_view(analysis: Analysis, index: int) -> tuple:
    """(x_t, x̂0, KL map, feature map, explanation) at one of the precomputed timesteps."""
    if not analysis.steps:
        raise DataError("analyse an image first")
    index = int(min(max(int(index), 0), len(analysis.steps) - 1))
    step = analysis.steps[index]
    return step["xt"], step["x0_hat"], step["kl"], step["feature"], STEP_TEXT.format(t=step["t"], signal=step["signal"])


def colorbar(vmin: float, vmax: float, label: str, width: int = 320, cmap: str = "jet") -> np.ndarray:
    """A horizontal colour bar with its end values, as an image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width / 100, 0.55), dpi=100)
    ax.imshow(np.linspace(0, 1, 256)[None], aspect="auto", cmap=cmap, extent=(vmin, vmax, 0, 1))
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=7)
    ax.tick_params(labelsize=7)
    fig.tight_layout(pad=0.1)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return picture
