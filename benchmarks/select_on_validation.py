"""Choose a category's feature pooling, pixel-map smoothing, pixel-map weight, combined-map smoothing, the image
score's top-k, the verdict threshold's quantile and the morph's gradient smoothing, denoising timestep and stop on a
validation split of its labelled test images.

    python benchmarks/select_on_validation.py --choose feature_pool pixel_smoothing alpha smoothing top_k threshold_quantile --categories bottle
    python benchmarks/select_on_validation.py --choose morph_smoothing morph_timestep morph_stop --categories magnetic_tile

Run the choices in that order, applying each before the next (each is judged with the ones before it in place).

Synthetic defects cannot make these choices. For pooling, pasted defects are either small and sharp (every
candidate scores ~0.99) or, when a wide faint kind is added, wide enough to make every category prefer coarse
pooling, bottle included, where it blurs the real defects. For the KL map's smoothing, the thin synthetic
scratches favour none while real bottle defects gain from it. So a fixed, seeded fifth of each defect type (and of
the good images) is set aside as a validation split; the candidates are compared on it by pixel AUROC + AUPRO, the
criterion `diffad calibrate` uses for smoothing (top-k, which changes no map, by image AUROC). `benchmarks/run.py` reports every method on the other four
fifths, which the choices never saw. Writes benchmarks/CHOICE_selection.json; apply a choice with
`diffad calibrate --checkpoint checkpoints/NAME --data DIR --feature-pool SIZES` or
`--scoring '{"pixel_smoothing": SIGMA, "alpha": ALPHA, "top_k": K}' --smoothing SIGMA --threshold-quantile Q
--morph '{"gradient_smoothing": SIGMA, "timestep": T, "stop_quantile": Q}'`.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import DATA  # noqa: E402
from diffad import load_checkpoint  # noqa: E402
from diffad.calibration import IMAGE_THRESHOLD_QUANTILE, SMOOTHING_CANDIDATES, calibrate  # noqa: E402
from diffad.evaluate import Variant, score_test_set, scoring_for_map, validation_of  # noqa: E402
from diffad.metrics import evaluate_maps, localisation_quality  # noqa: E402
from diffad.postprocess import top_k_mean  # noqa: E402
from diffad.train import checkpoint_split, split_paths  # noqa: E402

CANDIDATES = ((1,), (3,), (1, 3, 9))


def at_threshold(scored, threshold: float) -> dict:
    """The verdicts of a ScoredSet at a threshold: recall and false-positive rate."""
    flagged = scored.scores > threshold
    return {"threshold": threshold, "recall": float(flagged[scored.labels].mean()),
            "false_positive_rate": float(flagged[~scored.labels].mean())}


def on_validation(detector, root: Path, variants: dict[str, Variant], criterion=localisation_quality,
                  thresholds: dict[str, float] | None = None) -> dict:
    """The candidate variants compared on the validation fifth, and the best by `criterion` (default: localisation
    quality). `thresholds`: each variant's verdict threshold, adding its recall and false-positive rate there."""
    v = validation_of(root)  # the same split run.py excludes
    scored = score_test_set(detector, root, variants, subset=v)
    results = {name: evaluate_maps(s.labels, s.scores, s.masks, s.maps) for name, s in scored.items()}
    for name, threshold in (thresholds or {}).items():
        results[name].update(at_threshold(scored[name], threshold))
    return choice(v, results, criterion)


def choice(validation, candidates: dict[str, dict], criterion) -> dict:
    chosen = max(candidates, key=lambda name: criterion(candidates[name]))
    return {"validation_images": int(validation.sum()), "test_images": int(validation.size), "candidates": candidates,
            "chosen": chosen}


def select_feature_pool(detector, root: Path) -> dict:
    # Calibrated with every candidate size at once, so each candidate is a subset it can combine.
    every_size = tuple(sorted({k for c in CANDIDATES for k in c}))
    calibration = calibrate(detector, checkpoint_split(detector, root)[1], timesteps=detector.scoring.timesteps,
                            feature_pool=every_size, smoothing_sigma=detector.calibration.smoothing_sigma)
    variants = {",".join(map(str, c)): Variant(detector.scoring, calibration.with_feature_pool(c)) for c in CANDIDATES}
    result = on_validation(detector, root, variants)
    return {**result, "chosen": [int(k) for k in result["chosen"].split(",")]}


