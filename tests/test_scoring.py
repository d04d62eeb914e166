import dataclasses

import numpy as np
import pytest
import torch

from diffad import load_checkpoint
from diffad.cli import main
from diffad.diffusion import GaussianDiffusion
from diffad.models import NetOutput
from diffad.postprocess import combine, normalise
from diffad.scoring import pool_sizes, raw_maps
from tests.conftest import copy_of


class FixedFeatureNet:
    """Predicts zero noise and returns given features: the feature residual is exactly what the test builds."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __call__(self, xt, t):
        zeros = torch.zeros_like(xt)
        return NetOutput(zeros, zeros, torch.ones_like(xt), zeros, self.features)


def test_feature_pool_averages_out_texture_residual_and_keeps_a_coherent_offset():
    generator = torch.Generator().manual_seed(0)
    target = torch.zeros(1, 32, 32, 32)
    # Unpredictable texture: independent unit residual in every cell; a defect: the same offset over 8 x 8 cells.
    predicted = torch.randn(target.shape, generator=generator)
    predicted[..., 12:20, 12:20] += 0.5
    x0 = torch.zeros(1, 3, 128, 128)
    inside = np.zeros((128, 128), bool)
    inside[56:72, 56:72] = True  # its central cells, whose 5 x 5 windows lie within it
    far = np.ones((128, 128), bool)
    far[36:92, 36:92] = False  # cells whose windows reach no defect cell

    def contrast(pool: int) -> float:
        raw = raw_maps(FixedFeatureNet(predicted), GaussianDiffusion(), x0, target, [20], torch.zeros_like(x0), pool)
        feature = raw.features[pool][0, 0].numpy()
        assert feature.shape == (128, 128)
        return float(feature[inside].mean() / feature[far].mean())

    # Unpooled: (1 + 0.25) / 1. Pooled over 5 x 5 cells: the texture term shrinks 25-fold, the offset stays.
    assert contrast(1) < 1.6
    assert contrast(5) > 3 * contrast(1)


def anomaly(detector, raw, calibration):
    return combine(normalise(raw, calibration, detector.scoring), calibration, detector.scoring)[0]


def test_feature_pool_is_odd_and_must_match_the_calibration(tiny_checkpoint, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="odd"):
        pool_sizes(4)
    folder = copy_of(tiny_checkpoint, tmp_path)
    detector = load_checkpoint(folder)
    image = detector.preprocess(sorted((tiny_dataset / "test" / "hole").iterdir())[0])
    with pytest.raises(ValueError, match="diffad calibrate --feature-pool 3"):
        detector.calibration.with_feature_pool(3)

    command = ["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--feature-pool"]
    assert main(command + ["4"]) == 2  # a clear error, the checkpoint untouched
    assert main(command + ["1,x"]) == 2
    assert load_checkpoint(folder).calibration.feature_pool == (1,)
    assert main(command + ["3"]) == 0
    recalibrated = load_checkpoint(folder)
    assert recalibrated.calibration.feature_pool == (3,)
    prediction = recalibrated.predict(image)
    unpooled = detector.predict(image)
    assert np.isfinite(prediction.score)
    # The option reaches the saved checkpoint's maps (the pooling itself is checked above).
    assert np.abs(prediction.feature_map - unpooled.feature_map).max() > 0.1


def test_several_pool_sizes_average_their_calibrated_maps_and_survive_a_round_trip(tiny_checkpoint, tiny_dataset, tmp_path):
    from diffad.demo import analyse

    folder = copy_of(tiny_checkpoint, tmp_path)
    unpooled = load_checkpoint(folder)
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--feature-pool", "9,1,3"]) == 0
    detector = load_checkpoint(folder)
    calibration = detector.calibration
    assert calibration.feature_pool == (1, 3, 9)
    # The coarse maps' normal means are stored small and are used at full size.
    size = detector.resolution
    assert calibration.features[1].position_mean.shape[1:] == (size, size)
    assert calibration.features[9].position_mean.shape[1:] == (size // 4, size // 4)
    assert calibration.features[9].centres([0], (size, size)).shape == (1, size, size)
    image = detector.preprocess(sorted((tiny_dataset / "test" / "hole").iterdir())[0])
    raw = detector.raw_maps(image[None])
    multi = anomaly(detector, raw, calibration)
    # Each size on its own is one of the calibrated ones, so it needs no new calibration.
    singles = [anomaly(detector, raw, calibration.with_feature_pool(k)).feature for k in (1, 3, 9)]
    np.testing.assert_allclose(multi.feature, np.mean(singles, axis=0), rtol=1e-5, atol=1e-5)
    assert np.abs(singles[2] - singles[0]).max() > 0.1
    # The app's timestep slider keeps showing the sharp unpooled map; the final map is the multi-scale one.
    before, after = analyse(unpooled, image), analyse(detector, image)
    # (not bit for bit: training calibrated with fp32 weights, the saved ones are fp16)
    assert all(np.abs(a["feature"].astype(int) - b["feature"]).mean() < 2 for a, b in zip(before.steps, after.steps))
    assert np.abs(after.maps["anomaly"] - before.maps["anomaly"]).max() > 0.1
    with pytest.raises(ValueError, match="feature_pool 5 is not among the sizes 1,3,9"):
        calibration.with_feature_pool(5)


def test_timesteps_share_forwards_without_changing_each_others_maps(tiny_checkpoint, tiny_dataset):
    detector = load_checkpoint(tiny_checkpoint)
    images = torch.stack([detector.preprocess(p) for p in sorted((tiny_dataset / "test" / "hole").iterdir())[:3]])
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
    features = detector.normalized_features(images)

    def maps(timesteps, forward_batch):
        return raw_maps(detector.net, detector.diffusion, images, features, timesteps, noise, forward_batch=forward_batch)

    together = maps([20, 200, 400], forward_batch=4)  # 9 rows in forwards of 4, 4 and 1
    for j, t in enumerate((20, 200, 400)):
        alone = maps([t], forward_batch=1)
        for name in ("kl", "rgb", "x0_hat"):
            torch.testing.assert_close(getattr(together, name)[:, j], getattr(alone, name)[:, 0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(together.features[1][:, j], alone.features[1][:, 0], rtol=1e-4, atol=1e-5)
    # Different timesteps do give different maps: the rows are not mixed up.
    assert (together.kl[:, 0] - together.kl[:, 2]).abs().max() > 1e-3


def test_the_papers_scoring_options_change_only_what_they_say(tiny_checkpoint, tiny_dataset):
    from dataclasses import replace

    from diffad.scoring import ScoringConfig

    detector = load_checkpoint(tiny_checkpoint)
    images = torch.stack([detector.preprocess(p) for p in sorted((tiny_dataset / "test" / "hole").iterdir())[:2]])
    base = replace(detector.scoring, timesteps=(20, 200))

    def maps(timesteps=(20, 200), **options):
        return detector.raw_maps(images, timesteps, scoring=replace(base, **options))

    shared = maps()
    # Fresh noise: another x_t per timestep, and a timestep's map does not depend on which others are asked for.
    fresh = maps(fresh_noise=True)
    assert not torch.allclose(fresh.xt[:, 1], shared.xt[:, 1])
    torch.testing.assert_close(maps((200,), fresh_noise=True).kl[:, 0], fresh.kl[:, 1], rtol=1e-4, atol=1e-6)
    # A longer reverse step changes the KL, not the network's answer.
    jumped = maps(kl_jump=4)
    torch.testing.assert_close(jumped.x0_hat, shared.x0_hat)
    assert not torch.allclose(jumped.kl, shared.kl)
    with pytest.raises(ValueError, match="kl_jump"):
        ScoringConfig(kl_jump=0)
    assert ScoringConfig(kl_jump=4).raw_options != ScoringConfig().raw_options


def test_gaussian_blur_is_scipys_with_nearest_edges():
    from scipy.ndimage import gaussian_filter

    from diffad.scoring import gaussian_blur

    maps = torch.rand(2, 40, 24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (1.0, 4.0, 16.0):  # 16: the kernel is wider than the map
        expected = np.stack([gaussian_filter(m, sigma, mode="nearest", truncate=3.0) for m in maps.numpy()])
        np.testing.assert_allclose(gaussian_blur(maps, sigma).numpy(), expected, atol=1e-10)
    assert gaussian_blur(maps, 0.0) is maps


def test_pixel_smoothing_smooths_the_raw_maps_so_calibration_and_panels_are_of_the_smoothed_map(tiny_checkpoint, tiny_dataset, tmp_path):
    from diffad.scoring import gaussian_blur

    folder = copy_of(tiny_checkpoint, tmp_path)
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--scoring", '{"pixel_smoothing": 4}']) == 0
    detector = load_checkpoint(folder)
    images = torch.stack([detector.preprocess(p) for p in sorted((tiny_dataset / "test" / "hole").iterdir())[:2]])
    smooth = detector.raw_maps(images)
    sharp = detector.raw_maps(images, scoring=dataclasses.replace(detector.scoring, pixel_smoothing=0.0))
    torch.testing.assert_close(smooth.x0_hat, sharp.x0_hat)
    for name in ("kl", "rgb"):
        expected = gaussian_blur(getattr(sharp, name).flatten(0, 1), 4.0).view_as(getattr(sharp, name))
        torch.testing.assert_close(getattr(smooth, name), expected, rtol=1e-4, atol=1e-7)
    # The statistics are the smoothed map's (smoothing shrinks the spread of a noisy map) ...
    unsmoothed = load_checkpoint(tiny_checkpoint).calibration
    assert (detector.calibration.kl.std < 0.9 * unsmoothed.kl.std).all()
    # ... and the timestep slider's KL panels add up to the score's pixel map over the scoring timesteps.
    prediction = detector.predict(images[0])
    panels = sum(step.kl_z for step in prediction.steps if step.t in detector.scoring.timesteps)
    np.testing.assert_allclose(prediction.pixel_map, panels, rtol=1e-4, atol=1e-4)
    # The text under the panels says they are smoothed, and how much.
    from diffad.demo import analyse, step_view

    assert "Gaussian σ = 4 px" in step_view(analyse(detector, images[0]), 200)[-1]
    assert "Gaussian σ" not in step_view(analyse(load_checkpoint(tiny_checkpoint), images[0]), 200)[-1]


def test_calibrate_can_change_the_scoring_and_refuses_unknown_settings(tiny_checkpoint, tiny_dataset, tmp_path, capsys):
    folder = copy_of(tiny_checkpoint, tmp_path)
    before = (folder / "config.json").read_text()
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--scoring", '{"kl_jumpp": 4}']) == 2
    assert "unknown scoring setting(s) 'kl_jumpp'" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == before  # refused before anything was written
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset),
                 "--scoring", '{"kl_jump": 4, "centre_by_position": ["kl", "feature"]}']) == 0
    detector = load_checkpoint(folder)
    assert detector.scoring.kl_jump == 4 and detector.scoring.centre_by_position == ("kl", "feature")
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--scoring", '{"pixel_smoothing": -1}']) == 2
    assert "pixel_smoothing must be a sigma between 0 and 64" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--smoothing", "70"]) == 2
    assert "smoothing must be a sigma between 0 and 64" in capsys.readouterr().err
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--smoothing", "3"]) == 0
    assert load_checkpoint(folder).calibration.smoothing_sigma == 3.0  # fixed, not chosen on synthetic defects


def test_the_verdict_threshold_quantile_is_the_checkpoints_own_and_kept_on_recalibration(tiny_checkpoint, tiny_dataset,
                                                                                         tmp_path, capsys):
    import json

    from diffad.hub import training_command

    folder = copy_of(tiny_checkpoint, tmp_path)
    before = (folder / "config.json").read_text()
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--threshold-quantile", "1.5"]) == 2
    assert "threshold quantile must be between 0.5 and 1" in capsys.readouterr().err
    assert (folder / "config.json").read_text() == before
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--threshold-quantile", "0.75",
                 "--smoothing", "0"]) == 0
    calibration = load_checkpoint(folder).calibration
    assert calibration.threshold_quantile == 0.75
    assert calibration.image_threshold == pytest.approx(np.quantile(calibration.normal_scores, 0.75))
    assert calibration.image_threshold < np.quantile(calibration.normal_scores, 0.99)
    # A later recalibration keeps it, and the Hub card's recipe repeats it.
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--smoothing", "0"]) == 0
    assert load_checkpoint(folder).calibration.threshold_quantile == 0.75
    assert "--threshold-quantile 0.75" in training_command(json.loads((folder / "config.json").read_text()))
