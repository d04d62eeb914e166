"""Training one category from a folder of defect-free images: resumable, seeded, CPU-friendly."""
from __future__ import annotations

import copy
import csv
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .calibration import calibrate, check_threshold_quantile
from .checkpoint import load_checkpoint, save_checkpoint, validate_category
from .data import DataError, list_images, load_images, read_image, train_folder
from .detector import AnomalyDetector, shared_backbone
from .diffusion import GaussianDiffusion
from .gaussian import fit_feature_gaussian
from .models import DiffADNet, NetConfig, NetOutput
from .morph import check_morph_defaults
from .scoring import ScoringConfig, pool_sizes, strict_kwargs
from .windows import cut, photo_input

log = logging.getLogger(__name__)
STATE_NAME = "train_state.pt"


@dataclass
class TrainConfig:
    data: str
    out: str
    category: str | None = None
    resolution: int = 256
    steps: int = 4000
    batch_size: int = 8
    lr: float = 2e-4
    warmup_steps: int = 100
    # Training covers only the timesteps that scoring and the morph use.
    t_max: int = 500
    # Hybrid loss: lambda * T * (per-step KL) is the VLB term of improved DDPM; 0.001 * 1000 weighs it 1.
    vlb_weight: float = 0.001
    feature_weight: float = 1.0
    ema_decay: float = 0.999
    holdout_fraction: float = 0.15
    # Feature channels kept in the morph's Gaussian model (a random subset, as in PaDiM).
    gaussian_dims: int = 64
    # "dihedral": flips and 90-degree rotations (objects seen from above); "flip": flips only; "none".
    augment: str = "flip"
    seed: int = 0
    device: str = "auto"
    # "bf16": the network's forward pass under bfloat16 autocast (tensor cores on a GPU), weights and losses in fp32.
    precision: str = "fp32"
    save_every: int = 500
    # A checkpoint (folder or Hub id) whose network weights and layout start this run: continue or fine-tune it.
    init_from: str | None = None
    # Wall-clock budget in minutes from the call's start, loading included (None: none); training stops at the
    # first step past it and saves there.
    time_limit: float | None = None
    net: dict = field(default_factory=dict)
    scoring: dict = field(default_factory=dict)
    # Feature-residual pooling sizes the maps are made and calibrated with (odd; 1 = off; see scoring.raw_maps).
    feature_pool: tuple[int, ...] = (1,)

    def __post_init__(self):
        self.feature_pool = pool_sizes(self.feature_pool)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        NetConfig.from_dict(self.net)  # unknown settings are an error now, not after the feature caching
        ScoringConfig.from_dict(self.scoring)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        return cls(**strict_kwargs(cls, values, "training"))


# What a checkpoint's "training" record holds besides the TrainConfig it was trained with.
RUN_RECORD_KEYS = ("steps_done", "seconds", "device", "train_images", "holdout_images", "skipped_files", "torch")


AUGMENTATIONS = ("none", "flip", "dihedral")
PRECISIONS = ("fp32", "bf16")


def _augmentations(kind: str) -> list[tuple[int, bool]]:
    if kind == "none":
        return [(0, False)]
    if kind == "flip":
        return [(0, False), (0, True), (2, False), (2, True)]
    if kind == "dihedral":
        return [(k, flip) for k in range(4) for flip in (False, True)]
    raise ValueError(f"unknown augmentation {kind!r} (use none, flip or dihedral)")


def _apply(x: torch.Tensor, rot: int, flip: bool) -> torch.Tensor:
    x = torch.rot90(x, rot, dims=(-2, -1)) if rot else x
    return torch.flip(x, dims=(-1,)) if flip else x


def augmented_batch(images: torch.Tensor, idx: torch.Tensor, aug: torch.Tensor, augmentations) -> torch.Tensor:
    """images[idx[j]] under augmentation aug[j], one batched call per augmentation (on a GPU, per-image calls
    cost more than the network's step)."""
    idx, aug = idx.to(images.device), aug.to(images.device)
    batch = torch.empty((len(idx), *images.shape[1:]), dtype=images.dtype, device=images.device)
    for a, (rot, flip) in enumerate(augmentations):
        chosen = aug == a
        batch[chosen] = _apply(images[idx[chosen]], rot, flip)
    return batch


@torch.no_grad()
def augmented_features(backbone, images: torch.Tensor, augmentations, device, batch_size: int = 16) -> torch.Tensor:
    """fp16 backbone features of every image under every augmentation: (A, N, C, g, g), on the CPU."""
    return torch.stack([
        torch.cat([backbone(_apply(images[i : i + batch_size].to(device), r, f)).half().cpu() for i in range(0, len(images), batch_size)])
        for r, f in augmentations
    ])


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def split_holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    if n < 4:
        raise DataError(f"need at least 4 good images to train and calibrate, found {n}")
    order = np.random.default_rng(seed).permutation(n)
    n_hold = max(2, round(n * fraction))
    return np.sort(order[n_hold:]), np.sort(order[:n_hold])


