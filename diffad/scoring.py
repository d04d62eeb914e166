"""Anomaly maps from a trained denoiser: per-timestep KL, feature error and RGB error, and their combination."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion
from .models import DiffADNet

NORMALISATIONS = ("calibrated", "per_image")


@dataclass
class ScoringConfig:
    timesteps: tuple[int, ...] = (20, 200, 400)
    # Weight of the pixel (KL or RGB) map against the feature map.
    alpha: float = 0.5
    # "kl" is the method; "rgb" (|x0_hat - x0|) is the baseline the paper ablates against.
    pixel_map: str = "kl"
    # Mean of the top-k map values is the image score; k is for 256 px and scales with area.
    top_k: int = 64
    smoothing_sigma: float = 0.0
    # Centre each pixel on the held-out normal images' mean at that position (when the checkpoint has those maps)
    # rather than on one mean per timestep.
    centre_by_position: bool = True
    # "calibrated": z-normalise each timestep's map with held-out normal images' statistics. "per_image": by the map's
    # own mean and std, as the paper's code does; an image's z-map no longer says how far it is from normal images
    # (bottle image AUROC 0.86 instead of 0.99), so it is kept for the ablation only.
    normalisation: str = "calibrated"
    # Average the feature residual over k x k neighbourhoods of the feature grid (odd k; 1 = off) before squaring.
    # Texture the head cannot predict leaves a residual that cancels out over a neighbourhood; a defect shifts the
    # features coherently and stays. Several sizes make a multi-scale map: each size's map is z-normalised on its
    # own and they are averaged, so small defects keep the sharp k = 1 map and wide, faint ones (magnetic_tile
    # "uneven") gain the 9 x 9 one. Large k alone blurs small defects (bottle AUPRO 0.96 -> 0.85 at k = 9,
    # benchmarks/results.md). The maps must be calibrated with these sizes (`diffad calibrate --feature-pool 1,3,9`).
    feature_pool: tuple[int, ...] = (1,)
    seed: int = 0

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.pixel_map not in ("kl", "rgb"):
            raise ValueError(f"pixel_map must be 'kl' or 'rgb', got {self.pixel_map!r}")
        self.feature_pool = pool_sizes(self.feature_pool)

    @classmethod
    def from_dict(cls, values: dict) -> "ScoringConfig":
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "timesteps" in known:
            known["timesteps"] = tuple(int(t) for t in known["timesteps"])
        return cls(**known)

    def to_dict(self) -> dict:
        return {**self.__dict__, "timesteps": list(self.timesteps), "feature_pool": list(self.feature_pool)}


def pool_sizes(value) -> tuple[int, ...]:
    """Feature-pooling sizes as a sorted tuple from an int, a sequence or a string like "1,3,9"."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"feature_pool must be odd whole numbers separated by commas, got {value!r}") from None
    sizes = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if not sizes or any(k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"feature_pool must be one or more odd numbers of feature cells (1 = off), got {value!r}")
    return tuple(sorted(set(sizes)))


def feature_kind(pool: int) -> str:
    """Name of the feature map pooled over pool x pool cells, in calibration statistics and position means."""
    return "feature" if pool == 1 else f"feature@{pool}"


def map_kinds(pools) -> tuple[str, ...]:
    """Every raw map a step holds for these pooling sizes, in the order position means are stored."""
    return ("kl", *(feature_kind(k) for k in pools), "rgb")


@dataclass
class StepMaps:
    """Everything seen at one timestep, for one image."""

    t: int
    xt: torch.Tensor  # (3, R, R) noised input
    x0_hat: torch.Tensor  # (3, R, R) the model's clean estimate
    kl: np.ndarray  # (R, R) bits
    features: dict[int, np.ndarray]  # pool size -> (R, R) squared error of normalised features, upsampled
    rgb: np.ndarray  # (R, R) |x0_hat - x0| averaged over channels

    @property
    def feature(self) -> np.ndarray:
        """The finest feature-error map (unpooled unless only pooled sizes were asked for)."""
        return self.features[min(self.features)]

    def map(self, kind: str) -> np.ndarray:
        if kind.startswith("feature"):
            return self.features[int(kind.partition("@")[2] or 1)]
        return getattr(self, kind)


