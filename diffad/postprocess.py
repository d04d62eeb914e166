"""Post-processing: raw maps + calibration + scoring config -> anomaly maps, scores and verdicts.

Pure functions of their inputs: the CLI, the demo layer, the app and the benchmarks all go through them, so a map,
a score and a verdict mean the same everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .scoring import RawMaps, ScoringConfig
from .windows import Layout, stitch, stitch_picture, stitched_score

if TYPE_CHECKING:
    from .calibration import Calibration


def verdict(score: float, image_threshold: float) -> str:
    """The one verdict: an image is anomalous when its score exceeds the image threshold."""
    return "anomalous" if score > image_threshold else "normal"


def normalise(raw: RawMaps, calibration: "Calibration", scoring: ScoringConfig) -> RawMaps:
    """The one normalisation: the raw maps the calibration combines, in z units: (raw - centre) / std per timestep.

    The centre is the held-out normal images' mean at each position when the calibration has those maps and
    `scoring.centre_by_position` names the map (borders and other places where the model is always a little off
    stop looking anomalous), else their mean over all pixels. `normalisation="per_image"` uses each map's own mean
    and std.
    """
    def z(maps: torch.Tensor, stats, kind: str) -> torch.Tensor:
        if scoring.normalisation == "per_image":
            mean, std = maps.mean(dim=(-2, -1), keepdim=True), maps.std(dim=(-2, -1), unbiased=False, keepdim=True)
        else:
            rows = calibration.rows(raw.timesteps)
            mean = stats.mean[rows].to(maps.device).view(1, -1, 1, 1)
            std = stats.std[rows].to(maps.device).view(1, -1, 1, 1)
            if kind in scoring.centre_by_position and stats.position_mean is not None:
                mean = stats.centres(rows, maps.shape[-2:]).to(maps.device)[None]
        return (maps - mean) / std.clamp_min(1e-12)

    missing = [k for k in calibration.feature_pool if k not in raw.features]
    if missing:
        raise ValueError(f"the maps lack the feature maps pooled over {missing} cells the calibration combines")
    return RawMaps(raw.timesteps, z(raw.kl, calibration.kl, "kl"), z(raw.rgb, calibration.rgb, "rgb"),
                   {k: z(raw.features[k], stats, "feature") for k, stats in calibration.features.items()})


@dataclass(frozen=True)
class CombinedMaps:
    anomaly: np.ndarray  # (R, R) the final map: sum over timesteps of alpha * pixel_z + (1 - alpha) * feature_z
    pixel: np.ndarray  # (R, R) sum over timesteps of the z-normalised pixel (KL or RGB) maps
    feature: np.ndarray  # (R, R) sum over timesteps of the z-normalised feature maps (averaged over pooling sizes)
    score: float


def combine(z: RawMaps, calibration: "Calibration", scoring: ScoringConfig) -> list[CombinedMaps]:
    """Per image: sum the z-maps over the scoring timesteps, weigh pixel against feature, smooth, score."""
    missing = sorted(set(scoring.timesteps) - set(z.timesteps))
    if missing:
        raise ValueError(f"the maps lack the scoring timesteps {missing}")
    rows = [z.index(t) for t in scoring.timesteps]
    pixel = getattr(z, scoring.pixel_kind)[:, rows].sum(1).cpu().numpy()
    feature = sum(z.features[k][:, rows].sum(1) for k in calibration.feature_pool) / len(calibration.feature_pool)
    feature = feature.cpu().numpy()
    combined = []
    for i in range(len(pixel)):
        anomaly = gaussian_smooth(scoring.alpha * pixel[i] + (1 - scoring.alpha) * feature[i], calibration.smoothing_sigma)
        combined.append(CombinedMaps(anomaly, pixel[i], feature[i], top_k_mean(anomaly, scoring.top_k)))
    return combined


def gaussian_smooth(amap: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return amap
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(amap, sigma=sigma, mode="nearest")


def top_k_mean(amap: np.ndarray, top_k: int) -> float:
    k = max(1, round(top_k * amap.size / 256**2))
    flat = amap.ravel()
    return float(np.partition(flat, flat.size - k)[-k:].mean())


@dataclass(frozen=True)
class StepMaps:
    """What one timestep shows for one image: the model's view, its raw maps and their z-normalised versions."""

    t: int
    xt: torch.Tensor  # (3, R, R) noised input
    x0_hat: torch.Tensor  # (3, R, R) the model's clean estimate
    kl: np.ndarray  # (R, R) bits
    features: dict[int, np.ndarray]  # pool size -> (R, R) squared error of normalised features
    rgb: np.ndarray  # (R, R) |x0_hat - x0| averaged over channels
    kl_z: np.ndarray  # (R, R) the KL map in z units, centred as the score centres it
    feature_z: np.ndarray  # (R, R) the finest feature map in z units

    @property
    def feature(self) -> np.ndarray:
        """The finest feature-error map (unpooled unless only pooled sizes were calibrated)."""
        return self.features[min(self.features)]


