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
    assert load_checkpoint(folder).calibration.feature_pool == 1
    assert main(command + ["3"]) == 0
    recalibrated = load_checkpoint(folder)
    assert recalibrated.scoring.feature_pool == recalibrated.calibration.feature_pool == 3
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
    with pytest.raises(CheckpointError, match="config.json: feature_pool 3 differs .* diffad calibrate --feature-pool 3"):
        load_checkpoint(folder)