@torch.no_grad()
def step_maps(
    net: DiffADNet,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    target_features: torch.Tensor,
    timesteps,
    noise: torch.Tensor,
    feature_pool=(1,),
) -> list[list[StepMaps]]:
    """Raw maps for a batch of images (B, 3, R, R) at each timestep; one forward pass per timestep.

    `target_features` are the normalised backbone features of x0; `noise` (B, 3, R, R) is shared by all timesteps
    so that the maps of one image differ only by the noise level. `feature_pool`: see `ScoringConfig`.
    """
    per_image: list[list[StepMaps]] = [[] for _ in range(x0.shape[0])]
    size = x0.shape[-2:]
    for t in timesteps:
        t_batch = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
        xt = diffusion.q_sample(x0, t_batch, noise)
        out = net(xt, t_batch)
        kl = diffusion.kl_map(x0, xt, t_batch, out.eps, out.v)
        x0_hat = diffusion.predict_x0(xt, t_batch, out.eps).clamp(-1, 1)
        rgb = (x0_hat - x0).abs().mean(dim=1)
        residual = out.features - target_features
        features = {}
        for k in pool_sizes(feature_pool):
            pooled = F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else residual
            feat = pooled.pow(2).mean(dim=1, keepdim=True)
            features[k] = F.interpolate(feat, size=size, mode="bilinear", align_corners=False)[:, 0].cpu().numpy()
        for i in range(x0.shape[0]):
            per_image[i].append(StepMaps(int(t), xt[i].cpu(), x0_hat[i].cpu(), kl[i].cpu().numpy(),
                                         {k: maps[i] for k, maps in features.items()}, rgb[i].cpu().numpy()))
    return per_image


def gaussian_smooth(amap: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return amap
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(amap, sigma=sigma, mode="nearest")


def top_k_mean(amap: np.ndarray, top_k: int) -> float:
    k = max(1, round(top_k * amap.size / 256**2))
    flat = amap.ravel()
    return float(np.partition(flat, flat.size - k)[-k:].mean())


@dataclass
class CombinedMaps:
    anomaly: np.ndarray  # the final map: sum over timesteps of alpha*pixel_z + (1-alpha)*feature_z
    pixel: np.ndarray  # sum over timesteps of the z-normalised pixel (KL or RGB) maps
    feature: np.ndarray  # sum over timesteps of the z-normalised feature maps (averaged over pooling sizes)
    score: float


def combine(steps: list[StepMaps], step_stats: dict, config: ScoringConfig, position_means: dict | None = None) -> CombinedMaps:
    """z-normalise each timestep's maps by that step's statistics on normal images (or, with
    `normalisation="per_image"`, by each map's own), then sum over timesteps.

    With `position_means` (t -> kind -> (R, R) mean map of normal images), each pixel is centred on what normal
    images show at that position instead of on one mean for the whole map: borders and other places where the
    model is always a little off stop looking anomalous.
    """
    kinds = map_kinds(config.feature_pool)
    sums = {kind: 0.0 for kind in kinds}
    for step in steps:
        stats = step_stats.get(str(step.t))
        if stats is None:
            raise ValueError(f"timestep {step.t} has no calibration statistics (calibrated: {sorted(step_stats, key=int)})")
        centres = (position_means or {}).get(step.t, {}) if config.centre_by_position else {}
        for kind in kinds:
            raw = step.map(kind)
            if config.normalisation == "per_image":
                mean, std = float(raw.mean()), float(raw.std())
            else:
                mean, std = centres.get(kind, stats[kind][0]), stats[kind][1]
            sums[kind] = sums[kind] + (raw - mean) / max(std, 1e-12)
    pixel = sums[config.pixel_map]
    feature = sum(sums[feature_kind(k)] for k in config.feature_pool) / len(config.feature_pool)
    anomaly = gaussian_smooth(config.alpha * pixel + (1 - config.alpha) * feature, config.smoothing_sigma)
    return CombinedMaps(anomaly, pixel, feature, top_k_mean(anomaly, config.top_k))
