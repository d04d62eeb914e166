"""Networks: the learned-variance denoiser with a feature-reconstruction head."""
from __future__ import annotations

import threading
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn


@dataclass
class NetConfig:
    resolution: int = 256
    # Space-to-depth factor: a 256-px image runs the UNet at 64 px with 3*4*4 channels (CPU-friendly).
    patch: int = 4
    # The first level must be wider than its 3*patch^2 input values: the output conv sees them only through
    # GroupNorm + SiLU, and 48 channels cannot carry 48 signed noise values (benchmarks/results.md has the
    # comparison).
    block_out_channels: tuple[int, ...] = (96, 96, 192)
    layers_per_block: int = 1
    attention_lowest: bool = True
    norm_num_groups: int = 16
    feature_channels: int = 176
    feature_stride: int = 8
    head_channels: int = 128
    # What the UNet's first output half means. "eps": the noise (DDPM). "wiener": EDM-style preconditioning around
    # the per-pixel Wiener estimate of x0 from the training images' mean and spread, so that the high-t answer
    # (the normal appearance) needs no learning and the network only adds the residual, scaled to unit variance.
    prediction: str = "wiener"

    def __post_init__(self):
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {PREDICTIONS}, got {self.prediction!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "NetConfig":
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown network setting(s) {', '.join(map(repr, unknown))} "
                             f"(known: {', '.join(cls.__dataclass_fields__)})")
        known = dict(values)
        if "block_out_channels" in known:
            known["block_out_channels"] = tuple(known["block_out_channels"])
        return cls(**known)

    def to_dict(self) -> dict:
        values = asdict(self)
        values["block_out_channels"] = list(self.block_out_channels)
        return values


PREDICTIONS = ("eps", "wiener")
# Floor on the per-pixel spread of the training images: a pixel every training image shows alike must still let
# the network correct the estimate a little.
MIN_DATA_STD = 0.02


@dataclass
class NetOutput:
    eps: torch.Tensor  # (B, 3, R, R) predicted noise
    x0: torch.Tensor  # (B, 3, R, R) the clean estimate x̂0 (unclipped)
    # (B, 3|1, R, R) the scale of x̂0's learned part: the training loss is ((x̂0 - x0) / x0_scale)^2, which is
    # exactly the eps-MSE for "eps" and EDM's unit-variance residual loss for "wiener".
    x0_scale: torch.Tensor
    v: torch.Tensor  # (B, 3, R, R) learned-range variance interpolation, ~[-1, 1]
    features: torch.Tensor  # (B, C_f, R/stride, R/stride) predicted backbone features of x0


class DiffADNet(nn.Module):
    """diffusers UNet2DModel predicting (eps, v) plus a head on a decoder block predicting F(x0) from x_t."""

    def __init__(self, config: NetConfig, alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        if config.resolution % (config.patch * 2 ** (len(config.block_out_channels) - 1)):
            raise ValueError(f"resolution {config.resolution} must be divisible by patch x 2^(levels-1)")
        self.config = config
        channels = 3 * config.patch**2
        levels = len(config.block_out_channels)
        down = ["DownBlock2D"] * levels
        up = ["UpBlock2D"] * levels
        if config.attention_lowest:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.unet = UNet2DModel(
            sample_size=config.resolution // config.patch,
            in_channels=channels,
            out_channels=2 * channels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=tuple(down),
            up_block_types=tuple(up),
            norm_num_groups=config.norm_num_groups,
        )
        # The second-to-last decoder block ends at the UNet's full internal resolution; its output feeds the head.
        # One permanent hook files that output under the calling thread, so concurrent forwards (app users) never
        # see each other's activations or mutate the hook table while another forward iterates it.
        self._tapped: dict[int, torch.Tensor] = {}
        self.unet.up_blocks[-2].register_forward_hook(self._capture)
        tap_channels = config.block_out_channels[1] if levels > 1 else config.block_out_channels[0]
        self.feature_head = nn.Sequential(
            nn.Conv2d(tap_channels, config.head_channels, 3, padding=1),
            nn.GroupNorm(8, config.head_channels),
            nn.SiLU(),
            nn.Conv2d(config.head_channels, config.feature_channels, 1),
        )
        if alphas_cumprod is None:
            from .diffusion import GaussianDiffusion

            alphas_cumprod = GaussianDiffusion().alphas_cumprod
        # The noise schedule is the diffusion's, not a weight: rebuilt on load, never saved.
        self.register_buffer("alphas_cumprod", alphas_cumprod.float(), persistent=False)
        if config.prediction == "wiener":
            size = (3, config.resolution, config.resolution)
            self.register_buffer("data_mean", torch.zeros(size))
            self.register_buffer("data_std", torch.full(size, 0.5))

    @torch.no_grad()
    def set_data_statistics(self, images: torch.Tensor) -> None:
        """Per-pixel mean and spread of (augmented) training images (N, 3, R, R), for the "wiener" prediction."""
        self.data_mean.copy_(images.mean(dim=0))
        self.data_std.copy_(images.std(dim=0).clamp_min(MIN_DATA_STD))

    def _capture(self, _module, _inputs, output):
        self._tapped[threading.get_ident()] = output

    def forward(self, xt: torch.Tensor, t: torch.Tensor) -> NetOutput:
        p = self.config.patch
        try:
            out = self.unet(F.pixel_unshuffle(xt, p), t).sample
            hidden = self._tapped[threading.get_ident()]
        finally:
            self._tapped.pop(threading.get_ident(), None)
        raw, v = (F.pixel_shuffle(half, p) for half in out.chunk(2, dim=1))
        grid = self.config.resolution // self.config.feature_stride
        if hidden.shape[-1] != grid:
            hidden = F.adaptive_avg_pool2d(hidden, grid)
        abar = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        signal, noise = abar.sqrt(), (1 - abar).sqrt()
        if self.config.prediction == "eps":
            eps, x0_scale = raw, noise / signal
            x0 = (xt - noise * eps) / signal
        else:
            # x0 ~ N(mean, std^2) per pixel: the posterior mean given x_t is the Wiener estimate, its spread x0_scale.
            mean, var0 = self.data_mean, self.data_std**2
            total = signal**2 * var0 + noise**2
            x0_scale = (var0 * noise**2 / total).sqrt()
            x0 = mean + signal * var0 / total * (xt - signal * mean) + x0_scale * raw
            eps = (xt - signal * x0) / noise
        return NetOutput(eps, x0, x0_scale, v, self.feature_head(hidden))
