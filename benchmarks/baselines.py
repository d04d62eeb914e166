"""PaDiM and PatchCore on the same frozen EfficientNet-Lite0 features diffad uses, for a fair comparison."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from diffad.gaussian import FeatureGaussian


def _features(backbone, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([backbone(images[i : i + batch]) for i in range(0, len(images), batch)])


def _to_maps(patch_scores: torch.Tensor, resolution: int, sigma: float = 4.0) -> np.ndarray:
    maps = F.interpolate(patch_scores[:, None], size=resolution, mode="bilinear", align_corners=False)[:, 0].numpy()
    return np.stack([gaussian_filter(m, sigma) for m in maps])


class PaDiM:
    """Per-position Gaussian of (a random 100-channel subset of) the features; Mahalanobis distance map."""

    def __init__(self, backbone, dims: int = 100):
        self.backbone, self.dims = backbone, dims

    def fit(self, images: torch.Tensor) -> "PaDiM":
        self.gaussian = FeatureGaussian.fit(_features(self.backbone, images), dims=self.dims)
        return self

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        feats = _features(self.backbone, images)
        b, _, gh, gw = feats.shape
        f = feats[:, self.gaussian.dims].permute(0, 2, 3, 1).reshape(b, gh * gw, -1) - self.gaussian.mean
        dist = torch.einsum("bpi,pij,bpj->bp", f, self.gaussian.precision, f).clamp_min(0).sqrt().reshape(b, gh, gw)
        maps = _to_maps(dist, images.shape[-1])
        return maps.reshape(b, -1).max(axis=1), maps


class PatchCore:
    """Locally aware patch features (3x3 average), a greedy 10% coreset memory bank, nearest-neighbour distance."""

    def __init__(self, backbone, coreset_ratio: float = 0.1, projection_dim: int = 128, seed: int = 0,
                 pool_size: int = 60_000, max_memory: int = 20_000):
        self.backbone, self.ratio, self.projection_dim, self.seed = backbone, coreset_ratio, projection_dim, seed
        # The greedy coreset (10% of all patches, at most max_memory) is chosen from a random pool of pool_size
        # patches, which keeps it to about a minute on one CPU thread.
        self.pool_size, self.max_memory = pool_size, max_memory

    def _patches(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        feats = F.avg_pool2d(_features(self.backbone, images), 3, stride=1, padding=1)
        b, c, gh, gw = feats.shape
        return feats.permute(0, 2, 3, 1).reshape(-1, c), (b, gh, gw)

    def fit(self, images: torch.Tensor) -> "PatchCore":
        patches, _ = self._patches(images)
        generator = torch.Generator().manual_seed(self.seed)
        n_select = max(1, min(int(len(patches) * self.ratio), self.max_memory))
        if len(patches) > self.pool_size:
            patches = patches[torch.randperm(len(patches), generator=generator)[: self.pool_size]]
        projected = patches @ torch.randn(patches.shape[1], self.projection_dim, generator=generator) / self.projection_dim**0.5
        selected = [int(torch.randint(len(patches), (1,), generator=generator))]
        min_dist = (projected - projected[selected[0]]).pow(2).sum(dim=1)
        for _ in range(min(n_select, len(patches)) - 1):
            idx = int(torch.argmax(min_dist))
            selected.append(idx)
            min_dist = torch.minimum(min_dist, (projected - projected[idx]).pow(2).sum(dim=1))
        self.memory = patches[selected]
        return self

    def predict(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        patches, (b, gh, gw) = self._patches(images)
        dist = torch.cat([torch.cdist(chunk, self.memory).min(dim=1).values for chunk in patches.split(4096)])
        dist = dist.reshape(b, gh, gw)
        maps = _to_maps(dist, images.shape[-1])
        return dist.reshape(b, -1).max(dim=1).values.numpy(), maps
