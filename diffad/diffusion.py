"""All Gaussian-diffusion maths in one place (in the spirit of guided-diffusion's gaussian_diffusion.py).

Timesteps are 0-indexed as in diffusers: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar_t =
alphas_cumprod[t]. The schedule itself comes from diffusers' DDPMScheduler so that it is never re-derived here.
"""
from __future__ import annotations

import math

import torch
from diffusers import DDPMScheduler


class GaussianDiffusion:
    """Forward process, true posterior, learned-variance reverse process and their KL divergence."""

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear"):
        self.scheduler = DDPMScheduler(
            num_train_timesteps=num_train_timesteps,
            beta_schedule=beta_schedule,
            variance_type="learned_range",
            clip_sample=False,
        )
        self.num_timesteps = num_train_timesteps
        self.beta_schedule = beta_schedule
        betas = self.scheduler.betas.double()
        alphas_cumprod = self.scheduler.alphas_cumprod.double()
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        self.betas = betas
        self.alphas_cumprod = alphas_cumprod
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / alphas_cumprod - 1).sqrt()
        self.posterior_variance = betas * (1 - alphas_cumprod_prev) / (1 - alphas_cumprod)
        # The variance is 0 at t = 0; clip its log to the t = 1 value as improved DDPM does.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * alphas_cumprod_prev.sqrt() / (1 - alphas_cumprod)
        self.posterior_mean_coef2 = (1 - alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - alphas_cumprod)

    @staticmethod
    def _gather(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        out = values.to(like.device)[t.to(like.device)].to(like.dtype)
        return out.view(-1, *([1] * (like.dim() - 1)))

    def _timesteps(self, t, batch: int, device) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.long, device=device)
        if t.dim() == 0:
            t = t.repeat(batch)
        if t.min() < 0 or t.max() >= self.num_timesteps:
            raise ValueError(f"timesteps must be in [0, {self.num_timesteps - 1}], got {t.tolist()}")
        return t

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        t = self._timesteps(t, x0.shape[0], x0.device)
        return self._gather(self.sqrt_alphas_cumprod, t, x0) * x0 + self._gather(
            self.sqrt_one_minus_alphas_cumprod, t, x0
        ) * noise

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t):
        """Mean and log-variance of q(x_{t-1} | x_t, x0)."""
        t = self._timesteps(t, xt.shape[0], xt.device)
        mean = self._gather(self.posterior_mean_coef1, t, xt) * x0 + self._gather(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._gather(self.posterior_log_variance_clipped, t, xt).expand_as(xt)

    def predict_x0(self, xt: torch.Tensor, t, eps: torch.Tensor) -> torch.Tensor:
        t = self._timesteps(t, xt.shape[0], xt.device)
        return self._gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        ) * eps

    def predict_eps(self, xt: torch.Tensor, t, x0: torch.Tensor) -> torch.Tensor:
        t = self._timesteps(t, xt.shape[0], xt.device)
        return (self._gather(self.sqrt_recip_alphas_cumprod, t, xt) * xt - x0) / self._gather(
            self.sqrt_recipm1_alphas_cumprod, t, xt
        )

    def model_log_variance(self, t, v: torch.Tensor) -> torch.Tensor:
        """Improved-DDPM learned range: interpolate log(beta_t) and log(posterior variance) with v in [-1, 1]."""
        t = self._timesteps(t, v.shape[0], v.device)
        min_log = self._gather(self.posterior_log_variance_clipped, t, v)
        max_log = self._gather(torch.log(self.betas), t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, xt: torch.Tensor, t, eps: torch.Tensor, v: torch.Tensor):
        """Mean, log-variance and x0-estimate of p(x_{t-1} | x_t) from the network's (eps, v) outputs."""
        x0_hat = self.predict_x0(xt, t, eps)
        mean, _ = self.q_posterior(x0_hat, xt, t)
        return mean, self.model_log_variance(t, v), x0_hat

    def kl_map(self, x0: torch.Tensor, xt: torch.Tensor, t, eps: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Per-pixel KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits, averaged over channels: shape (B, H, W)."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t)
        model_mean, model_log_var, _ = self.p_mean_variance(xt, t, eps, v)
        return normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=1) / math.log(2.0)

    def vlb_loss(self, x0, xt, t, eps, v) -> torch.Tensor:
        """Hybrid-loss variance term: KL with a stop-gradient on the mean so it only trains v (improved DDPM)."""
        return self.kl_map(x0, xt, t, eps.detach(), v).mean()


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL divergence between two diagonal Gaussians, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
