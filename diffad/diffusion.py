"""All Gaussian-diffusion maths in one place (in the spirit of guided-diffusion's gaussian_diffusion.py).

Timesteps are 0-indexed as in diffusers: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps with abar_t =
alphas_cumprod[t]. The schedule itself comes from diffusers' DDPMScheduler so that it is never re-derived here.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from diffusers import DDPMScheduler


class ReverseStep(NamedTuple):
    """Per-timestep coefficients of q(x_{t-jump} | x_t, x0) and the learned-variance range of p(x_{t-jump} | x_t)."""

    mean_coef_x0: torch.Tensor
    mean_coef_xt: torch.Tensor
    log_variance: torch.Tensor  # of the true posterior (clipped); the learned range's lower end
    log_beta: torch.Tensor  # the range's upper end


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
        self.alphas_cumprod = self.scheduler.alphas_cumprod.double()
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.sqrt_recip_alphas_cumprod = (1 / self.alphas_cumprod).sqrt()
        self.sqrt_recipm1_alphas_cumprod = (1 / self.alphas_cumprod - 1).sqrt()
        self.betas = self.scheduler.betas.double()

    @functools.lru_cache(maxsize=8)
    def reverse_step(self, jump: int = 1) -> ReverseStep:
        """Tables over t of the reverse step from t to t - jump. jump = 1 is the trained chain; jump = k is the step of
        the chain respaced to every k-th timestep (guided-diffusion's SpacedDiffusion, diffusers' set_timesteps),
        whose KL the paper's code scores. Steps that would end below t = 0 end at x0."""
        if jump < 1 or jump >= self.num_timesteps:
            raise ValueError(f"jump must be in [1, {self.num_timesteps - 1}], got {jump}")
        abar = self.alphas_cumprod
        t = torch.arange(self.num_timesteps)
        abar_prev = torch.where(t >= jump, abar[(t - jump).clamp_min(0)], torch.ones_like(abar))
        beta = 1 - abar / abar_prev
        variance = beta * (1 - abar_prev) / (1 - abar)
        # The variance is 0 where the step ends at x0; clip its log to the first step's, as improved DDPM does.
        clipped = torch.where(t < jump, variance[jump], variance)
        return ReverseStep(
            mean_coef_x0=beta * abar_prev.sqrt() / (1 - abar),
            mean_coef_xt=(1 - abar_prev) * (abar / abar_prev).sqrt() / (1 - abar),
            log_variance=clipped.log(),
            log_beta=beta.log(),
        )

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

    def q_posterior(self, x0: torch.Tensor, xt: torch.Tensor, t, jump: int = 1):
        """Mean and log-variance of q(x_{t-jump} | x_t, x0)."""
        t = self._timesteps(t, xt.shape[0], xt.device)
        step = self.reverse_step(jump)
        mean = self._gather(step.mean_coef_x0, t, xt) * x0 + self._gather(step.mean_coef_xt, t, xt) * xt
        return mean, self._gather(step.log_variance, t, xt).expand_as(xt)

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

    def model_log_variance(self, t, v: torch.Tensor, jump: int = 1) -> torch.Tensor:
        """Improved-DDPM learned range: interpolate log(beta_t) and log(posterior variance) with v in [-1, 1]."""
        t = self._timesteps(t, v.shape[0], v.device)
        step = self.reverse_step(jump)
        min_log = self._gather(step.log_variance, t, v)
        max_log = self._gather(step.log_beta, t, v)
        frac = (v + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(self, xt: torch.Tensor, t, eps: torch.Tensor, v: torch.Tensor, jump: int = 1,
                        clip_x0: bool = False):
        """Mean, log-variance and x0-estimate of p(x_{t-jump} | x_t) from the network's (eps, v) outputs;
        `clip_x0` clamps the estimate to the image range first (guided-diffusion's clip_denoised)."""
        x0_hat = self.predict_x0(xt, t, eps)
        if clip_x0:
            x0_hat = x0_hat.clamp(-1, 1)
        mean, _ = self.q_posterior(x0_hat, xt, t, jump)
        return mean, self.model_log_variance(t, v, jump), x0_hat

    def kl_map(self, x0: torch.Tensor, xt: torch.Tensor, t, eps: torch.Tensor, v: torch.Tensor, jump: int = 1,
               clip_x0: bool = False) -> torch.Tensor:
        """Per-pixel KL(q(x_{t-jump}|x_t,x0) || p(x_{t-jump}|x_t)) in bits, averaged over channels: shape (B, H, W)."""
        true_mean, true_log_var = self.q_posterior(x0, xt, t, jump)
        model_mean, model_log_var, _ = self.p_mean_variance(xt, t, eps, v, jump, clip_x0)
        return normal_kl(true_mean, true_log_var, model_mean, model_log_var).mean(dim=1) / math.log(2.0)

    def vlb_loss(self, x0, xt, t, eps, v) -> torch.Tensor:
        """Hybrid-loss variance term: KL with a stop-gradient on the mean so it only trains v (improved DDPM)."""
        return self.kl_map(x0, xt, t, eps.detach(), v).mean()


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise KL divergence between two diagonal Gaussians, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))
