"""Denoiser section: the network's noise-prediction error by timestep on good test images."""
from __future__ import annotations

from pathlib import Path

import torch

from diffad.data import list_images
from diffad.windows import cut

DENOISER_TIMESTEPS = (5, 20, 100, 200, 400)


def scored_windows(detector, path) -> torch.Tensor:
    """(windows, 3, R, R): a photo as the model scores it (one square, or its windows at the photo's aspect)."""
    return cut(*detector.model_input(path))


@torch.no_grad()
def measure(detector, root: Path, train_paths: list, n_images: int = 8, seed: int = 0) -> dict:
    """Noise-prediction error by timestep on good test images, as the model scores them: how well it knows what
    normal looks like."""
    paths = list_images(root / "test" / "good")[:n_images]
    x0 = torch.cat([scored_windows(detector, p) for p in paths]).to(detector.device)
    # Reference: the noise estimate a model would make if it answered every x_t with the mean training image (window).
    total, count = torch.zeros_like(x0[0]), 0
    for path in train_paths:
        inputs = scored_windows(detector, path).to(detector.device)
        total, count = total + inputs.sum(dim=0), count + len(inputs)
    mean_image = (total / count).expand_as(x0)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for t in DENOISER_TIMESTEPS:
        tt = torch.full((len(x0),), t, device=detector.device)
        noise = torch.randn(x0.shape, generator=generator).to(detector.device)
        xt = detector.diffusion.q_sample(x0, tt, noise)
        out = detector.net(xt, tt)
        x0_hat = detector.diffusion.predict_x0(xt, tt, out.eps)
        eps_from_mean = detector.diffusion.predict_eps(xt, tt, mean_image)
        # Per pixel, the KL is the squared x0 error divided by the learned variance (plus a variance-only term); the
        # variance can only move between the posterior's and beta_t, so this ratio bounds how much it can re-rank pixels.
        log_variance = detector.diffusion.model_log_variance(tt, out.v).mean(dim=1)
        step = detector.diffusion.reverse_step(1)
        variance_range = float((step.log_beta[t] - step.log_variance[t]).exp())
        rows[t] = {"noise_std": float(detector.diffusion.sqrt_one_minus_alphas_cumprod[t]), "eps_mse": float((out.eps - noise).pow(2).mean()),
                   "x0_rmse": float((x0_hat - x0).pow(2).mean().sqrt()),
                   "mean_image_eps_mse": float((eps_from_mean - noise).pow(2).mean()),
                   "variance_range": variance_range,
                   "log_variance_spatial_std": float(log_variance.flatten(1).std(dim=1).mean())}
    return {"images": len(paths), "windows": len(x0), "rows": rows}


def render(d: dict) -> list[str]:
    windows = f", {d['windows']} windows at their own aspect" if d.get("windows", d["images"]) != d["images"] else ""
    out = ["", f"### Denoiser ({d['images']} good test images{windows}; noise std and x̂0 RMSE in pixel units of [-1, 1])", "",
           "| t | noise std | ε-MSE | x̂0 RMSE | ε-MSE if x̂0 were the mean training image | β_t / β̃_t (most the learned "
           "variance can re-weight the KL) | learned log-variance, std across the image |", "|---|---|---|---|---|---|---|"]
    return out + [f"| {t} | {row['noise_std']:.3f} | {row['eps_mse']:.3f} | {row['x0_rmse']:.3f} | {row['mean_image_eps_mse']:.3f} "
                  f"| {row['variance_range']:.3f} | {row['log_variance_spatial_std']:.4f} |" for t, row in d["rows"].items()]
