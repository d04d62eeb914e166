import copy

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from PIL import Image

from diffad import load_checkpoint
from diffad.gaussian import FeatureGaussian, fit_feature_gaussian
from diffad.windows import square_layout
from diffad.morph import (MorphConfig, before_after, descent_direction, energy_gradient, export_gif, export_mp4,
                          feature_gaussian, focus_weight, morph, MorphGoal)
from tests.conftest import BOTTLE, needs_bottle


@pytest.fixture(scope="module")
def detector(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def defective(tiny_dataset):
    return sorted((tiny_dataset / "test" / "hole").iterdir())[0]


def test_energy_gradient_matches_finite_differences(detector, defective):
    import copy

    gaussian = feature_gaussian(detector)
    x = detector.preprocess(defective)
    grad, _ = energy_gradient(detector, gaussian, x, square_layout(detector.resolution))
    # Central differences in float64 with a small step: ReLU6 kinks make float32 differences unreliable.
    backbone = copy.deepcopy(detector.backbone).double()
    g64 = copy.deepcopy(gaussian)
    g64.mean, g64.precision = g64.mean.double(), g64.precision.double()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        direction = torch.randn(x.shape, generator=generator, dtype=torch.float64)
        direction /= direction.norm()
        h = 1e-4
        with torch.no_grad():
            plus = g64.energy(backbone((x.double() + h * direction)[None]))[0]
            minus = g64.energy(backbone((x.double() - h * direction)[None]))[0]
        numeric = float((plus - minus) / (2 * h))
        analytic = float((grad.double() * direction).sum())
        assert analytic == pytest.approx(numeric, rel=0.02)


def test_the_smoothed_direction_still_descends_but_changes_the_picture_at_a_coarser_scale(detector, defective):
    x = detector.preprocess(defective)
    gaussian = feature_gaussian(detector)

    def energy(image):
        with torch.no_grad():
            return float(gaussian.energy(detector.backbone(image[None]))[0])

    def roughness(direction):  # neighbouring-pixel differences against the direction's own size
        return float((direction[:, :, 1:] - direction[:, :, :-1]).abs().mean() / direction.abs().mean())

    raw, smooth = (descent_direction(detector, gaussian, x, square_layout(detector.resolution), sigma) for sigma in (0.0, 2.0))
    assert all(0.5 < float(d.std()) <= 1.0 + 1e-4 and d.abs().max() <= 3.0 for d in (raw, smooth))  # unit std, clipped
    assert roughness(smooth) < 0.5 * roughness(raw)
    for direction in (raw, smooth):
        assert energy(x - 0.01 * direction) < energy(x)


def test_frames_are_deterministic_and_exportable(detector, defective, tmp_path):
    config = MorphConfig(denoise_every=2, max_loops=3, stop_at="never", seed=3)
    frames = list(morph(detector, defective, config))
    again = list(morph(detector, defective, config))
    assert [f.gradient_steps for f in frames] == [0, 2, 4, 6] and [f.loop for f in frames] == [0, 1, 2, 3]
    for a, b in zip(frames, again):
        assert torch.equal(a.image, b.image) and a.score == b.score
    assert not torch.equal(frames[0].image, frames[-1].image)
    pictures = [f.rgb() for f in frames]
    gif = export_gif(pictures, tmp_path / "m.gif")
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.n_frames >= len(frames)
    mp4 = export_mp4(pictures, tmp_path / "m.mp4")
    assert len(imageio.mimread(str(mp4), memtest=False)) >= len(frames)
    pair = before_after(pictures[0], pictures[-1])
    assert pair.shape == (32, 68, 3)


@pytest.mark.parametrize(
    "config, message",
    [
        (MorphConfig(step_size=1.0), "step size"),
        (MorphConfig(step_size=-0.1), "step size"),
        (MorphConfig(denoise_every=-1), "denoise_every"),
        (MorphConfig(max_loops=-5), "max_loops"),
        (MorphConfig(max_loops=10**9), "max_loops"),
        (MorphConfig(timestep=5000), "timestep"),
        (MorphConfig(focus=-1.0), "focus"),
        (MorphConfig(focus=float("nan")), "focus"),
        (MorphConfig(gradient_smoothing=-1.0), "gradient_smoothing"),
        (MorphConfig(stop_at="normal"), "stop_at"),
        (MorphConfig(stop_quantile=1.5), "stop_quantile"),
    ],
)
def test_bad_parameters_are_rejected(detector, defective, config, message):
    with pytest.raises(ValueError, match=message):
        next(morph(detector, defective, config))


def test_the_morph_stops_at_the_first_frame_that_scores_like_a_typical_normal_part(detector, defective):
    import dataclasses

    frames = list(morph(detector, defective, MorphConfig(denoise_every=2, max_loops=4, stop_at="never", seed=3)))
    scores = [f.score for f in frames]
    assert scores[-1] < scores[0]
    # Normal images' median halfway down the morph's path, their threshold above its start.
    median = (scores[0] + min(scores)) / 2
    calibrated = dataclasses.replace(detector.calibration, normal_scores=[median - 1, median, median + 1],
                                     image_threshold=scores[0] + 1)
    shifted = copy.copy(detector)
    shifted.calibration = calibrated
    for rule, expected in (("typical", next(i for i, s in enumerate(scores) if s <= median)), ("threshold", 0)):
        stopped = list(morph(shifted, defective, MorphConfig(denoise_every=2, max_loops=4, stop_at=rule, seed=3)))
        assert len(stopped) == expected + 1 and [f.score for f in stopped] == scores[: expected + 1]
        assert stopped[-1].is_normal and stopped[-1].is_typical == (rule == "typical")
        assert stopped[-1].reached_stop and not any(f.reached_stop for f in stopped[:-1])
    assert np.median(calibrated.normal_scores) == median
    # A lower quantile of the normal scores goes on past a typical part's score, to the first frame at or under it.
    lowest = min(scores)
    shifted.calibration = dataclasses.replace(calibrated, normal_scores=[lowest, median, median + 1])
    config = MorphConfig(denoise_every=2, max_loops=4, stop_quantile=0.0, seed=3)
    goal = MorphGoal.of(shifted, config)
    assert (goal.stop, goal.typical, goal.stop_quantile) == (lowest, median, 0.0) and goal.past_typical
    assert not MorphGoal.of(shifted, MorphConfig()).past_typical
    deeper = list(morph(shifted, defective, config))
    assert [f.score for f in deeper] == scores[: scores.index(lowest) + 1]
    assert sum(f.is_typical for f in deeper) > 1 and deeper[-1].reached_stop


def test_focus_leaves_pixels_the_model_finds_normal_untouched(detector, tiny_dataset):
    image = sorted((tiny_dataset / "test" / "good").iterdir())[0]  # the tiny model flags every pixel of its defects
    first, second = list(morph(detector, image, MorphConfig(max_loops=1, focus=1.0, stop_at="never")))
    untouched = focus_weight(detector, first.anomaly_map, 1.0)[0] == 0
    change = (second.image - first.image).abs().sum(dim=0)
    assert untouched.any() and (~untouched).any()
    assert change[untouched].max() == 0 and change[~untouched].max() > 0


def test_gaussian_fitted_on_noisy_copies_does_not_mistake_noise_for_defects(detector, tiny_dataset):
    from diffad.data import list_images, load_images

    images, _, _ = load_images(list_images(tiny_dataset / "train" / "good"), detector.resolution)
    features = detector.backbone(images)
    clean_only = FeatureGaussian.fit(features, dims=32)
    with_noise = fit_feature_gaussian(detector.backbone, images, features, dims=32)
    assert torch.equal(clean_only.dims, with_noise.dims)
    noisy = (images + 0.02 * torch.randn(images.shape, generator=torch.Generator().manual_seed(5))).clamp(-1, 1)

    def noise_penalty(gaussian):
        return float(gaussian.energy(detector.backbone(noisy)).mean() / gaussian.energy(features).mean())

    assert noise_penalty(with_noise) < noise_penalty(clean_only) / 2


@needs_bottle
def test_morph_lowers_energy_and_score_on_the_shipped_checkpoint(bottle_detector):
    frames = list(morph(bottle_detector, BOTTLE / "test" / "broken_large" / "000.png", MorphConfig(max_loops=3, stop_at="never")))
    energies, scores = [f.energy for f in frames], [f.score for f in frames]
    assert energies == sorted(energies, reverse=True) and energies[-1] < 0.5 * energies[0]
    assert scores == sorted(scores, reverse=True) and scores[-1] < scores[0] - 10.0


def test_a_morph_that_stops_lowering_the_score_stops_after_patience_loops(detector, tiny_dataset):
    import dataclasses

    # The paper's morph on this spot overshoots: the score is lowest after loop 1 and never lower again.
    spot = tiny_dataset / "test" / "colour_spot" / "000.png"
    paper = dict(denoise_every=2, max_loops=6, seed=3, focus=0.0, gradient_smoothing=0.0)
    scores = [f.score for f in morph(detector, spot, MorphConfig(stop_at="never", **paper))]
    best = 1 + int(np.argmin(scores[1:]))
    assert min(scores[1:]) < scores[0] and best + 3 < len(scores) and all(s > scores[best] for s in scores[best + 1:])
    never_typical = copy.copy(detector)
    never_typical.calibration = dataclasses.replace(detector.calibration, normal_scores=[-1.0] * 3)
    stopped = list(morph(never_typical, spot, MorphConfig(stop_at="typical", patience=3, **paper)))
    # Every loop streamed up to the third without a new lowest score, then the result: the lowest-scoring frame again.
    assert [f.score for f in stopped[:-1]] == scores[: best + 4]
    assert stopped[-1].stalled and not any(f.stalled for f in stopped[:-1])
    assert [f.lowest_score for f in stopped[:-1]] == [min(scores[: i + 1]) for i in range(len(stopped) - 1)]
    result = stopped[-1]
    assert (result.loop, result.score, result.lowest_loop) == (best, scores[best], best)
    assert torch.equal(result.image, stopped[best].image)
    assert len(list(morph(never_typical, spot, MorphConfig(stop_at="typical", patience=0, **paper)))) == len(scores)


def test_a_category_fixes_its_morph_settings_through_calibrate_and_every_morph_follows_them(tiny_checkpoint, tiny_dataset,
                                                                                             defective, tmp_path, capsys):
    import json

    from diffad.cli import main
    from diffad.hub import training_command
    from tests.conftest import copy_of

    folder = copy_of(tiny_checkpoint, tmp_path)
    before = (folder / "config.json").read_text()
    for bad, named in (('{"gradient_smoothing": -1}', "gradient_smoothing"), ('{"smoothing": 0}', "'smoothing'")):
        assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--morph", bad]) == 2
        assert named in capsys.readouterr().err
        assert (folder / "config.json").read_text() == before  # refused before anything was measured
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--smoothing", "0",
                 "--morph", '{"gradient_smoothing": 0}']) == 0
    detector = load_checkpoint(folder)
    assert detector.morph_defaults == {"gradient_smoothing": 0}
    chosen = MorphConfig.for_detector(detector, max_loops=1, stop_at="never")
    assert chosen.gradient_smoothing == 0 and chosen.focus == MorphConfig.focus and chosen.max_loops == 1
    # A morph asked for without settings is the category's, not the library default's.
    implicit = list(morph(detector, defective))
    unsmoothed, smoothed = (list(morph(detector, defective, MorphConfig(max_loops=1, **kw)))
                            for kw in ({"gradient_smoothing": 0}, {}))
    assert torch.equal(implicit[1].image, unsmoothed[1].image) and not torch.equal(implicit[1].image, smoothed[1].image)
    # A later calibration keeps them, and the Hub card's recipe repeats them.
    assert main(["calibrate", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--smoothing", "0"]) == 0
    assert load_checkpoint(folder).morph_defaults == {"gradient_smoothing": 0}
    assert """--morph '{"gradient_smoothing": 0}'""" in training_command(json.loads((folder / "config.json").read_text()))


def test_the_morph_benchmark_measures_how_much_of_a_defects_contrast_is_gone():
    from benchmarks.morph_quality import contrast_removed

    before = np.full((64, 64, 3), 150, np.uint8)
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    before[mask] = 50  # a dark blowhole
    halfway, gone, darker = before.copy(), before.copy(), before.copy()
    halfway[mask], gone[mask], darker[mask] = 100, 150, 0
    textured = before.copy()
    textured[::2, ::2] += 10  # texture everywhere: the defect stands out as much as before
    assert contrast_removed(before, before, mask) == 0.0
    assert contrast_removed(before, halfway, mask) == pytest.approx(0.5)
    assert contrast_removed(before, gone, mask) == 1.0
    assert contrast_removed(before, darker, mask) == pytest.approx(-0.5)
    assert abs(contrast_removed(before, textured, mask)) < 0.05


def test_the_morph_benchmark_tells_whether_the_judge_still_flags_the_defect_or_elsewhere():
    from benchmarks.morph_quality import RING_PX, peak_at_defect

    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:30] = True
    judge_map = np.zeros((64, 64))
    judge_map[25, 25] = 1.0
    assert peak_at_defect(judge_map, mask)
    judge_map[25, 30 + RING_PX - 1] = 2.0  # in the ring around the defect
    assert peak_at_defect(judge_map, mask)
    judge_map[60, 60] = 3.0  # far from it
    assert not peak_at_defect(judge_map, mask)


def test_the_morph_benchmark_says_how_many_reached_a_stop_below_a_typical_score():
    from benchmarks.morph_quality import stop_reached

    line = stop_reached({"stop_at": "typical", "stop_quantile": 0.1, "reached_stop_fraction": 11 / 12})
    assert "at or under the 0.1 quantile of the held-out normal images' scores, where the morph stops, for **92%**" in line
    assert stop_reached({"stop_at": "typical", "stop_quantile": 0.5, "reached_stop_fraction": 1.0}) == ""
    assert stop_reached({"stop_at": "never", "stop_quantile": 0.1, "reached_stop_fraction": 0.0}) == ""


def test_the_morph_command_writes_the_morph_with_the_categorys_settings_unless_told_otherwise(tiny_checkpoint, defective,
                                                                                            tmp_path, capsys):
    import json

    from diffad.cli import main
    from tests.conftest import copy_of

    folder = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["morph"] = {"gradient_smoothing": 0, "timestep": 40}
    (folder / "config.json").write_text(json.dumps(config))

    def after_image(*options) -> np.ndarray:
        out = tmp_path / "_".join(options or ("category",))
        assert main(["morph", "--checkpoint", str(folder), str(defective), "--out", str(out), "--loops", "1",
                     "--stop-at", "never", *options]) == 0
        stem = defective.stem
        assert (out / f"{stem}_morph.gif").stat().st_size > 0 and (out / f"{stem}_morph.mp4").stat().st_size > 0
        pair = np.asarray(Image.open(out / f"{stem}_before_after.png"))
        return pair[:, -pair.shape[0]:]

    category = after_image()
    assert "step   5" in capsys.readouterr().out
    library = list(morph(load_checkpoint(folder), defective, MorphConfig(gradient_smoothing=0, timestep=40, max_loops=1,
                                                                         stop_at="never")))
    assert np.array_equal(category, library[-1].rgb())
    assert np.array_equal(after_image("--timestep", "40", "--gradient-smoothing", "0"), category)
    assert not np.array_equal(after_image("--timestep", "5"), category)
    assert not np.array_equal(after_image("--gradient-smoothing", "4"), category)
    capsys.readouterr()
    assert main(["morph", "--checkpoint", str(folder), str(defective), "--out", str(tmp_path / "bad"),
                 "--stop-quantile", "1.5"]) == 2
    assert "stop_quantile must be between 0 and 1, got 1.5" in capsys.readouterr().err
