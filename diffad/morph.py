"""Gradient-denoising morph: turn an anomalous image into a normal-looking one, frame by frame.

A Gaussian model of normal backbone features (PaDiM style) gives an energy E(x) = sum over positions of the
Mahalanobis distance of f(x) to the normal features. Each inner step moves x down the normalised gradient of E,
x <- sqrt(1 - s^2) x - s g, which is a forward-diffusion step of variance s^2 when g is Gaussian; after every
N_d steps the diffusion model removes that "noise" at the matching timestep, or at the larger one a category fixes
so that the denoiser repaints what the steps mark rather than keep it.

Two choices keep normal regions intact: the Gaussian is also fitted on slightly noisy normal images, so that the
energy measures defects rather than the noise the morph itself adds; and by default (focus = 2) every update is
weighted by the anomaly map, so pixels the model finds normal are never touched and only the defect changes.
A third makes the change real: the gradient is smoothed (gradient_smoothing = 4), so that the energy falls by
changing the picture rather than its pixel-scale texture. `MorphConfig(focus=0, gradient_smoothing=0)` is the
paper's morph.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .data import to_uint8
from .detector import AnomalyDetector
from .gaussian import FeatureGaussian
from .scoring import gaussian_blur, strict_kwargs
from .windows import Layout, cut, stitch

# The normalised energy gradient is clipped to this many standard deviations.
GRADIENT_CLIP = 3.0


@dataclass
class MorphConfig:
    step_size: float = 0.02  # s: each gradient step is a diffusion step of variance s^2
    denoise_every: int = 5  # N_d
    # Small defects end normal within a few loops, large ones need many (stopping is early).
    max_loops: int = 16
    # Denoising timestep; None matches the noise added by N_d steps of size s. A category may fix a larger one
    # (benchmarks/select_on_validation.py --choose morph_timestep): asked for a normal part from an input it takes
    # for noisier, the denoiser repaints more of what the gradient marks.
    timestep: int | None = None
    # When to stop: "typical" once the score is no higher than a quantile (`stop_quantile`) of the held-out normal
    # images' scores, by default their median: a typical normal part (a part that merely dips under the verdict
    # threshold can still show its defect); "threshold" once the verdict is normal; "never": run all loops.
    stop_at: str = "typical"
    # A lower quantile than the median keeps the morph going after a typical part's score. There diffad's map no
    # longer flags the defect, but part of its contrast can be left, which an independent judge still sees; the
    # further loops clear it (a category may fix its own: benchmarks/select_on_validation.py --choose morph_stop).
    stop_quantile: float = 0.5
    # Under "typical" or "threshold", also stop once this many loops in a row brought no new lowest score (0: never):
    # from then on a morph mostly makes the part look worse (on a thin crack the model scores under its threshold,
    # 16 loops of the smoothed gradient raised the score from 6 to 12).
    patience: int = 3
    seed: int = 0
    # 0 is the paper's morph: every pixel is updated. Above 0, each update is weighted by the current anomaly map over
    # the mask threshold, clipped to [0, 1], to this power: pixels the model finds normal are never touched, so the
    # denoiser only has to remove the noise added where the defect is (far more morphs end normal, and sharper).
    # The square keeps weights low in the map's fringe around a defect, where noise added piles up again
    # (benchmarks/results.md compares the settings).
    focus: float = 2.0
    # Gaussian smoothing (sigma in pixels at the model resolution) of the energy gradient before each step; 0 is the
    # paper's raw gradient. The raw gradient is mostly pixel-scale texture that lowers the backbone's energy without
    # changing what the part looks like: the score then reaches a typical part's while the defect is still there.
    # Smoothed, each step must change the picture at the scale of the feature grid (stride 8); on 8 bottle defects
    # the change inside the defect doubled and PatchCore (which the morph never sees) agreed 3 times as often. A
    # category's checkpoint may fix its own (benchmarks/select_on_validation.py --choose morph_smoothing).
    gradient_smoothing: float = 4.0

    @classmethod
    def for_detector(cls, detector: AnomalyDetector, **overrides) -> "MorphConfig":
        """The category's morph: the settings its checkpoint fixes (`detector.morph_defaults`, e.g. a gradient
        smoothing chosen on its validation defects) over the defaults, and `overrides` over both."""
        return cls(**{**detector.morph_defaults, **overrides})

    def validate(self, num_timesteps: int) -> None:
        if not 0 < self.step_size < 1:
            raise ValueError(f"step size s must be in (0, 1), got {self.step_size}")
        if not 1 <= int(self.denoise_every) <= 100:
            raise ValueError(f"denoise_every must be between 1 and 100, got {self.denoise_every}")
        if not 0 <= int(self.max_loops) <= 200:
            raise ValueError(f"max_loops must be between 0 and 200, got {self.max_loops}")
        if not 0 <= self.focus <= 10:
            raise ValueError(f"focus must be between 0 and 10, got {self.focus}")
        if not 0 <= self.gradient_smoothing <= 32:
            raise ValueError(f"gradient_smoothing must be a sigma between 0 and 32 pixels, got {self.gradient_smoothing}")
        if not 0 <= int(self.patience) <= 200:
            raise ValueError(f"patience must be between 0 and 200 loops, got {self.patience}")
        if not 0 <= int(self.seed) < 2**32:
            raise ValueError(f"seed must be in [0, 2^32), got {self.seed}")
        if not 0 <= self.stop_quantile <= 1:
            raise ValueError(f"stop_quantile must be between 0 and 1, got {self.stop_quantile}")
        if self.stop_at not in STOP_RULES:
            raise ValueError(f"stop_at must be one of {', '.join(STOP_RULES)}, got {self.stop_at!r}")
        if self.timestep is not None and not 0 <= int(self.timestep) < num_timesteps:
            raise ValueError(f"timestep must be in [0, {num_timesteps - 1}], got {self.timestep}")


@dataclass
class MorphFrame:
    gradient_steps: int  # taken so far
    loop: int
    image: torch.Tensor  # (3, R, R) in [-1, 1]
    anomaly_map: np.ndarray
    score: float
    energy: float
    is_normal: bool  # the verdict: score at or under the verdict threshold
    is_typical: bool  # score at or under the median held-out normal image's
    lowest_score: float  # the lowest score of this frame and every one before it
    lowest_loop: int  # the loop that reached it
    reached_stop: bool = False  # score at or under the one the morph stops at (MorphGoal.stop)
    stalled: bool = False  # the result of a morph stopped by `patience`: its lowest-scoring frame, yielded again

    def rgb(self) -> np.ndarray:
        return to_uint8(self.image)


STOP_RULES = ("typical", "threshold", "never")


def check_morph_defaults(values: dict, num_timesteps: int) -> dict:
    """A checkpoint's morph settings (config.json "morph"), refused with the reason when a key or value is wrong."""
    MorphConfig(**strict_kwargs(MorphConfig, values, "morph")).validate(num_timesteps)
    return dict(values)


