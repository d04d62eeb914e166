"""Calibration: what normal looks like for a category, measured on held-out defect-free images.

`calibrate` is the only producer of a `Calibration`: per-timestep map statistics and position means, the map
smoothing (chosen on synthetic defects), the score and mask thresholds, and the morph's feature Gaussian.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .gaussian import GAUSSIAN_KEYS, FeatureGaussian
from .postprocess import combine, normalise
from .scoring import RawMaps, pool_sizes, strict_kwargs
from .windows import per_photo, square_layout

if TYPE_CHECKING:
    from .detector import AnomalyDetector

# Timesteps whose map statistics are stored, so that other timestep sets can be scored (ablations, the app).
CALIBRATED_TIMESTEPS = (5, 10, 20, 50, 100, 150, 200, 250, 300, 350, 400, 500)
# Default verdict threshold: this quantile of the held-out normal images' scores.
IMAGE_THRESHOLD_QUANTILE = 0.99
# Default mask threshold: this quantile of the held-out normal images' anomaly-map values.
MASK_THRESHOLD_QUANTILE = 0.999
# Position means of the coarser pooled feature maps are stored this many times smaller: pooling over >= 3 feature
# cells already makes them smooth, and full size would make a three-size checkpoint several times larger. The other
# maps keep full resolution: pooling their means blurs the thin ring of border errors.
POOLED_MEAN_DOWNSCALE = 4
# Gaussian smoothing (sigma in pixels at the model resolution) tried when calibrating; 0 is none.
SMOOTHING_CANDIDATES = (0.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True)
class MapStats:
    """One raw map's statistics over normal images, one row per calibrated timestep."""

    mean: torch.Tensor  # (T,) float32 mean over all pixels
    std: torch.Tensor  # (T,) float32 standard deviation over all pixels
    # (T, r, r) mean at each position, as stored (fp16, r <= R); None for checkpoints made without them.
    position_mean: torch.Tensor | None = None

    def centres(self, rows: list[int], size) -> torch.Tensor:
        """(len(rows), R, R) float32 position means at the map size `size`."""
        means = self.position_mean[rows].float()
        if tuple(means.shape[-2:]) != tuple(size):
            means = F.interpolate(means[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
        return means

    def to(self, device) -> "MapStats":
        return MapStats(self.mean.to(device), self.std.to(device),
                        None if self.position_mean is None else self.position_mean.to(device))


@dataclass(frozen=True)
class SmoothingTrial:
    """How one smoothing candidate localised synthetic defects in held-out normal images."""

    sigma: float
    pixel_auroc: float
    aupro: float


def check_threshold_quantile(quantile: float) -> None:
    if not 0.5 <= quantile <= 1:
        raise ValueError(f"the threshold quantile must be between 0.5 and 1, got {quantile}")


@dataclass(frozen=True)
class Calibration:
    timesteps: tuple[int, ...] = ()
    kl: MapStats | None = None
    rgb: MapStats | None = None
    # Pool size -> statistics of the feature map pooled over pool x pool cells. Its sizes are the feature pooling
    # the maps are made and combined with (`feature_pool`).
    features: dict[int, MapStats] = field(default_factory=dict)
    # Gaussian smoothing of the combined map (sigma in pixels at the model resolution; 0 is none).
    smoothing_sigma: float = 0.0
    smoothing_trials: tuple[SmoothingTrial, ...] = ()
    normal_scores: tuple[float, ...] = ()
    image_threshold: float = math.inf
    # The image threshold is this quantile of the held-out normal images' scores: the share of normal parts let pass.
    threshold_quantile: float = IMAGE_THRESHOLD_QUANTILE
    mask_threshold: float = math.inf
    gaussian: FeatureGaussian | None = None  # the morph's model of normal features

    @property
    def feature_pool(self) -> tuple[int, ...]:
        return tuple(sorted(self.features)) or (1,)

    def rows(self, timesteps) -> list[int]:
        """Row of each timestep in the statistics; an uncalibrated one is an error naming it."""
        missing = [t for t in timesteps if t not in self.timesteps]
        if missing:
            raise ValueError(f"timestep(s) {missing} have no calibration statistics (calibrated: {list(self.timesteps)})")
        return [self.timesteps.index(t) for t in timesteps]

    def percentile(self, score: float) -> float:
        if not self.normal_scores:
            return float("nan")
        return 100.0 * float(np.mean(np.asarray(self.normal_scores) <= score))

    def with_feature_pool(self, pools) -> "Calibration":
        """The same calibration combining only the feature maps pooled over `pools` (all calibrated)."""
        pools = pool_sizes(pools)
        missing = [k for k in pools if k not in self.features]
        if missing:
            asked, calibrated = (",".join(map(str, p)) for p in (pools, self.feature_pool))
            raise ValueError(f"feature_pool {asked} is not among the sizes {calibrated} this checkpoint was calibrated "
                             f"with: run diffad calibrate --feature-pool {asked} first")
        return replace(self, features={k: self.features[k] for k in pools})

    def with_threshold_quantile(self, quantile: float) -> "Calibration":
        """The same calibration with its image threshold at this quantile of the normal images' scores."""
        check_threshold_quantile(quantile)
        return replace(self, threshold_quantile=float(quantile),
                       image_threshold=float(np.quantile(self.normal_scores, quantile)))

    def to(self, device) -> "Calibration":
        stats = {name: getattr(self, name) for name in ("kl", "rgb")}
        return replace(self, **{n: s and s.to(device) for n, s in stats.items()},
                       features={k: s.to(device) for k, s in self.features.items()})

    def to_config(self) -> dict:
        """The JSON part of the checkpoint (tensors: `to_tensors`)."""
        def stats(s: MapStats) -> dict:
            return {"mean": s.mean.tolist(), "std": s.std.tolist()}

        return {
            "timesteps": list(self.timesteps),
            "kl": stats(self.kl), "rgb": stats(self.rgb),
            "features": [{"pool": k, **stats(s)} for k, s in sorted(self.features.items())],
            "smoothing_sigma": self.smoothing_sigma,
            "smoothing_trials": [asdict(trial) for trial in self.smoothing_trials],
            "normal_scores": list(self.normal_scores),
            "image_threshold": self.image_threshold,
            "threshold_quantile": self.threshold_quantile,
            "mask_threshold": self.mask_threshold,
        }

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"position_mean.{name}": s.position_mean for name, s in self._named_stats() if s.position_mean is not None}
        if self.gaussian is not None:
            tensors.update(self.gaussian.to_tensors())
        return {key: value.detach().cpu().contiguous() for key, value in tensors.items()}

    def _named_stats(self):
        return [("kl", self.kl), ("rgb", self.rgb), *((f"feature_{k}", s) for k, s in sorted(self.features.items()))]

    @classmethod
    def from_checkpoint(cls, config: dict, tensors: dict[str, torch.Tensor], resolution: int) -> "Calibration":
        """From `to_config`'s JSON and `to_tensors`'s tensors; inconsistent ones are a ValueError."""
        values = strict_kwargs(cls, {k: v for k, v in config.items() if k != "features"}, "calibration")
        timesteps = tuple(int(t) for t in values.pop("timesteps", ()))

        def stats(entry: dict, name: str) -> MapStats:
            entry = {k: v for k, v in entry.items() if k != "pool"}
            mean, std = (torch.tensor(entry[k], dtype=torch.float32) for k in ("mean", "std"))
            position_mean = tensors.get(f"position_mean.{name}")
            sizes = {(len(timesteps), r, r) for r in (resolution, resolution // POOLED_MEAN_DOWNSCALE)}
            if (set(entry) != {"mean", "std"} or mean.shape != (len(timesteps),) or std.shape != mean.shape
                    or (position_mean is not None and (tuple(position_mean.shape) not in sizes
                                                       or not torch.isfinite(position_mean.float()).all()))):
                raise ValueError(f"the {name} statistics or position-wise normal means have inconsistent shapes or values")
            return MapStats(mean, std, position_mean)

        features = {int(e["pool"]): stats(e, f"feature_{e['pool']}") for e in config.get("features", [])}
        for name in ("kl", "rgb"):
            if name in values:
                values[name] = stats(values[name], name)
        values["smoothing_trials"] = tuple(SmoothingTrial(**trial) for trial in values.get("smoothing_trials", ()))
        values["normal_scores"] = tuple(values.get("normal_scores", ()))
        gaussian = {k: tensors[k] for k in GAUSSIAN_KEYS if k in tensors}
        return cls(timesteps=timesteps, features=features, gaussian=FeatureGaussian.from_tensors(gaussian) if gaussian else None,
                   **values)


def _map_stats(maps: torch.Tensor, coarse: bool) -> MapStats:
    """Statistics of (N, T, R, R) maps of normal images; position means rounded as the checkpoint stores them."""
    maps = maps.float().cpu()
    means = maps.mean(dim=0)
    if coarse:
        means = F.avg_pool2d(means[None], POOLED_MEAN_DOWNSCALE)[0]
    return MapStats(maps.mean(dim=(0, 2, 3)), maps.std(dim=(0, 2, 3), unbiased=False), means.half())


def measure_statistics(raw: RawMaps) -> Calibration:
    """Per-timestep statistics and position means of normal images' raw maps (no thresholds yet)."""
    finest = min(raw.features)
    features = {k: _map_stats(maps, coarse=k != finest) for k, maps in raw.features.items()}
    return Calibration(timesteps=raw.timesteps, kl=_map_stats(raw.kl, False), rgb=_map_stats(raw.rgb, False), features=features)


def select_smoothing(detector: "AnomalyDetector", normal_images: torch.Tensor, calibration: Calibration,
                     sigmas=SMOOTHING_CANDIDATES, batch_size: int = 8) -> Calibration:
    """The calibration with the combined map's smoothing: the candidate that best localises synthetic defects pasted
    into held-out normal images (never test data) by `metrics.localisation_quality`; every candidate's result is kept."""
    from .data import to_uint8
    from .metrics import aupro, auroc, localisation_quality
    from .synth import DEFECT_TYPES, add_defect

    images, masks = [], []
    for i, image in enumerate(normal_images):
        picture, mask = add_defect(to_uint8(image), DEFECT_TYPES[i % len(DEFECT_TYPES)], seed=i, size=0.5)
        images.append(torch.from_numpy(picture).permute(2, 0, 1).float() / 127.5 - 1)
        masks.append(mask)
    scoring = detector.scoring
    raw = detector.raw_maps(torch.stack(images), scoring.timesteps, calibration.feature_pool, keep_images=False,
                            batch_size=batch_size)
    z = normalise(raw, calibration, scoring)
    masks = np.stack(masks)

    trials = []
    for sigma in sigmas:
        maps = np.stack([c.anomaly for c in combine(z, replace(calibration, smoothing_sigma=float(sigma)), scoring)])
        trials.append(SmoothingTrial(float(sigma), auroc(masks, maps), aupro(masks, maps)))
    best = max(trials, key=lambda trial: localisation_quality(asdict(trial)))
    return replace(calibration, smoothing_sigma=best.sigma, smoothing_trials=tuple(trials))


def calibrate(detector: "AnomalyDetector", normal_images: torch.Tensor, *, timesteps=CALIBRATED_TIMESTEPS,
              feature_pool=None, smoothing_sigma: float | None = None, gaussian: FeatureGaussian | None = None,
              batch_size: int = 8, layouts=None, threshold_quantile: float | None = None) -> Calibration:
    """Measure what normal looks like on held-out normal images (N, 3, R, R) with the detector's scoring.
    `layouts` (diffad.windows): the images are the windows of photos scored at their own aspect, in this order;
    the map statistics are the windows', the thresholds those of the photos' stitched maps.

    `timesteps` are calibrated besides the scoring's own; `feature_pool` (default: the detector's current
    pooling sizes) are the feature maps made; `smoothing_sigma` None chooses it on synthetic defects;
    `gaussian` is the morph's feature model to keep (default: the detector's current one); `threshold_quantile`
    (default: the detector's current one) places the image threshold among the normal images' scores.
    """
    scoring = detector.scoring
    pools = pool_sizes(detector.calibration.feature_pool if feature_pool is None else feature_pool)
    timesteps = detector.validate_timesteps(list(timesteps) + list(scoring.timesteps))
    raw = detector.raw_maps(normal_images, timesteps, pools, keep_images=False, batch_size=batch_size)
    calibration = replace(measure_statistics(raw), smoothing_sigma=detector.calibration.smoothing_sigma,
                          gaussian=detector.calibration.gaussian if gaussian is None else _as_stored(gaussian))
    if smoothing_sigma is None:
        calibration = select_smoothing(detector, normal_images, calibration, batch_size=batch_size)
    else:
        calibration = replace(calibration, smoothing_sigma=float(smoothing_sigma))
    photos = per_photo(combine(normalise(raw, calibration, scoring), calibration, scoring),
                       layouts or [square_layout(detector.resolution)] * len(normal_images), scoring.top_k)
    scores = [score for _, score in photos]
    pixels = np.concatenate([amap.ravel() for amap, _ in photos])
    calibration = replace(calibration, normal_scores=tuple(sorted(scores)),
                          mask_threshold=float(np.quantile(pixels, MASK_THRESHOLD_QUANTILE)))
    quantile = detector.calibration.threshold_quantile if threshold_quantile is None else threshold_quantile
    return calibration.with_threshold_quantile(quantile)


def _as_stored(gaussian: FeatureGaussian) -> FeatureGaussian:
    """The Gaussian as a checkpoint holds it (fp16), so that a saved and reloaded detector morphs alike."""
    return FeatureGaussian.from_tensors(gaussian.to_tensors())
