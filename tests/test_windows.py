"""Non-square photos scored at their own aspect: windows, stitching, and the paths that use them."""
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffad import load_checkpoint
from diffad.cli import main
from diffad.synth import add_defect, textured_part
from diffad.windows import OVERLAP, cut, layout_for, stitch, stitch_picture
from tests.conftest import copy_of


@pytest.mark.parametrize("size", [(103, 300), (632, 222), (300, 300), (257, 256)])
def test_windows_cover_the_photo_at_its_own_aspect_and_overlap(size):
    layout = layout_for(*size, 64)
    assert min(layout.width, layout.height) == 64
    assert max(layout.width, layout.height) / 64 == pytest.approx(max(size) / min(size), abs=0.02)
    long = max(layout.width, layout.height)
    assert layout.starts[0] == 0 and layout.starts[-1] + 64 == long
    gaps = np.diff(layout.starts)
    assert (gaps <= (1 - OVERLAP) * 64 + 1).all()  # every pair of neighbours overlaps by at least OVERLAP
    assert layout.count == (1 if long == 64 else len(gaps) + 1)


def test_stitching_undoes_cutting():
    layout = layout_for(300, 103, 32)
    image = torch.rand(3, layout.height, layout.width)
    windows = cut(image, layout)
    assert windows.shape == (layout.count, 3, 32, 32)
    torch.testing.assert_close(stitch_picture(windows, layout), image)  # each pixel from exactly one window
    torch.testing.assert_close(stitch(windows, layout), image)  # an average of equal values
    maps = np.stack([np.full((32, 32), float(i)) for i in range(layout.count)])
    stitched = stitch(maps, layout)
    assert stitched.shape == (layout.height, layout.width) and stitched[0, 0] == 0 and stitched[0, -1] == layout.count - 1


@pytest.fixture(scope="module")
def wide_dataset(tiny_dataset, tmp_path_factory):
    """The tiny category with every good image twice as wide (the part beside its mirror image)."""
    root = tmp_path_factory.mktemp("wide") / "part"
    shutil.copytree(tiny_dataset, root)
    for path in (root / "train" / "good").iterdir():
        pixels = np.asarray(Image.open(path))
        Image.fromarray(np.concatenate([pixels, pixels[:, ::-1]], axis=1)).save(path)
    return root


@pytest.fixture(scope="module")
def windowed(tiny_checkpoint, wide_dataset, tmp_path_factory):
    """The tiny checkpoint recalibrated on wide photos to score at the photo's aspect, and a wide photo with a defect
    on its right."""
    folder = copy_of(tiny_checkpoint, tmp_path_factory.mktemp("windows"))
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(wide_dataset),
                 "--scoring", '{"aspect": "windows"}', "--smoothing", "0"]) == 0
    part = np.concatenate([textured_part(64, seed=1), textured_part(64, seed=2), textured_part(64, seed=3)], axis=1)
    right, mask = add_defect(part[:, 128:], "hole", seed=0, size=1.0)
    part[:, 128:] = right
    return load_checkpoint(folder), Image.fromarray(part)


def test_a_wide_photo_is_scored_at_its_aspect_as_the_stitch_of_its_windows(windowed):
    detector, photo = windowed
    assert detector.scoring.aspect == "windows"
    prediction = detector.predict(photo, view_timesteps=[5])
    layout = layout_for(*photo.size, detector.resolution)
    assert layout.count > 1 and prediction.anomaly_map.shape == (layout.height, layout.width)
    assert prediction.image.shape == (3, layout.height, layout.width)
    # Each window scored alone, as a square photo, and the stitch of those maps is the prediction's map.
    windows = cut(prediction.image, layout)
    alone = [detector.predict(window) for window in windows]
    np.testing.assert_allclose(stitch(np.stack([p.anomaly_map for p in alone]), layout), prediction.anomaly_map, atol=1e-4)
    # The panels have the photo's aspect too, and a timestep added later equals one computed with the score.
    step = next(s for s in prediction.steps if s.t == 5)
    assert tuple(step.xt.shape) == (3, layout.height, layout.width) and step.kl_z.shape == (layout.height, layout.width)
    later = detector.steps(prediction.image, [5])[0]
    np.testing.assert_allclose(later.kl_z, step.kl_z, atol=1e-4)
    torch.testing.assert_close(later.xt, step.xt)


def test_a_square_photo_scores_alike_either_way(windowed):
    detector, photo = windowed
    square = photo.crop((0, 0, 64, 64))
    windows = detector.predict(square)
    squashed = dataclasses.replace(detector.scoring, aspect="squash")
    detector.scoring, original = squashed, detector.scoring
    try:
        assert detector.predict(square).score == pytest.approx(windows.score)
    finally:
        detector.scoring = original


def test_calibration_thresholds_come_from_the_stitched_maps(windowed, wide_dataset):
    from diffad.train import holdout_windows

    detector, _ = windowed
    windows, layouts = holdout_windows(detector, wide_dataset)
    assert all(layout.count > 1 for layout in layouts) and len(windows) == sum(layout.count for layout in layouts)
    # One score per held-out photo, each what predict gives that photo.
    assert len(detector.calibration.normal_scores) == len(layouts)
    photos = [stitch_picture(windows[i:i + layout.count], layout)
              for i, layout in zip(np.cumsum([0] + [layout.count for layout in layouts]), layouts)]
    scores = sorted(detector.predict(photo).score for photo in photos)
    np.testing.assert_allclose(scores, detector.calibration.normal_scores, rtol=1e-4)


def test_the_morph_of_a_wide_photo_keeps_its_aspect(windowed):
    from diffad.morph import MorphConfig, morph

    detector, photo = windowed
    frames = list(morph(detector, photo, MorphConfig(max_loops=1, stop_at="never")))
    layout = layout_for(*photo.size, detector.resolution)
    assert len(frames) == 2
    assert all(tuple(f.image.shape) == (3, layout.height, layout.width) for f in frames)
    assert frames[-1].anomaly_map.shape == (layout.height, layout.width)
    assert not torch.equal(frames[0].image, frames[1].image)


def test_training_at_the_photos_aspect_learns_their_windows(wide_dataset, tmp_path):
    from diffad.train import _apply, _augmentations, _split, as_scored
    from tests.conftest import TINY_NET

    out = tmp_path / "part"
    assert main(["train", "--data", str(wide_dataset), "--out", str(out), "--resolution", "32", "--steps", "2",
                 "--batch-size", "2", "--net", json.dumps(TINY_NET), "--scoring", '{"aspect": "windows"}',
                 "--feature-pool", "1,3", "--precision", "bf16"]) == 0
    detector = load_checkpoint(out)
    assert detector.scoring.aspect == "windows" and detector.calibration.feature_pool == (1, 3)
    assert detector.training["precision"] == "bf16" and detector.training["steps_done"] == 2
    images, paths, train_idx, _ = _split(detector, wide_dataset)
    windows, layouts = as_scored(images, paths, train_idx, 32, "windows")
    assert len(windows) == sum(layout.count for layout in layouts) == 3 * len(train_idx)

    def augmented_mean(x):
        return torch.cat([_apply(x, r, f) for r, f in _augmentations("flip")]).mean(dim=0)

    # The Wiener estimate's statistics are those of the windows (stored in fp16), not of the squashed photos.
    assert torch.allclose(detector.net.data_mean, augmented_mean(windows), atol=1e-3)
    assert not torch.allclose(detector.net.data_mean, augmented_mean(images[train_idx]), atol=1e-2)
