"""AnomalyDetector: a trained category model (denoiser + frozen backbone + calibration) that scores images."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from .backbone import DEFAULT_BACKBONE, FeatureExtractor
from .data import read_image, to_tensor, to_uint8
from .diffusion import GaussianDiffusion
from .models import DiffADNet
from .scoring import CombinedMaps, ScoringConfig, StepMaps, combine, feature_kind, pool_sizes, step_maps

# Version 2: NetConfig.prediction (version 1 networks predict the noise; checkpoint.MIGRATIONS upgrades them).
FORMAT_VERSION = 2
# Default verdict threshold: this quantile of the held-out normal images' scores.
IMAGE_THRESHOLD_QUANTILE = 0.99
# Default mask threshold: this quantile of the held-out normal images' pixel values.
PIXEL_THRESHOLD_QUANTILE = 0.999
# Position means of the extra (pooled) feature maps are stored this many times smaller: pooling over >= 3 feature
# cells already makes them smooth, and full size would push a three-size checkpoint past 30 MB.
POOLED_MEAN_DOWNSCALE = 4
# Gaussian smoothing (sigma in pixels at the model resolution) tried when calibrating; 0 is none.
SMOOTHING_CANDIDATES = (0.0, 2.0, 4.0, 8.0)


def shared_backbone(name: str = DEFAULT_BACKBONE) -> FeatureExtractor:
    """One frozen backbone per name, shared by every loaded category and by training."""
    return _backbone_named(name)


# Behind a wrapper because lru_cache keys f() and f(DEFAULT_BACKBONE) apart: training (which moves its backbone
# to the GPU) and the detector it calibrates would otherwise hold two copies on two devices.
@functools.lru_cache(maxsize=4)
def _backbone_named(name: str) -> FeatureExtractor:
    return FeatureExtractor(name)


def _position_mean_kinds(pools) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Map kinds whose position means are stored at full size, and the coarser pooled ones stored smaller."""
    return ("kl", feature_kind(pools[0]), "rgb"), tuple(feature_kind(k) for k in pools[1:])


@dataclass
class Calibration:
    """What normal looks like for this category, measured on held-out good images."""

    normal_scores: list[float] = field(default_factory=list)
    image_threshold: float = float("inf")
    pixel_threshold: float = float("inf")
    # str(t) -> map kind -> [mean, std] over normal pixels; used to z-normalise each timestep's map.
    step_stats: dict = field(default_factory=dict)
    # Smoothing chosen on synthetic defects pasted into held-out normal images: sigma -> validation metrics.
    smoothing_validation: dict = field(default_factory=dict)
    # The feature-residual pooling sizes the statistics were measured with (ScoringConfig.feature_pool).
    feature_pool: tuple[int, ...] = (1,)

    def percentile(self, score: float) -> float:
        if not self.normal_scores:
            return float("nan")
        return 100.0 * float(np.mean(np.asarray(self.normal_scores) <= score))

    def to_dict(self) -> dict:
        return {**self.__dict__, "feature_pool": list(self.feature_pool)}

    @classmethod
    def from_dict(cls, values: dict) -> "Calibration":
        values = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        pool = values.get("feature_pool", 1)
        if isinstance(pool, int) and pool > 1:  # written when one size was all there was: its map was "feature"
            values["step_stats"] = {t: {(feature_kind(pool) if kind == "feature" else kind): v for kind, v in kinds.items()}
                                    for t, kinds in values.get("step_stats", {}).items()}
        values["feature_pool"] = pool_sizes(pool)
        return cls(**values)


@dataclass
class Prediction:
    image: torch.Tensor  # (3, R, R) the input as the model saw it, in [-1, 1]
    score: float
    percentile: float  # of the score among held-out normal images
    threshold: float
    is_anomalous: bool
    anomaly_map: np.ndarray  # (R, R) combined map in calibrated (z) units
    pixel_map: np.ndarray
    feature_map: np.ndarray
    rgb_map: np.ndarray
    pixel_threshold: float
    steps: list[StepMaps]  # every timestep computed, including extra ones requested for viewing

    @property
    def verdict(self) -> str:
        return "anomalous" if self.is_anomalous else "normal"

    def mask(self, threshold: float | None = None) -> np.ndarray:
        return self.anomaly_map > (self.pixel_threshold if threshold is None else threshold)


