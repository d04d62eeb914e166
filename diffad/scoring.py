"""Raw anomaly maps from a trained denoiser: per-timestep KL, feature error and RGB error, as tensors.

This is the model side of scoring: images in, raw maps per timestep out, nothing calibrated yet. What the maps
mean relative to normal images is `calibration.py`; turning them into a score and a verdict is `postprocess.py`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

from .diffusion import GaussianDiffusion
from .models import DiffADNet

NORMALISATIONS = ("calibrated", "per_image")
ASPECTS = ("squash", "windows")
PIXEL_KINDS = ("kl", "rgb")
MAP_KINDS = (*PIXEL_KINDS, "feature")


def strict_kwargs(cls, values: dict, what: str) -> dict:
    """`values` as keyword arguments of the dataclass `cls`; an unknown key is an error that names it."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
    return dict(values)


@dataclass(frozen=True)
class ScoringConfig:
    """How raw maps become a score: which timesteps, which maps, how they are weighed and normalised.

    What is measured on normal images (statistics, thresholds, smoothing, feature pooling) is the `Calibration`.
    """

    timesteps: tuple[int, ...] = (20, 200, 400)
    # Weight of the pixel (KL or RGB) map against the feature map.
    alpha: float = 0.5
    # "kl" is the method; "rgb" (|x0_hat - x0|) is the baseline the paper ablates against.
    pixel_kind: str = "kl"
    # Mean of the top-k map values is the image score; k is for 256 px and scales with area.
    top_k: int = 64
    # The maps ("kl", "rgb", "feature") whose pixels are centred on the held-out normal images' mean at that
    # position (when the calibration has those maps) rather than on one mean per timestep. Feature errors are
    # always high along borders, so centring them per position helps; centring the per-pixel KL, whose normal means
    # at 256 px are noisy squared errors, cost most of its localisation on bottle (benchmarks/results.md).
    centre_by_position: tuple[str, ...] = ("feature",)
    # "calibrated": z-normalise each timestep's map with held-out normal images' statistics. "per_image": by the map's
    # own mean and std, as the paper's code does; an image's z-map then no longer says how far it is from normal
    # images, so it is kept for the ablation only (benchmarks/results.md).
    normalisation: str = "calibrated"
    seed: int = 0
    # The paper's code, as options: the KL of the step to t - kl_jump (its chain is respaced to 250 of 1000 steps,
    # a jump of 4), with x̂0 clipped to the image range, and a new noise draw for every timestep rather than one
    # shared draw. Each changes the raw maps, so each needs its own calibration.
    kl_jump: int = 1
    clip_x0: bool = False
    fresh_noise: bool = False
    # Gaussian smoothing (sigma in pixels at the model resolution) of the per-pixel KL and RGB maps as they are made,
    # so that their calibration statistics, z units and panels are those of the smoothed map: a per-pixel squared
    # error is far noisier than a defect is small (benchmarks/select_on_validation.py chooses it).
    pixel_smoothing: float = 0.0
    # How a non-square photo meets the square model: "squash" it to R x R (how the model was trained), or score
    # "windows": R x R squares along its long side at its own aspect, maps stitched back (diffad.windows).
    aspect: str = "squash"

    def __post_init__(self):
        if self.normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if self.pixel_kind not in PIXEL_KINDS:
            raise ValueError(f"pixel_kind must be one of {PIXEL_KINDS}, got {self.pixel_kind!r}")
        if self.aspect not in ASPECTS:
            raise ValueError(f"aspect must be one of {ASPECTS}, got {self.aspect!r}")
        if not 1 <= self.kl_jump <= 100:
            raise ValueError(f"kl_jump must be between 1 and 100 timesteps, got {self.kl_jump}")
        if not 0 <= self.pixel_smoothing <= 64:
            raise ValueError(f"pixel_smoothing must be a sigma between 0 and 64 pixels, got {self.pixel_smoothing}")
        object.__setattr__(self, "timesteps", tuple(int(t) for t in self.timesteps))
        if isinstance(self.centre_by_position, str) or not set(self.centre_by_position) <= set(MAP_KINDS):
            raise ValueError(f"centre_by_position must list map kinds among {MAP_KINDS}, got {self.centre_by_position!r}")
        object.__setattr__(self, "centre_by_position", tuple(k for k in MAP_KINDS if k in self.centre_by_position))

    @classmethod
    def from_dict(cls, values: dict) -> "ScoringConfig":
        return cls(**strict_kwargs(cls, values, "scoring"))

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"timesteps": list(self.timesteps),
                                                                       "centre_by_position": list(self.centre_by_position)}

    @property
    def raw_options(self) -> tuple:
        """What the raw maps depend on besides the timesteps: variants that agree here share one model pass."""
        return self.kl_jump, self.clip_x0, self.fresh_noise, self.pixel_smoothing, self.aspect


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


