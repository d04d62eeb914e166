import csv
from dataclasses import asdict

import numpy as np
import pytest

from diffad import DataError, load_checkpoint
from diffad.metrics import localisation_quality
from diffad.train import TrainConfig, _apply, _augmentations, augmented_batch, split_holdout, train
from tests.conftest import TINY_NET


def read_log(folder):
    with (folder / "train_log.csv").open() as handle:
        return [row for row in csv.DictReader(handle)]


def test_training_lowers_the_loss_and_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "part"
    config = TrainConfig(data=str(tiny_dataset), out=str(out), resolution=32, steps=60, batch_size=4, save_every=30, lr=1e-3, warmup_steps=5, net=TINY_NET)
    train(TrainConfig(**{**config.__dict__, "steps": 30}), progress=False)
    assert load_checkpoint(out).training["steps_done"] == 30
    train(config, progress=False)  # resumes from train_state.pt at step 30
    rows = read_log(out)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps) and steps[-1] == 60 and steps.count(30) == 1
    # Each logged loss is one batch of 4 at random timesteps: compare halves, and the feature loss (no random t).
    losses = np.array([float(r["loss"]) for r in rows])
    features = np.array([float(r["feature"]) for r in rows])
    assert losses[3:].mean() < losses[:3].mean() and features[-2:].mean() < 0.9 * features[:2].mean()
    detector = load_checkpoint(out)
    assert detector.training["steps_done"] == 60 and detector.training["train_images"] + detector.training["holdout_images"] == 10
    assert np.isfinite(detector.calibration.image_threshold) and len(detector.calibration.normal_scores) == 2
    # Smoothing is chosen on synthetic defects in the held-out images, and the best candidate is the default.
    trials = detector.calibration.smoothing_trials
    assert [trial.sigma for trial in trials] == [0.0, 2.0, 4.0, 8.0, 16.0]
    best = max(trials, key=lambda trial: localisation_quality(asdict(trial)))
    assert detector.calibration.smoothing_sigma == best.sigma


def test_a_time_limit_stops_training_with_a_checkpoint_that_resumes(tiny_dataset, tmp_path):
    out = tmp_path / "part"
    config = TrainConfig(data=str(tiny_dataset), out=str(out), resolution=32, steps=50, batch_size=2, save_every=50,
                         time_limit=0.0, net=TINY_NET)
    train(config, progress=False)  # a zero budget runs one step and saves it, well before save_every
    assert load_checkpoint(out).training["steps_done"] == 1 and (out / "train_state.pt").exists()
    train(TrainConfig(**{**config.__dict__, "time_limit": None, "steps": 3}), progress=False)
    assert [int(r["step"]) for r in read_log(out)][-1] == 3 and load_checkpoint(out).training["steps_done"] == 3


def test_a_batch_is_augmented_per_image_in_one_call_per_augmentation():
    import torch

    images = torch.randn(10, 3, 6, 6)
    augmentations = _augmentations("dihedral")
    generator = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 10, (32,), generator=generator)
    aug = torch.randint(0, len(augmentations), (32,), generator=generator)
    one_by_one = torch.stack([_apply(images[i], *augmentations[a]) for i, a in zip(idx.tolist(), aug.tolist())])
    assert torch.equal(augmented_batch(images, idx, aug, augmentations), one_by_one)
    assert len(set(aug.tolist())) > 4  # most of the eight augmentations occur in the batch


def test_init_from_starts_with_the_checkpoints_network(tiny_checkpoint, tiny_dataset, tmp_path):
    import torch

    # lr 0: the run must end exactly where the source checkpoint's (fp16) weights began.
    config = TrainConfig(data=str(tiny_dataset), out=str(tmp_path / "part"), resolution=32, steps=1, batch_size=2, lr=0.0,
                         init_from=str(tiny_checkpoint))
    train(config, progress=False)
    source, continued = load_checkpoint(tiny_checkpoint), load_checkpoint(tmp_path / "part")
    assert continued.net.config == source.net.config and continued.training["init_from"] == str(tiny_checkpoint)
    for (name, a), b in zip(source.net.state_dict().items(), continued.net.state_dict().values()):
        assert torch.equal(a, b), name
    wider = {"head_channels": 2 * TINY_NET["head_channels"]}
    with pytest.raises(DataError, match="--init-from .* does not fit this run's layout"):
        train(TrainConfig(**{**config.__dict__, "out": str(tmp_path / "other"), "net": wider}), progress=False)