@dataclass(frozen=True)
class Prediction:
    image: torch.Tensor  # (3, H, W) the input as the model saw it, in [-1, 1]: R x R, or at the photo's aspect
    score: float
    percentile: float  # of the score among held-out normal images
    image_threshold: float  # the score above which an image is anomalous
    anomaly_map: np.ndarray  # (R, R) combined map in calibrated (z) units
    pixel_map: np.ndarray  # (R, R) its pixel (KL or RGB) part
    feature_map: np.ndarray  # (R, R) its feature part
    rgb_map: np.ndarray  # (R, R) raw RGB error summed over the scoring timesteps
    mask_threshold: float  # the anomaly-map value above which a pixel is flagged
    steps: list[StepMaps]  # every timestep computed, including extra ones requested for viewing

    @property
    def verdict(self) -> str:
        return verdict(self.score, self.image_threshold)

    @property
    def is_anomalous(self) -> bool:
        return self.verdict == "anomalous"

    def mask(self, threshold: float | None = None) -> np.ndarray:
        return self.anomaly_map > (self.mask_threshold if threshold is None else threshold)


def postprocess(raw: RawMaps, images: torch.Tensor, calibration: "Calibration", scoring: ScoringConfig) -> list[Prediction]:
    """One `Prediction` per image from its raw maps (with x_t and x̂0) and the (B, 3, R, R) images they came from."""
    z = normalise(raw, calibration, scoring)
    combined = combine(z, calibration, scoring)
    rows = [raw.index(t) for t in scoring.timesteps]
    rgb = raw.rgb[:, rows].sum(1).cpu().numpy()
    return [Prediction(
        image=images[i].cpu(), score=maps.score, percentile=calibration.percentile(maps.score),
        image_threshold=calibration.image_threshold, anomaly_map=maps.anomaly, pixel_map=maps.pixel,
        feature_map=maps.feature, rgb_map=rgb[i], mask_threshold=calibration.mask_threshold, steps=steps,
    ) for i, (maps, steps) in enumerate(zip(combined, step_maps(raw, z)))]


def step_maps(raw: RawMaps, z: RawMaps) -> list[list[StepMaps]]:
    """Per image, the StepMaps of every timestep in raw maps with x_t and x̂0 and their normalised version `z`."""
    xt, x0_hat, kl, step_rgb = raw.xt.cpu(), raw.x0_hat.cpu(), raw.kl.cpu().numpy(), raw.rgb.cpu().numpy()
    features = {k: v.cpu().numpy() for k, v in raw.features.items()}
    kl_z, feature_z = z.kl.cpu().numpy(), z.features[min(raw.features)].cpu().numpy()
    return [[StepMaps(t, xt[i, j], x0_hat[i, j], kl[i, j], {k: v[i, j] for k, v in features.items()}, step_rgb[i, j],
                      kl_z[i, j], feature_z[i, j]) for j, t in enumerate(raw.timesteps)] for i in range(len(raw))]


def merged_steps(windows: list[list[StepMaps]], layout: Layout) -> list[StepMaps]:
    """One photo's StepMaps from those of its windows (per window, per timestep): maps averaged where windows
    overlap, x_t and x̂0 from the nearest window's centre."""
    if layout.count == 1:
        return windows[0]
    merged = []
    for j, step in enumerate(windows[0]):
        def joined(name: str):
            return stitch(np.stack([getattr(w[j], name) for w in windows]), layout)

        pictures = {name: stitch_picture(torch.stack([getattr(w[j], name) for w in windows]), layout) for name in ("xt", "x0_hat")}
        features = {k: stitch(np.stack([w[j].features[k] for w in windows]), layout) for k in step.features}
        merged.append(StepMaps(step.t, pictures["xt"], pictures["x0_hat"], joined("kl"), features, joined("rgb"),
                               joined("kl_z"), joined("feature_z")))
    return merged


def merged_prediction(windows: list[Prediction], photo: torch.Tensor, layout: Layout, calibration: "Calibration",
                      scoring: ScoringConfig) -> Prediction:
    """One photo's Prediction from its windows': the stitched maps, scored as any map is (top-k mean, k scaled with
    the map's area)."""
    if layout.count == 1:
        return windows[0]

    def joined(name: str) -> np.ndarray:
        return stitch(np.stack([getattr(w, name) for w in windows]), layout)

    anomaly, score = stitched_score([w.anomaly_map for w in windows], [w.score for w in windows], layout, scoring.top_k)
    return Prediction(
        image=photo.cpu(), score=score, percentile=calibration.percentile(score), image_threshold=calibration.image_threshold,
        anomaly_map=anomaly, pixel_map=joined("pixel_map"), feature_map=joined("feature_map"), rgb_map=joined("rgb_map"),
        mask_threshold=calibration.mask_threshold, steps=merged_steps([w.steps for w in windows], layout),
    )