class AnomalyDetector:
    """Ten-line usage::

        detector = diffad.load_checkpoint("checkpoints/bottle")
        prediction = detector.predict("photo.png")
        print(prediction.score, prediction.percentile, prediction.verdict)
        heat_map = prediction.anomaly_map
    """

    def __init__(
        self,
        net: DiffADNet,
        *,
        category: str,
        scoring: ScoringConfig | None = None,
        calibration: Calibration | None = None,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        backbone: str = DEFAULT_BACKBONE,
        diffusion: GaussianDiffusion | None = None,
        training: dict | None = None,
        extra_tensors: dict | None = None,
    ):
        self.net = net.eval()
        self.category = category
        self.scoring = scoring or ScoringConfig()
        self.calibration = calibration or Calibration()
        self.backbone_name = backbone
        self.backbone = shared_backbone(backbone)
        self.diffusion = diffusion or GaussianDiffusion()
        channels = net.config.feature_channels
        self.feature_mean = feature_mean if feature_mean is not None else torch.zeros(channels)
        self.feature_std = feature_std if feature_std is not None else torch.ones(channels)
        self.training = training or {}
        # Optional tensors stored with the checkpoint (the morph's feature Gaussian).
        self.extra_tensors = extra_tensors or {}
        self.cache: dict = {}

    @property
    def resolution(self) -> int:
        return self.net.config.resolution

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "AnomalyDetector":
        self.net.to(device)
        self.backbone.to(device)
        self.feature_mean, self.feature_std = self.feature_mean.to(device), self.feature_std.to(device)
        return self

    def preprocess(self, image) -> torch.Tensor:
        """Path, bytes, PIL image or (3, R, R) tensor in [-1, 1] -> (3, R, R) tensor at the model's resolution."""
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a (3, H, W) tensor, got {tuple(image.shape)}")
            if image.shape[-1] != self.resolution or image.shape[-2] != self.resolution:
                image = torch.nn.functional.interpolate(image[None], size=self.resolution, mode="bicubic")[0]
            return image.float().clamp(-1, 1)
        return to_tensor(read_image(image), self.resolution)

    @torch.no_grad()
    def normalized_features(self, x0: torch.Tensor) -> torch.Tensor:
        mean, std = self.feature_mean.view(1, -1, 1, 1), self.feature_std.view(1, -1, 1, 1)
        return (self.backbone(x0.to(self.device)) - mean) / std

    def validate_timesteps(self, timesteps) -> list[int]:
        ts = sorted({int(t) for t in timesteps})
        if not ts or ts[0] < 0 or ts[-1] >= self.diffusion.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.diffusion.num_timesteps - 1}], got {list(timesteps)}")
        return ts

    @torch.no_grad()
    def raw_steps(self, x0: torch.Tensor, timesteps, seed: int | None = None, feature_pool=None) -> list[list[StepMaps]]:
        """Per-image, per-timestep raw maps for a batch (B, 3, R, R); deterministic for a seed.

        `feature_pool`: the pooling sizes to make feature maps for (default: this detector's scoring)."""
        seed = self.scoring.seed if seed is None else seed
        generator = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(x0.shape[1:], generator=generator).expand_as(x0).contiguous()
        x0 = x0.to(self.device)
        return step_maps(
            self.net, self.diffusion, x0, self.normalized_features(x0), self.validate_timesteps(timesteps), noise.to(self.device),
            self.scoring.feature_pool if feature_pool is None else feature_pool,
        )

    @torch.no_grad()
    def reconstruct(self, x0: torch.Tensor, t: int, steps: int, seed: int = 0) -> torch.Tensor:
        """Noise a (3, R, R) image to t, then denoise it back with `steps` deterministic DDIM steps."""
        from diffusers import DDIMScheduler

        t = self.validate_timesteps([t])[0]
        scheduler = DDIMScheduler.from_config(self.diffusion.scheduler.config, clip_sample=True)
        scheduler.set_timesteps(max(1, steps * self.diffusion.num_timesteps // max(t, 1)))
        timesteps = scheduler.timesteps[scheduler.timesteps <= t]
        noise = torch.randn(x0[None].shape, generator=torch.Generator().manual_seed(int(seed)))
        # Noise exactly to the first scheduled timestep so that the first step removes the right amount.
        x = self.diffusion.q_sample(x0[None], int(timesteps[0]), noise).to(self.device)
        for step_t in timesteps:
            x = scheduler.step(self.net(x, step_t.view(1).to(self.device)).eps, step_t, x).prev_sample
        return x[0].clamp(-1, 1).cpu()

    def position_means(self) -> dict | None:
        """t -> map kind -> (R, R) mean map of held-out normal images, or None for checkpoints without them."""
        if "position_means" not in self.cache:
            self.cache["position_means"] = self._unpack_position_means()
        return self.cache["position_means"]

    def _unpack_position_means(self) -> dict | None:
        maps, timesteps = self.extra_tensors.get("position_mean"), self.extra_tensors.get("position_mean_timesteps")
        if maps is None and timesteps is None:
            return None
        size, (kinds, pooled_kinds) = self.resolution, _position_mean_kinds(self.calibration.feature_pool)
        pooled = self.extra_tensors.get("position_mean_pooled", torch.zeros(0))
        small = size // POOLED_MEAN_DOWNSCALE
        if (maps is None or timesteps is None or timesteps.dim() != 1 or maps.shape != (len(timesteps), len(kinds), size, size)
                or (pooled_kinds and pooled.shape != (len(timesteps), len(pooled_kinds), small, small))
                or not torch.isfinite(maps.float()).all() or not torch.isfinite(pooled.float()).all()):
            raise ValueError("the checkpoint's position-wise normal means have inconsistent shapes or values")
        if pooled_kinds:
            maps = torch.cat([maps.float(), F.interpolate(pooled.float(), size=(size, size), mode="bilinear", align_corners=False)], 1)
            kinds += pooled_kinds
        maps = maps.float().numpy()
        return {int(t): {kind: maps[i, k] for k, kind in enumerate(kinds)} for i, t in enumerate(timesteps.tolist())}

    def check_calibrated_for(self, scoring: ScoringConfig) -> None:
        """The calibration statistics hold only for maps made with the feature pooling sizes they were measured with."""
        missing = set(scoring.feature_pool) - set(self.calibration.feature_pool)
        if missing:
            asked, calibrated = (",".join(map(str, pools)) for pools in (scoring.feature_pool, self.calibration.feature_pool))
            raise ValueError(f"feature_pool {asked} is not among the sizes {calibrated} this {self.category} checkpoint "
                             f"was calibrated with: run diffad calibrate --feature-pool {asked} first")

    def combine(self, steps: list[StepMaps], scoring: ScoringConfig | None = None) -> CombinedMaps:
        scoring = scoring or self.scoring
        self.check_calibrated_for(scoring)
        chosen = [s for s in steps if s.t in set(scoring.timesteps)]
        return combine(chosen, self.calibration.step_stats, scoring, self.position_means())

    def predict(self, image, *, seed: int | None = None, view_timesteps=()) -> Prediction:
        """Score one image. `view_timesteps` adds timesteps whose maps are kept for viewing but not scored."""
        x0 = self.preprocess(image)
        timesteps = self.validate_timesteps(list(self.scoring.timesteps) + list(view_timesteps))
        steps = self.raw_steps(x0[None], timesteps, seed)[0]
        maps = self.combine(steps)
        rgb = sum(s.rgb for s in steps if s.t in set(self.scoring.timesteps))
        return Prediction(
            image=x0,
            score=maps.score,
            percentile=self.calibration.percentile(maps.score),
            threshold=self.calibration.image_threshold,
            is_anomalous=bool(maps.score > self.calibration.image_threshold),
            anomaly_map=maps.anomaly,
            pixel_map=maps.pixel,
            feature_map=maps.feature,
            rgb_map=rgb,
            pixel_threshold=self.calibration.pixel_threshold,
            steps=steps,
        )

    def select_smoothing(self, normal_images: torch.Tensor, sigmas=SMOOTHING_CANDIDATES, batch_size: int = 8) -> dict:
        """Pick the map smoothing on synthetic defects in held-out normal images (never on test data).

        Each candidate sigma is scored by the mean of pixel AUROC and AUPRO; the best becomes the default.
        """
        from .metrics import aupro, auroc, localisation_quality
        from .synth import DEFECT_TYPES, add_defect

        images, masks = [], []
        for i, image in enumerate(normal_images):
            picture, mask = add_defect(to_uint8(image), DEFECT_TYPES[i % len(DEFECT_TYPES)], seed=i, size=0.5)
            images.append(torch.from_numpy(picture).permute(2, 0, 1).float() / 127.5 - 1)
            masks.append(mask)
        steps = []
        for start in range(0, len(images), batch_size):
            steps += self.raw_steps(torch.stack(images[start : start + batch_size]), self.scoring.timesteps)
        masks = np.stack(masks)
        results = {}
        for sigma in sigmas:
            config = dataclasses.replace(self.scoring, smoothing_sigma=float(sigma))
            maps = np.stack([self.combine(s, config).anomaly for s in steps])
            results[str(sigma)] = {"pixel_auroc": auroc(masks, maps), "aupro": aupro(masks, maps)}
        best = max(results, key=lambda k: localisation_quality(results[k]))
        self.scoring.smoothing_sigma = float(best)
        self.calibration.smoothing_validation = results
        return results

    def calibrate(self, normal_images: torch.Tensor, timesteps, batch_size: int = 8, select_smoothing: bool = True) -> Calibration:
        """Measure per-timestep map statistics and the score distribution on held-out normal images."""
        timesteps = self.validate_timesteps(list(timesteps) + list(self.scoring.timesteps))
        all_steps = []
        for start in range(0, len(normal_images), batch_size):
            all_steps += self.raw_steps(normal_images[start : start + batch_size], timesteps)
        full_kinds, pooled_kinds = _position_mean_kinds(self.scoring.feature_pool)
        kinds = full_kinds + pooled_kinds
        stats, means = {}, torch.zeros(len(timesteps), len(kinds), self.resolution, self.resolution)
        for i, t in enumerate(timesteps):
            stats[str(t)] = {}
            for k, kind in enumerate(kinds):
                values = np.stack([steps[i].map(kind) for steps in all_steps])
                stats[str(t)][kind] = [float(values.mean()), float(values.std())]
                means[i, k] = torch.from_numpy(values.mean(axis=0))
        self.calibration = Calibration(step_stats=stats, feature_pool=self.scoring.feature_pool)
        # Full resolution: pooling them blurred the thin ring of border errors (magnetic_tile AUPRO 0.751 vs 0.776).
        n_full = len(full_kinds)
        self.extra_tensors["position_mean"] = means[:, :n_full].half()
        if pooled_kinds:
            self.extra_tensors["position_mean_pooled"] = F.avg_pool2d(means[:, n_full:], POOLED_MEAN_DOWNSCALE).half()
        else:
            self.extra_tensors.pop("position_mean_pooled", None)
        self.extra_tensors["position_mean_timesteps"] = torch.tensor(timesteps, dtype=torch.int64)
        self.cache.pop("position_means", None)
        if select_smoothing:
            self.select_smoothing(normal_images, batch_size=batch_size)
        combined = [self.combine(steps) for steps in all_steps]
        scores = [c.score for c in combined]
        pixels = np.concatenate([c.anomaly.ravel() for c in combined])
        self.calibration.normal_scores = sorted(scores)
        self.calibration.image_threshold = float(np.quantile(scores, IMAGE_THRESHOLD_QUANTILE))
        self.calibration.pixel_threshold = float(np.quantile(pixels, PIXEL_THRESHOLD_QUANTILE))
        return self.calibration

    def config_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "category": self.category,
            "backbone": self.backbone_name,
            "diffusion": {"num_train_timesteps": self.diffusion.num_timesteps, "beta_schedule": self.diffusion.beta_schedule},
            "net": self.net.config.to_dict(),
            "scoring": self.scoring.to_dict(),
            "calibration": self.calibration.to_dict(),
            "training": self.training,
        }