@dataclass(frozen=True)
class RawMaps:
    """Raw maps of a batch of B images at T timesteps, on the device the model ran on."""

    timesteps: tuple[int, ...]
    kl: torch.Tensor  # (B, T, R, R) bits
    rgb: torch.Tensor  # (B, T, R, R) |x0_hat - x0| averaged over channels
    # Pool size -> (B, T, R, R) squared error of the normalised features, averaged over pool x pool feature cells
    # before squaring (1 = unpooled), upsampled to the image.
    features: dict[int, torch.Tensor]
    xt: torch.Tensor | None = None  # (B, T, 3, R, R) the noised inputs, when asked for
    x0_hat: torch.Tensor | None = None  # (B, T, 3, R, R) the model's clean estimates, when asked for

    def __len__(self) -> int:
        return self.kl.shape[0]

    def index(self, t: int) -> int:
        return self.timesteps.index(t)

    @classmethod
    def cat(cls, parts: list["RawMaps"]) -> "RawMaps":
        """One RawMaps from batches of the same timesteps."""
        def joined(name):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return cls(parts[0].timesteps, joined("kl"), joined("rgb"),
                   {k: torch.cat([p.features[k] for p in parts]) for k in parts[0].features}, joined("xt"), joined("x0_hat"))


@torch.no_grad()
def raw_maps(
    net: DiffADNet,
    diffusion: GaussianDiffusion,
    x0: torch.Tensor,
    target_features: torch.Tensor,
    timesteps,
    noise: torch.Tensor,
    feature_pool=(1,),
    keep_images: bool = True,
    forward_batch: int = 16,
    kl_jump: int = 1,
    clip_x0: bool = False,
    pixel_smoothing: float = 0.0,
) -> RawMaps:
    """Raw maps for a batch of images (B, 3, R, R) at each of T timesteps.

    `target_features` are the normalised backbone features of x0; `noise` (B, 3, R, R) is shared by all timesteps
    so that the maps of one image differ only by the noise level, or (B, T, 3, R, R) is one draw per timestep.
    `kl_jump`, `clip_x0`, `pixel_smoothing`: the KL's reverse step and clipping, and the pixel maps' smoothing
    (ScoringConfig). The B x T noised inputs go through the network
    together, `forward_batch` at a time: one image's timesteps cost one forward, not T. Pooling the feature
    residual over k x k cells lets texture the head cannot predict cancel out while a defect, which shifts the
    features coherently, stays. `keep_images`: also return x_t and x̂0 (for viewing; calibration does not need them).
    """
    timesteps = tuple(int(t) for t in timesteps)
    b, n_t = x0.shape[0], len(timesteps)
    # Row i * T + j is image i at timestep j.
    x0_rows = x0.repeat_interleave(n_t, 0)
    t_rows = torch.tensor(timesteps, dtype=torch.long, device=x0.device).repeat(b)
    noise_rows = noise.flatten(0, 1) if noise.dim() == 5 else noise.repeat_interleave(n_t, 0)
    xt = diffusion.q_sample(x0_rows, t_rows, noise_rows)
    outs = [net(xt[i : i + forward_batch], t_rows[i : i + forward_batch]) for i in range(0, len(xt), forward_batch)]
    eps, v = torch.cat([o.eps for o in outs]), torch.cat([o.v for o in outs])
    kl = gaussian_blur(diffusion.kl_map(x0_rows, xt, t_rows, eps, v, kl_jump, clip_x0), pixel_smoothing)
    x0_hat = diffusion.predict_x0(xt, t_rows, eps).clamp(-1, 1)
    rgb = gaussian_blur((x0_hat - x0_rows).abs().mean(dim=1), pixel_smoothing)
    residual = torch.cat([o.features for o in outs]) - target_features.repeat_interleave(n_t, 0)
    features = {}
    for k in pool_sizes(feature_pool):
        pooled = F.avg_pool2d(residual, k, stride=1, padding=k // 2, count_include_pad=False) if k > 1 else residual
        squared = pooled.pow(2).mean(dim=1, keepdim=True)
        features[k] = F.interpolate(squared, size=x0.shape[-2:], mode="bilinear", align_corners=False)[:, 0]

    def per_image(rows: torch.Tensor) -> torch.Tensor:
        return rows.reshape(b, n_t, *rows.shape[1:])

    return RawMaps(
        timesteps, per_image(kl), per_image(rgb), {k: per_image(m) for k, m in features.items()},
        per_image(xt) if keep_images else None, per_image(x0_hat) if keep_images else None,
    )


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, H, W) maps smoothed with a separable Gaussian (edges replicated, so any map size works)."""
    if sigma <= 0:
        return maps
    rows = _blur_matrix(maps.shape[-2], float(sigma), maps.dtype, maps.device)
    columns = _blur_matrix(maps.shape[-1], float(sigma), maps.dtype, maps.device)
    return rows @ maps @ columns.T


@functools.lru_cache(maxsize=32)
def _blur_matrix(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1-D Gaussian blur with replicated edges as a (size, size) matrix: a matrix product runs 10x faster on a
    CPU than a one-channel convolution with a kernel as wide as sigma = 16 needs."""
    radius = max(1, round(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-offsets**2 / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    # Replicated edges: every tap that falls outside the map reads the nearest edge pixel.
    sources = (torch.arange(size)[:, None] + offsets.long()[None]).clamp(0, size - 1)
    matrix = torch.zeros(size, size, dtype=torch.float64).scatter_add_(1, sources, kernel.expand(size, -1).contiguous())
    return matrix.to(dtype=dtype, device=device)
