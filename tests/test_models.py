import pytest
import torch

from diffad.diffusion import GaussianDiffusion
from diffad.models import DiffADNet, NetConfig
from tests.conftest import TINY_NET


def tiny_net(prediction: str) -> DiffADNet:
    torch.manual_seed(0)
    return DiffADNet(NetConfig(resolution=32, feature_channels=8, prediction=prediction, **TINY_NET)).eval()


def silence_output(net: DiffADNet) -> None:
    """Zero the UNet's last layer: the network then adds nothing to its parameterisation's fixed part."""
    torch.nn.init.zeros_(net.unet.conv_out.weight)
    torch.nn.init.zeros_(net.unet.conv_out.bias)


def test_an_untrained_wiener_network_answers_the_per_pixel_wiener_estimate():
    net = tiny_net("wiener")
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    net.set_data_statistics(images)
    silence_output(net)
    diffusion = GaussianDiffusion()
    x0, noise = images[:2], torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for t in (5, 200, 999):
            xt = diffusion.q_sample(x0, t, noise)
            out = net(xt, torch.full((2,), t))
            s, n = diffusion.sqrt_alphas_cumprod[t].float(), diffusion.sqrt_one_minus_alphas_cumprod[t].float()
            var0 = net.data_std**2
            wiener = net.data_mean + s * var0 / (s**2 * var0 + n**2) * (xt - s * net.data_mean)
            assert torch.allclose(out.x0, wiener, atol=1e-5)
            # eps is the same estimate expressed as noise: it and x0 reproduce x_t.
            assert torch.allclose(s * out.x0 + n * out.eps, xt, atol=1e-4)
    # At the highest noise level the estimate is the mean training image, at the lowest x_t itself.
    assert (out.x0 - net.data_mean).abs().max() < 0.02
    xt = diffusion.q_sample(x0, 1, noise)
    with torch.no_grad():
        low = net(xt, torch.full((2,), 1)).x0
    assert (low - xt).abs().max() < 0.05


def test_the_residual_loss_of_an_eps_network_is_its_noise_mse():
    net = tiny_net("eps")
    diffusion = GaussianDiffusion()
    x0, noise = torch.rand(3, 3, 32, 32) * 2 - 1, torch.randn(3, 3, 32, 32)
    t = torch.tensor([5, 100, 400])
    xt = diffusion.q_sample(x0, t, noise)
    with torch.no_grad():
        out = net(xt, t)
    residual = ((out.x0 - x0) / out.x0_scale).pow(2).mean()
    assert torch.allclose(residual, (out.eps - noise).pow(2).mean(), rtol=1e-3)


def test_unknown_network_settings_are_named_in_the_error():
    with pytest.raises(ValueError, match="'patchh'"):
        NetConfig.from_dict({"patchh": 2})
    with pytest.raises(ValueError, match="prediction"):
        NetConfig(prediction="v")
