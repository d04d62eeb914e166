"""The morph's model of normal backbone features: a Gaussian per feature-grid position (PaDiM style).

Fitted when a checkpoint is trained or recalibrated and stored with its calibration; the morph's energy is the
summed Mahalanobis distance of an image's features to it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

GAUSSIAN_KEYS = ("gaussian_mean", "gaussian_precision", "gaussian_dims")
# Added to every covariance so that it stays invertible (PaDiM's choice).
COVARIANCE_EPS = 0.01
# The Gaussian is also fitted on copies of the training images with this much pixel noise (std, images in [-1, 1]).
# The morph's iterates are normal images plus up to N_d * s^2 of noise (std 0.045 at its defaults). Fitted on clean
# images only, the backbone reacts so strongly to noise that a slightly noisy normal image has far more energy
# than a defective one: the gradient then chases the noise the morph itself adds, and the energy rises.
FIT_NOISE_LEVELS = (0.01, 0.02, 0.045)


@dataclass
class FeatureGaussian:
    """Per-position mean and precision (inverse covariance) of a random subset of backbone feature channels."""

    mean: torch.Tensor  # (P, d)
    precision: torch.Tensor  # (P, d, d)
    dims: torch.Tensor  # (d,) channel indices into the backbone features

    @staticmethod
    def random_dims(channels: int, dims: int = 64, seed: int = 0) -> torch.Tensor:
        return torch.randperm(channels, generator=torch.Generator().manual_seed(seed))[: min(dims, channels)].sort().values

    @classmethod
    def fit(cls, features: torch.Tensor, dims: int = 64, seed: int = 0) -> "FeatureGaussian":
        """`features`: (N, C, g, g) backbone features of normal images."""
        chosen = cls.random_dims(features.shape[1], dims, seed)
        return cls.fit_selected(features[:, chosen], chosen)

    @classmethod
    def fit_selected(cls, features: torch.Tensor, chosen: torch.Tensor) -> "FeatureGaussian":
        """`features`: (N, d, g, g), already restricted to the channels `chosen`."""
        n, d, gh, gw = features.shape
        if n < 2:
            raise ValueError("fitting the feature Gaussian needs at least 2 normal images")
        x = features.float().permute(2, 3, 0, 1).reshape(gh * gw, n, d)  # (P, N, d)
        mean = x.mean(dim=1)
        centred = x - mean[:, None]
        covariance = centred.transpose(1, 2) @ centred / (n - 1) + COVARIANCE_EPS * torch.eye(d)
        return cls(mean, torch.linalg.inv(covariance), chosen)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        # fp16 keeps a 32x32 grid of 64x64 precisions near 8 MB; eigenvalues are bounded by 1/COVARIANCE_EPS.
        return {"gaussian_mean": self.mean.half(), "gaussian_precision": self.precision.half(), "gaussian_dims": self.dims}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "FeatureGaussian":
        missing = [k for k in GAUSSIAN_KEYS if k not in tensors]
        if missing:
            raise ValueError("this checkpoint has no feature Gaussian for the morph (run `diffad calibrate`)")
        mean, precision, dims = tensors["gaussian_mean"], tensors["gaussian_precision"], tensors["gaussian_dims"]
        p, d = mean.shape if mean.dim() == 2 else (0, 0)
        if not d or precision.shape != (p, d, d) or dims.shape != (d,) or not torch.isfinite(precision.float()).all():
            raise ValueError("the checkpoint's feature Gaussian has inconsistent shapes or values")
        return cls(mean.float(), precision.float(), dims.long())

    def energy(self, features: torch.Tensor) -> torch.Tensor:
        """Per-image energy: (B, C, g, g) features -> (B,) summed squared Mahalanobis distances."""
        b, _, gh, gw = features.shape
        f = features[:, self.dims.to(features.device)].permute(0, 2, 3, 1).reshape(b, gh * gw, -1)
        delta = f - self.mean.to(features.device)
        return torch.einsum("bpi,pij,bpj->b", delta, self.precision.to(features.device), delta)


@torch.no_grad()
def fit_feature_gaussian(backbone, images: torch.Tensor, features: torch.Tensor, dims: int = 64, seed: int = 0,
                         batch_size: int = 16) -> FeatureGaussian:
    """The morph's Gaussian from `features` (N, C, g, g) of normal images and noisy copies of `images` (M, 3, R, R)."""
    chosen = FeatureGaussian.random_dims(features.shape[1], dims, seed)
    device = next(backbone.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    parts = [features[:, chosen].half()]
    for level in FIT_NOISE_LEVELS:
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size]
            noisy = (batch + level * torch.randn(batch.shape, generator=generator)).clamp(-1, 1)
            parts.append(backbone(noisy.to(device))[:, chosen.to(device)].half().cpu())
    return FeatureGaussian.fit_selected(torch.cat(parts), chosen)
