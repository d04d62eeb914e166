"""AnomalyDetector: a trained category model (denoiser + frozen backbone) with its calibration and scoring.

The data flow is one way: `raw_maps` (the model: images -> raw maps per timestep, tensors on the device) ->
`postprocess` (raw maps + `Calibration` + `ScoringConfig` -> `Prediction`). `calibration.calibrate` measures the
calibration; `checkpoint` saves and loads all of it.
"""
from __future__ import annotations

import copy
import functools

import torch

from .backbone import DEFAULT_BACKBONE, FeatureExtractor
from .calibration import Calibration
from .data import read_image, to_tensor
from .diffusion import GaussianDiffusion
from .models import DiffADNet
from .postprocess import Prediction, StepMaps, merged_prediction, merged_steps, normalise, postprocess, step_maps
from .scoring import RawMaps, ScoringConfig, raw_maps
from .windows import Layout, cut, layout_for, photo_input, resize_to, square_layout


def shared_backbone(name: str = DEFAULT_BACKBONE, device="cpu") -> FeatureExtractor:
    """One frozen backbone per name and device, shared by every loaded category and by training: moving a detector
    to another device takes that device's copy instead of moving one that others use."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" are one device, one copy
        device = torch.device("cuda", torch.cuda.current_device())
    return _backbone(name, str(device))


# Behind a wrapper because lru_cache keys f() and f(DEFAULT_BACKBONE) apart: training and the detector it
# calibrates would otherwise hold two copies on one device.
@functools.lru_cache(maxsize=8)
def _backbone(name: str, device: str) -> FeatureExtractor:
    if device == "cpu":
        return FeatureExtractor(name)
    return copy.deepcopy(_backbone(name, "cpu")).to(device)


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
        morph_defaults: dict | None = None,
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
        # MorphConfig settings this category's checkpoint fixes (diffad.morph.MorphConfig.for_detector).
        self.morph_defaults = morph_defaults or {}

    @property
    def resolution(self) -> int:
        return self.net.config.resolution

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def to(self, device) -> "AnomalyDetector":
        self.net.to(device)
        self.backbone = shared_backbone(self.backbone_name, device)
        self.feature_mean, self.feature_std = self.feature_mean.to(device), self.feature_std.to(device)
        self.calibration = self.calibration.to(device)
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

    def model_input(self, image) -> tuple[torch.Tensor, Layout]:
        """The photo as the model scores it and where its windows lie: (3, R, R) squashed, or with
        `scoring.aspect == "windows"` (3, H, W) at its own aspect with a short side of R (diffad.windows). A tensor
        is taken as such a photo."""
        r = self.resolution
        if self.scoring.aspect == "squash":
            return self.preprocess(image), square_layout(r)
        if isinstance(image, torch.Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"expected a (3, H, W) tensor, got {tuple(image.shape)}")
            layout = layout_for(image.shape[-1], image.shape[-2], r)
            return resize_to(image.float(), layout).clamp(-1, 1), layout
        return photo_input(read_image(image), r, self.scoring.aspect)

    @torch.no_grad()
    def normalized_features(self, x0: torch.Tensor) -> torch.Tensor:
        mean, std = self.feature_mean.view(1, -1, 1, 1), self.feature_std.view(1, -1, 1, 1)
        return (self.backbone(x0.to(self.device)) - mean) / std

    def validate_timesteps(self, timesteps) -> tuple[int, ...]:
        ts = tuple(sorted({int(t) for t in timesteps}))
        if not ts or ts[0] < 0 or ts[-1] >= self.diffusion.num_timesteps:
            raise ValueError(f"timesteps must lie in [0, {self.diffusion.num_timesteps - 1}], got {list(timesteps)}")
        return ts

    @torch.no_grad()
    def raw_maps(self, images: torch.Tensor, timesteps=None, feature_pool=None, *, seed: int | None = None,
                 keep_images: bool = True, batch_size: int = 8, scoring: ScoringConfig | None = None) -> RawMaps:
        """Raw maps of images (B, 3, R, R) at `timesteps` (default: the scoring's), in batches; deterministic for a
        seed (default: the scoring's). `feature_pool`: the pooling sizes (default: the calibration's). `scoring`
        (default: the detector's) says how the noise is drawn and the KL taken."""
        scoring = scoring or self.scoring
        seed = scoring.seed if seed is None else seed
        timesteps = self.validate_timesteps(scoring.timesteps if timesteps is None else timesteps)
        pools = self.calibration.feature_pool if feature_pool is None else feature_pool
        def draw(seed: int) -> torch.Tensor:
            return torch.randn(images.shape[1:], generator=torch.Generator().manual_seed(seed))

        # Fresh noise: one draw per timestep, seeded by it, so a timestep's map never depends on the others asked for.
        noise = torch.stack([draw(int(seed) * 1000 + t) for t in timesteps]) if scoring.fresh_noise else draw(int(seed))
        noise = noise.to(self.device)
        parts = []
        for start in range(0, len(images), batch_size):
            x0 = images[start : start + batch_size].to(self.device)
            parts.append(raw_maps(self.net, self.diffusion, x0, self.normalized_features(x0), timesteps,
                                  noise.expand(len(x0), *noise.shape).contiguous(), pools, keep_images,
                                  kl_jump=scoring.kl_jump, clip_x0=scoring.clip_x0, pixel_smoothing=scoring.pixel_smoothing))
        return parts[0] if len(parts) == 1 else RawMaps.cat(parts)

    def predict(self, image, *, seed: int | None = None, view_timesteps=()) -> Prediction:
        """Score one image. `view_timesteps` adds (calibrated) timesteps whose maps are kept for viewing, not scored."""
        photo, layout = self.model_input(image)
        windows = cut(photo, layout)
        raw = self.raw_maps(windows, list(self.scoring.timesteps) + list(view_timesteps), seed=seed)
        return merged_prediction(postprocess(raw, windows, self.calibration, self.scoring), photo, layout,
                                 self.calibration, self.scoring)

    def steps(self, image, timesteps, *, seed: int | None = None) -> list[StepMaps]:
        """What `predict(image, view_timesteps=timesteps)` would add for those timesteps, without scoring: the same
        noise draw, so a timestep computed here equals the one computed with the score."""
        photo, layout = self.model_input(image)
        raw = self.raw_maps(cut(photo, layout), timesteps, seed=seed)
        return merged_steps(step_maps(raw, normalise(raw, self.calibration, self.scoring)), layout)

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