def select_pixel_smoothing(detector, root: Path) -> dict:
    """Judged on the pixel map alone; each candidate changes the raw maps, so each is calibrated anew."""
    original, holdout = detector.scoring, checkpoint_split(detector, root)[1]
    variants = {}
    for sigma in SMOOTHING_CANDIDATES:
        detector.scoring = replace(original, pixel_smoothing=sigma)
        calibration = calibrate(detector, holdout, timesteps=(), smoothing_sigma=detector.calibration.smoothing_sigma)
        variants[str(sigma)] = Variant(scoring_for_map(detector.scoring, original.pixel_kind), calibration)
    detector.scoring = original
    result = on_validation(detector, root, variants)
    return {**result, "chosen": float(result["chosen"])}


# Weights of the pixel (KL) map against the feature map tried by select_alpha.
ALPHAS = (0.1, 0.25, 0.5)


def select_alpha(detector, root: Path) -> dict:
    """The pixel map's weight in the combined map (raw maps and calibration are shared by every candidate)."""
    variants = {str(a): Variant(replace(detector.scoring, alpha=a), detector.calibration) for a in ALPHAS}
    result = on_validation(detector, root, variants)
    return {**result, "chosen": float(result["chosen"])}


def select_smoothing(detector, root: Path) -> dict:
    """The combined map's smoothing (`diffad calibrate` otherwise chooses it on synthetic defects)."""
    variants = {str(sigma): Variant(detector.scoring, replace(detector.calibration, smoothing_sigma=sigma))
                for sigma in SMOOTHING_CANDIDATES}
    result = on_validation(detector, root, variants)
    return {**result, "chosen": float(result["chosen"])}


# Top-k pixels averaged into the image score, tried by select_top_k (a 256 x 256 map holds 65536: the largest is its
# mean; a photo scored in windows has more pixels).
TOP_KS = (16, 64, 256, 1024, 4096, 8192, 16384, 32768, 65536)


def select_top_k(detector, root: Path) -> dict:
    """How many of the map's highest pixels make the image score: it changes no map. Thin cracks fill few pixels,
    uneven patches many. Judged by the recall at the verdict threshold calibration would set for that k (the same
    quantile of the held-out good photos' scores), then by image AUROC: the verdict is what a user reads, and a k that
    ranks images better can still put the good photos' tail above most defects (magnetic_tile, docs/findings.md)."""
    held_out = [detector.predict(path).anomaly_map for path in split_paths(detector, root)[1]]
    thresholds = {str(k): float(np.quantile([top_k_mean(m, k) for m in held_out], IMAGE_THRESHOLD_QUANTILE))
                  for k in TOP_KS}
    variants = {str(k): Variant(replace(detector.scoring, top_k=k), detector.calibration) for k in TOP_KS}
    result = on_validation(detector, root, variants, criterion=lambda m: (m["recall"], m["image_auroc"]),
                           thresholds=thresholds)
    return {**result, "chosen": int(result["chosen"])}


# Where the verdict threshold may sit among the held-out normal images' scores, tried by select_threshold_quantile,
# and the operating point it must reach: flag at least RECALL of the defective parts and at most FALSE_POSITIVES of
# the good ones (issue 19).
THRESHOLD_QUANTILES = (0.99, 0.98, 0.97, 0.95, 0.9)
RECALL, FALSE_POSITIVES = 0.8, 0.1


def select_threshold_quantile(detector, root: Path) -> dict:
    """The highest quantile (the fewest false alarms) whose verdicts reach the operating point on the validation
    fifth; if none does, the one with the highest recall minus false-positive rate. It changes no map and no score,
    so the validation images are scored and evaluated once."""
    v = validation_of(root)
    scored = score_test_set(detector, root, subset=v)["default"]
    metrics = evaluate_maps(scored.labels, scored.scores, scored.masks, scored.maps)
    candidates = {str(q): {**metrics, **at_threshold(scored, detector.calibration.with_threshold_quantile(q).image_threshold)}
                  for q in THRESHOLD_QUANTILES}

    def criterion(m: dict) -> tuple:
        reached = m["recall"] >= RECALL and m["false_positive_rate"] <= FALSE_POSITIVES
        return (reached, m["threshold"] if reached else m["recall"] - m["false_positive_rate"])

    result = choice(v, candidates, criterion)
    return {**result, "chosen": float(result["chosen"])}


# Sigmas (pixels at the model resolution) of the morph's gradient smoothing tried by select_morph_smoothing.
MORPH_SMOOTHINGS = (0.0, 1.0, 2.0, 4.0)
# Denoising timesteps tried by select_morph_timestep; None matches the noise the gradient steps add (t = 9 at the
# default step size). A larger t asks the denoiser for a normal part from a noisier-looking input, so it repaints
# more of what the gradient marks.
MORPH_TIMESTEPS = (None, 20, 50, 100)
# Quantiles of the held-out normal scores tried as the morph's stop by select_morph_stop: 0.5 is a typical normal part.
MORPH_STOP_QUANTILES = (0.5, 0.25, 0.1)