@dataclass(frozen=True)
class MorphGoal:
    """The scores a morph is measured against: the verdict threshold, a typical normal part's, and the one it stops at."""

    threshold: float
    typical: float  # the median held-out normal image's score
    stop: float
    stop_quantile: float | None  # of the held-out normal images' scores, when the morph stops at one ("typical")

    @classmethod
    def of(cls, detector: AnomalyDetector, config: MorphConfig) -> "MorphGoal":
        threshold, normal_scores = detector.calibration.image_threshold, detector.calibration.normal_scores
        if config.stop_at == "typical":
            stop, quantile = float(np.quantile(normal_scores, config.stop_quantile)), config.stop_quantile
        else:
            stop, quantile = {"threshold": threshold, "never": -math.inf}[config.stop_at], None
        return cls(threshold, float(np.median(normal_scores)), stop, quantile)

    @property
    def past_typical(self) -> bool:
        """Whether the morph goes on after a typical normal part's score, to clear what is left of the defect."""
        return self.stop_quantile is not None and self.stop < self.typical


def matching_timestep(detector: AnomalyDetector, step_size: float, steps: int) -> int:
    """The t whose noise level 1 - abar_t equals the variance added by `steps` steps of size s."""
    added = 1.0 - (1.0 - step_size**2) ** steps
    noise_levels = 1.0 - detector.diffusion.alphas_cumprod
    return int(torch.argmin((noise_levels - added).abs()).item())


def denoising_timestep(detector: AnomalyDetector, config: MorphConfig) -> int:
    """The t each loop denoises at: the config's, else the one matching the noise its gradient steps add."""
    if config.timestep is not None:
        return int(config.timestep)
    return matching_timestep(detector, config.step_size, config.denoise_every)


def feature_gaussian(detector: AnomalyDetector) -> FeatureGaussian:
    if detector.calibration.gaussian is None:
        raise ValueError("this checkpoint has no feature Gaussian for the morph (run `diffad calibrate`)")
    return detector.calibration.gaussian


def energy(detector: AnomalyDetector, gaussian: FeatureGaussian, x: torch.Tensor, layout: Layout) -> torch.Tensor:
    """The feature energy of an image: the sum over its windows (one for a square model input)."""
    return gaussian.energy(detector.backbone(cut(x, layout))).sum()


def energy_gradient(detector: AnomalyDetector, gaussian: FeatureGaussian, x: torch.Tensor,
                    layout: Layout) -> tuple[torch.Tensor, float]:
    x = x.detach().requires_grad_(True)
    value = energy(detector, gaussian, x, layout)
    (grad,) = torch.autograd.grad(value, x)
    return grad, float(value.detach())


