import math

import pytest
import torch
from diffusers import DDPMScheduler

from diffad.diffusion import GaussianDiffusion, normal_kl


def test_kl_is_non_negative_for_random_gaussians():
    g = torch.Generator().manual_seed(0)
    m1, m2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    v1, v2 = torch.randn(1000, generator=g), torch.randn(1000, generator=g)
    kl = normal_kl(m1, v1, m2, v2)
    assert (kl >= -1e-6).all() and kl.mean() > 0.1


def test_kl_map_is_zero_when_model_matches_posterior():
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 3, 8, 8, generator=g).clamp(-1, 1), torch.randn(2, 3, 8, 8, generator=g)
    t = torch.tensor([5, 300])
    xt = diffusion.q_sample(x0, t, noise)
    # eps = the true noise gives x0_hat = x0, and v = -1 selects the posterior variance exactly.
    kl = diffusion.kl_map(x0, xt, t, noise, -torch.ones_like(x0))
    assert kl.shape == (2, 8, 8)
    assert kl.abs().max() < 1e-4
    wrong = diffusion.kl_map(x0, xt, t, noise + 0.5, -torch.ones_like(x0))
    assert (wrong > 1e-3).all()


def test_kl_map_is_a_variance_weighted_squared_x0_error():
    """The KL map's mean term is coef1^2 (x0 - x0_hat)^2 / (2 var_p): with a uniform learned variance it ranks pixels
    exactly as the squared RGB error |x0_hat - x0|^2 does (why the KL-only and RGB-only ablations agree)."""
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(2)
    x0, noise, eps = (torch.randn(1, 3, 8, 8, generator=g) for _ in range(3))
    for t, v in ((20, -1.0), (400, 0.3)):
        xt = diffusion.q_sample(x0, t, noise)
        x0_hat = diffusion.predict_x0(xt, t, eps)
        log_var_p = diffusion.model_log_variance(t, torch.full_like(x0, v))
        _, log_var_q = diffusion.q_posterior(x0, xt, t)
        variance_term = 0.5 * (log_var_p - log_var_q - 1 + torch.exp(log_var_q - log_var_p))
        mean_term = 0.5 * diffusion.reverse_step(1).mean_coef_x0[t].float() ** 2 * (x0 - x0_hat) ** 2 * torch.exp(-log_var_p)
        expected = (variance_term + mean_term).mean(dim=1) / math.log(2.0)
        kl = diffusion.kl_map(x0, xt, t, eps, torch.full_like(x0, v))
        assert torch.allclose(kl, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("jump, timesteps", [(1, (1, 20, 200, 999)), (4, (4, 20, 200, 996))])
def test_maths_agree_with_diffusers_scheduler(jump, timesteps):
    """jump 1: the trained chain; jump 4: the chain respaced to 250 steps, as diffusers' set_timesteps(250) runs it."""
    diffusion = GaussianDiffusion()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range", clip_sample=False)
    if jump > 1:
        scheduler.set_timesteps(1000 // jump)
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(1, 3, 4, 4, generator=g), torch.randn(1, 3, 4, 4, generator=g)
    eps, v = torch.randn(1, 3, 4, 4, generator=g), torch.rand(1, 3, 4, 4, generator=g) * 2 - 1
    for t in timesteps:
        tt = torch.tensor([t])
        xt = diffusion.q_sample(x0, tt, noise)
        torch.testing.assert_close(xt, scheduler.add_noise(x0, noise, tt), rtol=1e-5, atol=1e-5)
        step_noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(t))
        out = scheduler.step(torch.cat([eps, v], dim=1), t, xt, generator=torch.Generator().manual_seed(t))
        mean, log_var, x0_hat = diffusion.p_mean_variance(xt, tt, eps, v, jump)
        torch.testing.assert_close(out.pred_original_sample, x0_hat, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(scheduler._get_variance(t, predicted_variance=v), log_var, rtol=1e-4, atol=1e-4)
        if jump > 1:  # a longer step has a wider learned range: the KL's variance term can differ between pixels
            one_step = diffusion.reverse_step(1)
            step = diffusion.reverse_step(jump)
            assert step.log_beta[t] - step.log_variance[t] > 2 * (one_step.log_beta[t] - one_step.log_variance[t])
        torch.testing.assert_close(out.prev_sample, mean + torch.exp(0.5 * log_var) * step_noise, rtol=1e-4, atol=1e-4)


def test_predict_eps_inverts_predict_x0():
    diffusion = GaussianDiffusion()
    xt, eps = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    t = torch.tensor([3, 50, 400])
    torch.testing.assert_close(diffusion.predict_eps(xt, t, diffusion.predict_x0(xt, t, eps)), eps, rtol=1e-4, atol=1e-4)


def test_out_of_range_timesteps_are_rejected():
    diffusion = GaussianDiffusion()
    import pytest

    with pytest.raises(ValueError, match="timesteps must be in"):
        diffusion.q_sample(torch.zeros(1, 3, 4, 4), 1000, torch.zeros(1, 3, 4, 4))


def test_clipping_x0_changes_the_kl_exactly_where_the_estimate_leaves_the_image_range():
    diffusion = GaussianDiffusion()
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, torch.randn(1, 3, 8, 8, generator=g)
    t = torch.tensor([200])
    xt = diffusion.q_sample(x0, t, noise)
    x0_hat = x0 + torch.randn(1, 3, 8, 8, generator=g)  # about a third of the values outside [-1, 1]
    eps, v = diffusion.predict_eps(xt, t, x0_hat), torch.zeros_like(x0)
    plain, clipped = (diffusion.kl_map(x0, xt, t, eps, v, clip_x0=clip) for clip in (False, True))
    outside = (x0_hat.abs() > 1).any(dim=1)
    changed = ~torch.isclose(plain, clipped, rtol=1e-6, atol=1e-9)
    assert outside.any() and torch.equal(changed, outside)
    assert (clipped[outside] < plain[outside]).all()  # x0 lies in range, so clipping can only move x̂0 closer