def _load_state(path: Path, net: DiffADNet) -> dict:
    """The saved training state, with its weights already in `net`; a clear error when it cannot be resumed."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
    except Exception as exc:  # truncated file, foreign pickle, or another network layout: all end the same way
        raise DataError(f"{path} cannot be resumed (damaged, or written for another network layout or diffad "
                        f"version: {type(exc).__name__}); delete it to start over, or choose another --out") from exc
    return state


def _init_from(net: DiffADNet, source: DiffADNet, name: str) -> None:
    """Start from another checkpoint's weights. Its data statistics (if any) are replaced by this run's: an "eps"
    network can seed a "wiener" one, whose output layer then learns the residual instead of the noise."""
    weights = {k: v for k, v in source.state_dict().items() if not k.startswith("data_")}
    try:
        missing, _ = net.load_state_dict(weights, strict=False)
        wrong = [k for k in missing if not k.startswith("data_")] + [k for k in weights if k not in net.state_dict()]
        if wrong:
            raise RuntimeError(f"tensors that do not match: {', '.join(wrong[:4])}")
    except RuntimeError as exc:
        raise DataError(f"--init-from {name}: its network does not fit this run's layout (--net "
                        f"overrides or another backbone): {str(exc).splitlines()[0]}") from exc
    if source.config.prediction != net.config.prediction:
        # The first output half meant something else (at small t a noise estimate is about minus the Wiener
        # residual): start it at zero, so that the run starts from the parameterisation's fixed part.
        half = net.unet.conv_out.out_channels // 2
        with torch.no_grad():
            net.unet.conv_out.weight[:half].zero_()
            net.unet.conv_out.bias[:half].zero_()


def train(config: TrainConfig, progress: bool = True) -> Path:
    """Train, calibrate and write a checkpoint to `config.out`; resumes from `out/train_state.pt` if present."""
    deadline = None if config.time_limit is None else time.time() + 60 * config.time_limit
    torch.manual_seed(config.seed)
    out = Path(config.out)
    category = validate_category(config.category or out.name)
    device = resolve_device(config.device)
    folder = train_folder(config.data)
    images, kept, skipped = load_images(list_images(folder), config.resolution)
    train_idx, hold_idx = split_holdout(len(images), config.holdout_fraction, config.seed)
    # The network learns what it will score: squashed photos, or their windows at the photo's own aspect.
    aspect = ScoringConfig.from_dict(config.scoring).aspect
    train_images, _ = as_scored(images, kept, train_idx, config.resolution, aspect)
    holdout, hold_layouts = as_scored(images, kept, hold_idx, config.resolution, aspect)
    log.info("%d training, %d held-out images from %s (%d unreadable skipped)", len(train_idx), len(hold_idx), folder, len(skipped))

    backbone = shared_backbone(device=device)
    source = load_checkpoint(config.init_from).net if config.init_from else None
    layout = {**(source.config.to_dict() if source else {}), **config.net}
    net_config = NetConfig.from_dict({**layout, "resolution": config.resolution, "feature_channels": backbone.channels})
    diffusion = GaussianDiffusion()
    net = DiffADNet(net_config, diffusion.alphas_cumprod).to(device)
    augmentations = _augmentations(config.augment)
    if net_config.prediction == "wiener":
        net.set_data_statistics(torch.cat([_apply(train_images, r, f) for r, f in augmentations]).to(device))
    if source is not None:
        _init_from(net, source, config.init_from)
    state_path = out / STATE_NAME
    state = _load_state(state_path, net) if state_path.exists() else None  # before the slow feature caching

    # Backbone features of every (image, augmentation) pair are computed once: the backbone is frozen.
    cached = augmented_features(backbone, train_images, augmentations, device)
    gaussian = fit_feature_gaussian(backbone, train_images, cached.flatten(0, 1), config.gaussian_dims, config.seed)
    feature_mean = cached.float().mean(dim=(0, 1, 3, 4))
    feature_std = cached.float().std(dim=(0, 1, 3, 4)).clamp_min(1e-4)

    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, config.warmup_steps)))
    ema = EMAModel(net.parameters(), decay=config.ema_decay, use_ema_warmup=True, power=0.75, foreach=True)
    out.mkdir(parents=True, exist_ok=True)
    step, elapsed = 0, 0.0
    generator = torch.Generator().manual_seed(config.seed)
    # The noise is drawn where the network runs: on a CPU core a batch of 64 costs 0.1 s per step, and three runs
    # sharing an H200 drew it there at 5 steps/s.
    noise_generator = torch.Generator(device).manual_seed(config.seed + 1)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        generator.set_state(state["generator"])
        if "noise_generator" in state:  # states saved before the noise moved to the device start it afresh
            noise_generator.set_state(state["noise_generator"])
        step, elapsed = state["step"], state["elapsed"]
        log.info("resumed from %s at step %d", state_path, step)
    ema.to(device)

    log_path = out / "train_log.csv"
    log_file = log_path.open("a", newline="")
    writer = csv.writer(log_file)
    if step == 0:
        writer.writerow(["step", "loss", "mse", "vlb", "feature", "lr", "seconds"])
    mean, std = feature_mean.view(1, -1, 1, 1).to(device), feature_std.view(1, -1, 1, 1).to(device)
    # Batches are gathered where the network runs: on a GPU, per-step host-to-device copies of images and
    # features would cost more than the step itself.
    train_images, cached = train_images.to(device), cached.to(device)
    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"train {category}", unit="step")
    net.train()
    start = time.time() - elapsed
    while step < config.steps:
        idx = torch.randint(0, len(train_images), (config.batch_size,), generator=generator)
        aug = torch.randint(0, len(augmentations), (config.batch_size,), generator=generator)
        x0 = augmented_batch(train_images, idx, aug, augmentations)
        target = (cached[aug, idx].float() - mean) / std
        t = torch.randint(1, config.t_max + 1, (config.batch_size,), generator=generator).to(device)
        noise = torch.randn(x0.shape, generator=noise_generator, device=device)
        xt = diffusion.q_sample(x0, t, noise)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.precision == "bf16"):
            pred = net(xt, t)
        pred = NetOutput(*(getattr(pred, f.name).float() for f in fields(pred)))
        mse = ((pred.x0 - x0) / pred.x0_scale).pow(2).mean()
        vlb = diffusion.vlb_loss(x0, xt, t, pred.eps, pred.v)
        feat = (pred.features - target).pow(2).mean()
        loss = mse + config.vlb_weight * diffusion.num_timesteps * vlb + config.feature_weight * feat
        if not torch.isfinite(loss):
            raise RuntimeError(f"training diverged at step {step} (loss {loss.item()})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        ema.step(net.parameters())
        step += 1
        bar.update(1)
        if step % 10 == 0 or step == config.steps:
            writer.writerow([step, f"{loss.item():.5f}", f"{mse.item():.5f}", f"{vlb.item():.5f}", f"{feat.item():.5f}", f"{scheduler.get_last_lr()[0]:.2e}", f"{time.time() - start:.1f}"])
            log_file.flush()
            bar.set_postfix(loss=f"{loss.item():.4f}", feat=f"{feat.item():.3f}")
        out_of_time = deadline is not None and time.time() >= deadline
        if step % config.save_every == 0 or step == config.steps or out_of_time:
            elapsed = time.time() - start
            torch.save(
                {
                    "net": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "ema": ema.state_dict(),
                    "generator": generator.get_state(),
                    "noise_generator": noise_generator.get_state(),
                    "step": step,
                    "elapsed": elapsed,
                },
                state_path,
            )
            _write_checkpoint(net, ema, config, category, holdout, hold_layouts, feature_mean, feature_std, gaussian,
                              step, elapsed, len(train_idx), len(hold_idx), len(skipped), device)
            net.train()
        if out_of_time:
            log.info("time limit of %s min reached at step %d", config.time_limit, step)
            break
    bar.close()
    log_file.close()
    return out


def _write_checkpoint(net, ema, config, category, holdout, hold_layouts, feature_mean, feature_std, gaussian, step,
                      elapsed, n_train, n_holdout, n_skipped, device):
    """`holdout`: the held-out images as scored (windows, with their photos' `hold_layouts`; None when squashed)."""
    ema_net = copy.deepcopy(net).eval()
    ema.copy_to(ema_net.parameters())
    training = {k: v for k, v in asdict(config).items() if k not in ("out", "device")}
    training.update(steps_done=step, seconds=round(elapsed, 1), device=str(device), train_images=n_train,
                    holdout_images=n_holdout, skipped_files=n_skipped, torch=torch.__version__)
    detector = AnomalyDetector(
        ema_net, category=category, scoring=ScoringConfig.from_dict(config.scoring), training=training,
        feature_mean=feature_mean, feature_std=feature_std,
    ).to(device)
    detector.calibration = calibrate(detector, holdout, feature_pool=config.feature_pool, gaussian=gaussian,
                                     layouts=hold_layouts)
    save_checkpoint(detector, config.out)
    log.info("step %d: checkpoint written to %s (threshold %.3f)", step, config.out, detector.calibration.image_threshold)


def training_config(detector: AnomalyDetector) -> TrainConfig:
    """The TrainConfig a checkpoint was trained with (settings it predates take today's defaults). Its network and
    scoring are the checkpoint's own, in the layout of its format version: not re-read from the record."""
    record = {k: v for k, v in detector.training.items() if k not in RUN_RECORD_KEYS + ("net", "scoring")}
    return TrainConfig.from_dict({"data": "", "out": "", **record})


def checkpoint_split(detector: AnomalyDetector, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The checkpoint's own training images and held-out calibration images in `data` (its seed and fraction)."""
    images, _, train_idx, hold_idx = _split(detector, data)
    return images[train_idx], images[hold_idx]


def _split(detector: AnomalyDetector, data):
    settings = training_config(detector)
    images, paths, _ = load_images(list_images(train_folder(data)), detector.resolution)
    train_idx, hold_idx = split_holdout(len(images), settings.holdout_fraction, settings.seed)
    return images, paths, train_idx, hold_idx


def split_paths(detector: AnomalyDetector, data) -> tuple[list, list]:
    """The files of the checkpoint's training photos and of its held-out calibration photos in `data`."""
    _, paths, train_idx, hold_idx = _split(detector, data)
    return [paths[i] for i in train_idx], [paths[i] for i in hold_idx]


def holdout_windows(detector: AnomalyDetector, data, split=None) -> tuple[torch.Tensor, list | None]:
    """The held-out calibration images as the detector's scoring sees them, and each photo's layout (None when
    squashed). `split`: `_split`'s result when the caller already loaded it."""
    images, paths, _, hold_idx = split or _split(detector, data)
    return as_scored(images, paths, hold_idx, detector.resolution, detector.scoring.aspect)


def as_scored(images: torch.Tensor, paths, idx, resolution: int, aspect: str) -> tuple[torch.Tensor, list | None]:
    """Photos `idx` as scoring sees them at `aspect`: the squashed `images` (no layouts), or the windows of each photo
    at its own aspect (diffad.windows), in order, with each photo's layout."""
    if aspect == "squash":
        return images[idx], None
    inputs = [photo_input(read_image(paths[i]), resolution, aspect) for i in idx]
    return torch.cat([cut(photo, layout) for photo, layout in inputs]), [layout for _, layout in inputs]


def recalibrate(checkpoint, data, feature_pool=None, scoring: dict | None = None,
                smoothing_sigma: float | None = None, threshold_quantile: float | None = None,
                morph: dict | None = None) -> AnomalyDetector:
    """Re-measure the calibration and refit the morph's feature Gaussian of an existing checkpoint, in place.

    Uses the same held-out split as training (same seed and fraction), so calibration never sees training images.
    `feature_pool` (pooling sizes, e.g. "1,3,9") replaces the checkpoint's and `scoring` overrides its scoring
    settings; `smoothing_sigma` fixes the combined map's smoothing (None: chosen on synthetic defects);
    `threshold_quantile` replaces the checkpoint's; `morph` updates the category's morph settings (MorphConfig fields,
    e.g. {"gradient_smoothing": 0}). A bad value is refused before anything is measured or written.
    """
    detector = load_checkpoint(checkpoint)
    detector.morph_defaults = check_morph_defaults({**detector.morph_defaults, **(morph or {})},
                                                   detector.diffusion.num_timesteps)
    detector.scoring = ScoringConfig.from_dict({**detector.scoring.to_dict(), **(scoring or {})})
    if smoothing_sigma is not None and not 0 <= smoothing_sigma <= 64:
        raise ValueError(f"smoothing must be a sigma between 0 and 64 pixels, got {smoothing_sigma}")
    if threshold_quantile is not None:
        check_threshold_quantile(threshold_quantile)
    pools = detector.calibration.feature_pool if feature_pool is None else pool_sizes(feature_pool)
    settings = training_config(detector)
    split = _split(detector, data)
    images, paths, train_idx, _ = split
    train_images, _ = as_scored(images, paths, train_idx, detector.resolution, detector.scoring.aspect)
    features = augmented_features(detector.backbone, train_images, _augmentations(settings.augment), detector.device)
    gaussian = fit_feature_gaussian(detector.backbone, train_images, features.flatten(0, 1), settings.gaussian_dims, settings.seed)
    windows, layouts = holdout_windows(detector, data, split)
    detector.calibration = calibrate(detector, windows, feature_pool=pools, smoothing_sigma=smoothing_sigma,
                                     gaussian=gaussian, layouts=layouts, threshold_quantile=threshold_quantile)
    save_checkpoint(detector, checkpoint)
    return detector