def test_a_noise_predicting_network_seeds_a_wiener_one_with_its_noise_output_cleared(tiny_dataset, tmp_path):
    import torch

    base = dict(data=str(tiny_dataset), resolution=32, batch_size=2, save_every=2)
    train(TrainConfig(out=str(tmp_path / "eps"), steps=2, net={**TINY_NET, "prediction": "eps"}, **base), progress=False)
    train(TrainConfig(out=str(tmp_path / "wiener"), steps=1, lr=0.0, init_from=str(tmp_path / "eps"),
                      net={"prediction": "wiener"}, **base), progress=False)
    source, seeded = load_checkpoint(tmp_path / "eps").net, load_checkpoint(tmp_path / "wiener").net
    assert seeded.config.prediction == "wiener"
    half = source.unet.conv_out.out_channels // 2
    assert not seeded.unet.conv_out.weight[:half].any() and not seeded.unet.conv_out.bias[:half].any()
    assert torch.equal(seeded.unet.conv_out.weight[half:], source.unet.conv_out.weight[half:])  # the variance half
    assert torch.equal(seeded.feature_head[0].weight, source.feature_head[0].weight)


def test_holdout_split_and_too_few_images(tmp_path):
    train_idx, hold_idx = split_holdout(20, 0.15, seed=0)
    assert len(hold_idx) == 3 and not set(train_idx) & set(hold_idx)
    with pytest.raises(DataError, match="at least 4 good images"):
        split_holdout(3, 0.15, seed=0)
    with pytest.raises(DataError, match="does not exist"):
        train(TrainConfig(data=str(tmp_path / "nothing"), out=str(tmp_path / "x")), progress=False)


def test_unresumable_state_is_a_clear_error(tiny_dataset, tmp_path):
    out = tmp_path / "part"
    config = TrainConfig(data=str(tiny_dataset), out=str(out), resolution=32, steps=2, batch_size=2, save_every=2, net=TINY_NET)
    train(config, progress=False)
    wider = {**TINY_NET, "head_channels": 2 * TINY_NET["head_channels"]}
    with pytest.raises(DataError, match="train_state.pt cannot be resumed.*another network layout"):
        train(TrainConfig(**{**config.__dict__, "steps": 4, "net": wider}), progress=False)
    state = out / "train_state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(DataError, match="cannot be resumed.*delete it to start over"):
        train(TrainConfig(**{**config.__dict__, "steps": 4}), progress=False)


def test_recalibration_re_measures_on_the_training_holdout(tiny_checkpoint, tiny_dataset, tmp_path):
    import torch

    from diffad.cli import main
    from diffad.train import checkpoint_split
    from tests.conftest import copy_of

    folder = copy_of(tiny_checkpoint, tmp_path)
    original = load_checkpoint(folder)
    train_images, holdout = checkpoint_split(original, tiny_dataset)
    assert (len(train_images), len(holdout)) == (original.training["train_images"], original.training["holdout_images"])
    assert not any(torch.equal(h, t) for h in holdout for t in train_images)
    written = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset)]) == 0
    assert (folder / "model.safetensors").stat().st_mtime_ns > written
    # The same held-out images scored by the saved (fp16) weights give the scores training measured.
    again = load_checkpoint(folder)
    np.testing.assert_allclose(sorted(again.calibration.normal_scores), sorted(original.calibration.normal_scores), rtol=0.05)


def test_unknown_training_settings_are_named():
    with pytest.raises(ValueError, match="unknown training setting.*'stepz'"):
        TrainConfig.from_dict({"data": "d", "out": "o", "stepz": 3})
    with pytest.raises(ValueError, match="unknown scoring setting.*'alfa'"):
        TrainConfig(data="d", out="o", scoring={"alfa": 0.3})
    with pytest.raises(ValueError, match="precision must be one of .*'fp8'"):
        TrainConfig(data="d", out="o", precision="fp8")