def select_morph_setting(detector, root: Path, field: str, values, n_images: int = 12) -> dict:
    """One MorphConfig field: the category's morph with each value on the same `n_images` validation defects, judged
    by how many it removes: PatchCore (which the morph never sees) then finds the part normal *and* at least half of
    the defect's contrast with its surroundings is gone; then by the median contrast removed. PatchCore alone shares
    the morph's backbone and passes pixel-scale texture that leaves a tile's blowhole as dark as before."""
    from benchmarks.morph_quality import labelled_test_set, morph_quality, patchcore_judge
    from diffad.morph import MorphConfig

    v = validation_of(root)
    labelled, judge = labelled_test_set(detector, root, subset=v), patchcore_judge(detector, root)
    candidates = {}
    for value in values:
        m = morph_quality(detector, labelled, n_images, torch.get_num_threads(),
                          MorphConfig.for_detector(detector, **{field: value}), judge)
        name = json.dumps(value)
        candidates[name] = {key: measured for key, measured in m.items() if key != "rows"}
        print(f"{detector.category} morph {field} {name}: {morph_line(candidates[name])}", flush=True)
    result = choice(v, candidates, lambda m: (m.get("removed_fraction", 0.0), m.get("median_contrast_removed", 0.0)))
    return {**result, "chosen": json.loads(result["chosen"])}


def select_morph_smoothing(detector, root: Path) -> dict:
    return select_morph_setting(detector, root, "gradient_smoothing", MORPH_SMOOTHINGS)


def select_morph_timestep(detector, root: Path) -> dict:
    return select_morph_setting(detector, root, "timestep", MORPH_TIMESTEPS)


def select_morph_stop(detector, root: Path) -> dict:
    return select_morph_setting(detector, root, "stop_quantile", MORPH_STOP_QUANTILES)


def morph_line(m: dict) -> str:
    if "patchcore_normal_after_fraction" not in m:
        return f"no validation defect needed a morph ({m['images']} tried)"
    return (f"removed {m['removed_fraction']:.0%} (median contrast removed {m['median_contrast_removed']:.0%}), "
            f"PatchCore finds {m['patchcore_normal_after_fraction']:.0%} normal after, typical score reached "
            f"{m['typical_after_fraction']:.0%}, stalled {m['stalled_fraction']:.0%}, PSNR outside the mask {m['median_psnr_outside_mask_db']:.1f} dB, change "
            f"inside {m['median_abs_change_inside_mask']:.1f} grey levels, loops {m['loops_used']}, slowest "
            f"{m['max_total_s']:.1f} s on validation")


SELECTORS = {"feature_pool": select_feature_pool, "pixel_smoothing": select_pixel_smoothing, "alpha": select_alpha,
             "smoothing": select_smoothing, "top_k": select_top_k, "threshold_quantile": select_threshold_quantile,
             "morph_smoothing": select_morph_smoothing, "morph_timestep": select_morph_timestep,
             "morph_stop": select_morph_stop}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--choose", nargs="+", choices=list(SELECTORS), default=list(SELECTORS))
    parser.add_argument("--categories", nargs="+", default=list(DATA))
    parser.add_argument("--checkpoints", default=str(ROOT / "checkpoints"), help="folder of category checkpoints")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for choice in args.choose:
        path = ROOT / "benchmarks" / f"{choice}_selection.json"
        selection = json.loads(path.read_text()) if path.exists() else {}
        for category in args.categories:
            if not DATA[category].is_dir():
                print(f"skipping {category}: data missing at {DATA[category]}")
                continue
            detector = load_checkpoint(Path(args.checkpoints) / category)
            selection[category] = SELECTORS[choice](detector, DATA[category])
            for name, m in selection[category]["candidates"].items():
                if "image_auroc" not in m:  # a morph choice, printed as it was measured
                    continue
                at_threshold = f", recall {m['recall']:.3f} at threshold {m['threshold']:.2f}" if "recall" in m else ""
                print(f"{category} {choice} {name}: image AUROC {m['image_auroc']:.3f}, pixel AUROC {m['pixel_auroc']:.3f}, "
                      f"AUPRO {m['aupro']:.3f}{at_threshold} on validation")
            print(f"{category}: {choice} chosen {selection[category]['chosen']}")
            path.write_text(json.dumps(selection, indent=2) + "\n")


if __name__ == "__main__":
    main()
