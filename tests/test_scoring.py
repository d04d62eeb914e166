import dataclasses
import json

import numpy as np
import pytest
import torch

from diffad import CheckpointError, load_checkpoint
from diffad.cli import main
from diffad.diffusion import GaussianDiffusion
from diffad.models import NetOutput
from diffad.scoring import ScoringConfig, step_maps
from tests.conftest import copy_of


class FixedFeatureNet:
    """Predicts zero noise and returns given features: the feature residual is exactly what the test builds."""

    def __init__(self, features: torch.Tensor):
        self.features = features

    def __call__(self, xt, t):
        return NetOutput(torch.zeros_like(xt), torch.zeros_like(xt), self.features)


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
        step = step_maps(FixedFeatureNet(predicted), GaussianDiffusion(), x0, target, [20], torch.zeros_like(x0), pool)[0][0]
        assert step.feature.shape == (128, 128)
        return float(step.feature[inside].mean() / step.feature[far].mean())

    # Unpooled: (1 + 0.25) / 1. Pooled over 5 x 5 cells: the texture term shrinks 25-fold, the offset stays.
    assert contrast(1) < 1.6
    assert contrast(5) > 3 * contrast(1)


def test_feature_pool_is_odd_and_must_match_the_calibration(tiny_checkpoint, tiny_dataset, tmp_path):
    with pytest.raises(ValueError, match="odd"):
        ScoringConfig(feature_pool=4)
    folder = copy_of(tiny_checkpoint, tmp_path)
    detector = load_checkpoint(folder)
    image = detector.preprocess(sorted((tiny_dataset / "test" / "hole").iterdir())[0])
    pooled = dataclasses.replace(detector.scoring, feature_pool=3)
    with pytest.raises(ValueError, match="diffad calibrate --feature-pool 3"):
        detector.combine(detector.raw_steps(image[None], detector.scoring.timesteps)[0], pooled)

    command = ["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--feature-pool"]
    assert main(command + ["4"]) == 2  # a clear error, the checkpoint untouched
    assert main(command + ["1,x"]) == 2
    assert load_checkpoint(folder).calibration.feature_pool == (1,)
    assert main(command + ["3"]) == 0
    recalibrated = load_checkpoint(folder)
    assert recalibrated.scoring.feature_pool == recalibrated.calibration.feature_pool == (3,)
    prediction = recalibrated.predict(image)
    unpooled = detector.predict(image)
    assert np.isfinite(prediction.score)
    # The option reaches the saved checkpoint's maps (the pooling itself is checked above).
    assert np.abs(prediction.feature_map - unpooled.feature_map).max() > 0.1


def test_a_checkpoint_whose_pooling_differs_from_its_calibration_is_refused_on_load(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    config["scoring"]["feature_pool"] = 3  # edited by hand: the stored statistics were measured unpooled
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: feature_pool 3 is not among the sizes 1 .* diffad calibrate --feature-pool 3"):
        load_checkpoint(folder)


def test_several_pool_sizes_average_their_calibrated_maps_and_survive_a_round_trip(tiny_checkpoint, tiny_dataset, tmp_path):
    from diffad.demo import analyse

    folder = copy_of(tiny_checkpoint, tmp_path)
    unpooled = load_checkpoint(folder)
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--feature-pool", "9,1,3"]) == 0
    detector = load_checkpoint(folder)
    assert detector.scoring.feature_pool == detector.calibration.feature_pool == (1, 3, 9)
    assert {"feature", "feature@3", "feature@9"} <= set(detector.calibration.step_stats["20"])
    # The coarse maps' normal means are stored small and come back at full size.
    size = detector.resolution
    assert detector.extra_tensors["position_mean_pooled"].shape[1:] == (2, size // 4, size // 4)
    assert detector.position_means()[20]["feature@9"].shape == (size, size)
    image = detector.preprocess(sorted((tiny_dataset / "test" / "hole").iterdir())[0])
    steps = detector.raw_steps(image[None], detector.scoring.timesteps)[0]
    multi = detector.combine(steps)
    # Each size on its own is one of the calibrated ones, so it needs no new calibration.
    singles = [detector.combine(steps, dataclasses.replace(detector.scoring, feature_pool=k)).feature for k in (1, 3, 9)]
    np.testing.assert_allclose(multi.feature, np.mean(singles, axis=0), rtol=1e-5, atol=1e-5)
    assert np.abs(singles[2] - singles[0]).max() > 0.1
    # The app's timestep slider keeps showing the sharp unpooled map; the final map is the multi-scale one.
    before, after = analyse(unpooled, image), analyse(detector, image)
    # (not bit for bit: training calibrated with fp32 weights, the saved ones are fp16)
    assert all(np.abs(a["feature"].astype(int) - b["feature"]).mean() < 2 for a, b in zip(before.steps, after.steps))
    assert np.abs(after.maps["anomaly"] - before.maps["anomaly"]).max() > 0.1
    with pytest.raises(ValueError, match="feature_pool 5 is not among the sizes 1,3,9"):
        detector.combine(steps, dataclasses.replace(detector.scoring, feature_pool=5))


def test_a_calibration_written_with_one_pool_size_as_a_number_still_loads():
    from diffad.detector import Calibration

    old = Calibration.from_dict({"feature_pool": 3, "step_stats": {"20": {"kl": [0, 1], "feature": [2, 3], "rgb": [0, 1]}}})
    assert old.feature_pool == (3,)
    assert old.step_stats["20"] == {"kl": [0, 1], "feature@3": [2, 3], "rgb": [0, 1]}
    assert Calibration.from_dict(old.to_dict()) == old