def descent_direction(detector: AnomalyDetector, gaussian: FeatureGaussian, x: torch.Tensor, layout: Layout,
                      smoothing: float) -> torch.Tensor:
    """The step's g: the energy gradient smoothed by `smoothing` (sigma, pixels), at unit std, with its tails clipped
    so that g stays Gaussian-like (a few huge gradients would otherwise push pixels far outside the image range)."""
    grad, _ = energy_gradient(detector, gaussian, x, layout)
    grad = gaussian_blur(grad, smoothing)
    return (grad / grad.std().clamp_min(1e-12)).clamp(-GRADIENT_CLIP, GRADIENT_CLIP)


def focus_weight(detector: AnomalyDetector, anomaly_map: np.ndarray, focus: float) -> torch.Tensor | None:
    """(1, R, R) update weights from an anomaly map, or None when focus is off."""
    if not focus:
        return None
    ratio = np.clip(anomaly_map / max(detector.calibration.mask_threshold, 1e-6), 0.0, 1.0) ** focus
    return torch.from_numpy(ratio).float()[None].to(detector.device)


def blend(x: torch.Tensor, updated: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return updated if weight is None else x + weight * (updated - x)


def morph(detector: AnomalyDetector, image, config: MorphConfig | None = None) -> Iterator[MorphFrame]:
    """Yield frames from the input (step 0) to a normal-looking image; stops once the score meets `config.stop_at`.
    Once `config.patience` loops in a row brought no new lowest score, it stops too, and yields its lowest-scoring
    frame again, marked `stalled`, as its result."""
    config = config or MorphConfig.for_detector(detector)
    config.validate(detector.diffusion.num_timesteps)
    gaussian = feature_gaussian(detector)
    t = denoising_timestep(detector, config)
    # A photo scored at its own aspect is morphed at it too: every step works on its windows.
    x, layout = detector.model_input(image)
    x = x.to(detector.device)
    t_batch = torch.full((layout.count,), max(int(t), 1), device=detector.device)
    shrink = math.sqrt(1.0 - config.step_size**2)

    goal = MorphGoal.of(detector, config)

    def frame(step: int, loop: int, energy: float, before: MorphFrame | None = None) -> MorphFrame:
        prediction = detector.predict(x.cpu(), seed=config.seed)
        lower = before is None or prediction.score < before.lowest_score
        return MorphFrame(step, loop, x.detach().cpu().clone(), prediction.anomaly_map, prediction.score, energy,
                          not prediction.is_anomalous, prediction.score <= goal.typical,
                          prediction.score if lower else before.lowest_score, loop if lower else before.lowest_loop,
                          prediction.score <= goal.stop)

    with torch.no_grad():
        energy0 = float(energy(detector, gaussian, x, layout))
    current = best = frame(0, 0, energy0)
    yield current
    step = 0
    for loop in range(1, int(config.max_loops) + 1):
        if current.reached_stop:
            return
        weight = focus_weight(detector, current.anomaly_map, config.focus)
        for _ in range(int(config.denoise_every)):
            direction = descent_direction(detector, gaussian, x, layout, config.gradient_smoothing)
            x = blend(x, (shrink * x - config.step_size * direction).clamp(-1, 1), weight)
            step += 1
        with torch.no_grad():
            # Denoise: the deterministic (DDIM) step from t to 0 with the model's noise estimate.
            x = blend(x, stitch(detector.net(cut(x, layout), t_batch).x0, layout).clamp(-1, 1), weight)
            loop_energy = float(energy(detector, gaussian, x, layout))
        current = frame(step, loop, loop_energy, current)
        best = current if current.lowest_loop == loop else best
        yield current
        if config.patience and config.stop_at != "never" and loop - current.lowest_loop >= config.patience:
            # The loops since the best frame only made the part score worse: the morph's result is that frame.
            yield replace(best, stalled=True)
            return


def export_gif(frames: list[np.ndarray], path, duration_ms: int = 120) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:] + [images[-1]] * 5, duration=duration_ms, loop=0)
    return Path(path)


def export_mp4(frames: list[np.ndarray], path, fps: int = 8) -> Path:
    import imageio.v2 as imageio

    # Even sizes for yuv420p; repeat the last frame so players show the result.
    h, w = (frames[0].shape[0] // 2) * 2, (frames[0].shape[1] // 2) * 2
    with imageio.get_writer(str(path), fps=fps, codec="libx264", pixelformat="yuv420p", macro_block_size=1) as writer:
        for f in frames + [frames[-1]] * fps:
            writer.append_data(np.ascontiguousarray(f[:h, :w]))
    return Path(path)


def before_after(before: np.ndarray, after: np.ndarray, gap: int = 4) -> np.ndarray:
    spacer = np.full((before.shape[0], gap, 3), 255, dtype=np.uint8)
    return np.concatenate([before, spacer, after], axis=1)
