"""Does a photo look like the category at all? A distance of its global backbone features from the normal ones.

The anomaly score says how *defective* a part looks; it cannot say that a photo is not the part at all (a tile under
the bottle model, noise, a 1x1 image): those are simply "anomalous 100%". This module fits a Gaussian to the
spatially averaged backbone features of a category's training images and measures a photo's Mahalanobis distance
from it. The threshold is chosen on held-out normals of the category against images of another category, and the
whole statistic lives next to the checkpoint in ood.safetensors (`python -m diffad.ood --help` regenerates it).
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import list_images, list_test_samples, load_images, train_folder

FILE_NAME = "ood.safetensors"
# Ledoit-Wolf-style shrinkage towards the average variance: 144 channels from ~200 images is a poorly
# conditioned covariance, and an unshrunk inverse makes every unseen photo look infinitely far away.
SHRINKAGE = 0.1
# See choose_threshold: how far below the nearest image of another category the cut sits, when there is room.
FOREIGN_MARGIN = 1.5


@dataclass(frozen=True)
class FeatureDistance:
    """Mean and precision of a category's global features, and the distance beyond which a photo is 'not this'."""

    mean: torch.Tensor  # (C,)
    precision: torch.Tensor  # (C, C)
    threshold: float
    report: dict  # how the threshold was chosen and what it does on held-out images

    @classmethod
    def fit(cls, features: torch.Tensor) -> FeatureDistance:
        """`features`: (N, C) global features of normal images. The threshold is set by choose_threshold."""
        x = features.double()
        mean = x.mean(0)
        cov = torch.cov((x - mean).T)
        target = torch.eye(len(mean), dtype=x.dtype) * cov.diagonal().mean()
        precision = torch.linalg.inv((1 - SHRINKAGE) * cov + SHRINKAGE * target)
        return cls(mean.float(), precision.float(), float("inf"), {})

    def distance(self, features: torch.Tensor) -> np.ndarray:
        """(B, C) global features -> (B,) Mahalanobis distances."""
        delta = features.float().cpu() - self.mean
        return torch.einsum("bi,ij,bj->b", delta, self.precision, delta).clamp_min(0).sqrt().numpy()

    def is_outside(self, distance: float) -> bool:
        return bool(distance > self.threshold)

    def save(self, folder) -> Path:
        from safetensors.torch import save_file

        path = Path(folder) / FILE_NAME
        save_file({"mean": self.mean.contiguous(), "precision": self.precision.contiguous()}, str(path),
                  metadata={"threshold": repr(self.threshold), "report": json.dumps(self.report)})
        return path

    @classmethod
    def load(cls, path) -> FeatureDistance:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            mean, precision = handle.get_tensor("mean"), handle.get_tensor("precision")
        if mean.dim() != 1 or precision.shape != (len(mean), len(mean)) or "threshold" not in meta:
            raise ValueError(f"{path}: not a diffad out-of-distribution statistic")
        return cls(mean.float(), precision.float(), float(meta["threshold"]), json.loads(meta.get("report", "{}")))


@torch.no_grad()
def global_features(backbone, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(N, 3, R, R) images in [-1, 1] -> (N, C) spatially averaged backbone features."""
    device = next(backbone.parameters()).device
    parts = [backbone(images[i : i + batch_size].to(device)).mean(dim=(2, 3)).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(parts)


def choose_threshold(inside: np.ndarray, outside: np.ndarray) -> float:
    """The cut between distances that should pass (held-out normals) and those that should not (another category).

    Photos of the right product taken differently (another camera or light, a generated example) land between
    the two groups, and the note is meant for photos that are clearly something else: so when the groups are
    separated by more than FOREIGN_MARGIN, the cut sits that factor below the nearest foreign image. Otherwise it
    is the cut with the best balanced accuracy (ties towards the middle)."""
    if inside.max() * FOREIGN_MARGIN < outside.min():
        return float(outside.min() / FOREIGN_MARGIN)
    candidates = np.unique(np.concatenate([inside, outside]))
    accuracy = [(np.mean(inside <= c) + np.mean(outside > c)) / 2 for c in candidates]
    best = np.flatnonzero(np.isclose(accuracy, max(accuracy)))
    return float(candidates[best[len(best) // 2]])


def calibrate(backbone, category_root, other_root, resolution: int, holdout: float = 0.2, max_other: int = 200,
              seed: int = 0) -> FeatureDistance:
    """Fit on most training images; choose the threshold on half of the held-out normals and of the other
    category's images; report the rates on the other half and on the category's own defective test images."""
    rng = np.random.default_rng(seed)
    train = list_images(train_folder(category_root))
    order = rng.permutation(len(train))
    n_hold = max(2, int(len(train) * holdout))
    fit_paths = [train[i] for i in order[n_hold:]]
    samples = list_test_samples(category_root)
    held_paths = [train[i] for i in order[:n_hold]] + [s.path for s in samples if not s.is_anomalous]
    defect_paths = [s.path for s in samples if s.is_anomalous]
    other = list_images(train_folder(other_root)) + [s.path for s in list_test_samples(other_root)]
    other = [other[i] for i in rng.permutation(len(other))[:max_other]]

    def features(paths):
        return global_features(backbone, load_images(paths, resolution)[0])

    model = FeatureDistance.fit(features(fit_paths))
    held, others, defects = (model.distance(features(p)) for p in (held_paths, other, defect_paths))
    held, others = held[rng.permutation(len(held))], others[rng.permutation(len(others))]
    threshold = choose_threshold(held[0::2], others[0::2])
    noise = torch.rand(16, 3, resolution, resolution, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    flat = torch.rand(16, 3, 1, 1, generator=torch.Generator().manual_seed(seed + 1)).expand(16, 3, resolution, resolution) * 2 - 1
    report = {
        "fit_images": len(fit_paths), "threshold": round(threshold, 3), "other_category": Path(other_root).name,
        "chosen_on": {"held_out_normals": len(held[0::2]), "other_category": len(others[0::2])},
        "flagged_on_unseen": {
            "held_out_normals": round(float(np.mean(held[1::2] > threshold)), 4),
            "own_defective_test_images": round(float(np.mean(defects > threshold)), 4),
            "other_category": round(float(np.mean(others[1::2] > threshold)), 4),
            "uniform_noise": round(float(np.mean(model.distance(global_features(backbone, noise)) > threshold)), 4),
            "flat_colour": round(float(np.mean(model.distance(global_features(backbone, flat)) > threshold)), 4),
        },
        "median_distance": {"held_out_normals": round(float(np.median(held)), 2),
                            "own_defective_test_images": round(float(np.median(defects)), 2),
                            "other_category": round(float(np.median(others)), 2)},
    }
    return FeatureDistance(model.mean, model.precision, threshold, report)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write CHECKPOINT/ood.safetensors: the 'does this look like the "
                                                 "category at all?' statistic the app shows next to the verdict.")
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder (the file is written into it)")
    parser.add_argument("--data", required=True, help="the category's MVTec-layout folder")
    parser.add_argument("--other", required=True, help="another category's MVTec-layout folder (images that are not this)")
    args = parser.parse_args(argv)
    from .checkpoint import load_checkpoint

    detector = load_checkpoint(args.checkpoint)
    model = calibrate(detector.backbone, args.data, args.other, detector.resolution)
    path = model.save(args.checkpoint)
    print(json.dumps(model.report, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
