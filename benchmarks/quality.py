"""Quality section: metrics on the test split, per defect type, ablations and same-backbone baselines."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.baselines import PaDiM, PatchCore
from benchmarks.common import fmt, metric_table
from diffad import load_checkpoint
from diffad.calibration import calibrate
from diffad.evaluate import (METRIC_NAMES, ScoredSet, Variant, metrics_for, on_grid, score_test_set, scoring_for_map,
                             validation_split)
from diffad.metrics import evaluate_maps
from diffad.postprocess import top_k_mean
from diffad.scoring import gaussian_blur
from diffad.train import checkpoint_split, split_paths
from diffad.windows import cut, stitch


def ablations(scoring, calibration) -> dict[str, Variant]:
    replace = dataclasses.replace

    def variant(calibration=calibration, **changes) -> Variant:
        return Variant(replace(scoring, **changes), calibration)

    def map_only(kind: str) -> Variant:  # the rows `diffad evaluate --map KIND` reproduces
        return Variant(scoring_for_map(scoring, kind), calibration)

    return {
        "diffad (default: KL + feature, t = 20/200/400)": map_only("combined"),
        "pixel KL only": map_only("kl"),
        "feature only": map_only("feature"),
        "RGB error + feature (RGB baseline)": variant(pixel_kind="rgb"),
        "RGB error only": map_only("rgb"),
        "1 timestep (t = 20)": variant(timesteps=(20,)),
        "2 timesteps (20/200)": variant(timesteps=(20, 200)),
        "5 timesteps (5/20/100/200/400)": variant(timesteps=(5, 20, 100, 200, 400)),
        "default + Gaussian smoothing (sigma 4)": variant(replace(calibration, smoothing_sigma=4.0)),
        "one normal mean per timestep, no map centred per position": variant(centre_by_position=()),
        "every map centred per position (pixel maps too)": variant(centre_by_position=("kl", "rgb", "feature")),
        "every map z-normalised by its own mean and std, per image": variant(normalisation="per_image"),
        "pixel KL only, z-normalised per image (the paper's code)": variant(alpha=1.0, normalisation="per_image"),
    }


# The score of reconstruction-based methods, one reading of the "RGB" score the paper's KL map beats: noise the
# image to t, denoise it all the way back, take the pixel error.
RECONSTRUCTION_T, RECONSTRUCTION_STEPS = 100, 10
RECONSTRUCTION_ROW = (f"RGB error of a full reconstruction (noise to t = {RECONSTRUCTION_T}, {RECONSTRUCTION_STEPS} DDIM steps back: "
                      "classic reconstruction scoring)")


def reconstruction_error_set(detector, holdout_paths: list, reference: ScoredSet) -> ScoredSet:
    """Mean-over-channels |x0 - reconstruction| maps made as the pixel KL is: on the windows the model scores (one for
    a squashed photo), stitched, the pixel maps' smoothing, then z over the held-out normal photos' pixels; the image
    score is the top-k mean of the photo's map, compared with the masks on the R x R grid."""
    def error_map(path) -> np.ndarray:
        photo, layout = detector.model_input(path)
        errors = torch.stack([(detector.reconstruct(w, RECONSTRUCTION_T, RECONSTRUCTION_STEPS) - w).abs().mean(0)
                              for w in cut(photo, layout)])
        return gaussian_blur(stitch(errors, layout)[None], detector.scoring.pixel_smoothing)[0].numpy()

    normal = np.concatenate([error_map(path).ravel() for path in holdout_paths])
    maps = [(error_map(path) - normal.mean()) / normal.std() for path in reference.paths]
    scores = np.array([top_k_mean(m, detector.scoring.top_k) for m in maps])
    grid = np.stack([on_grid(m, detector.resolution) for m in maps])
    return dataclasses.replace(reference, scores=scores, maps=grid.astype(np.float16))


# Feature-residual pooling sizes measured in the full ablation (Calibration.feature_pool), each calibrated anew;
# the checkpoint's own is the default row.
FEATURE_POOLS = ((1,), (3,), (9,), (1, 3, 9))


def pooling_name(pools, stride: int) -> str:
    if pools == (1,):
        return "feature residual not pooled"
    if len(pools) == 1:
        return f"feature residual averaged over {pools[0]}x{pools[0]} cells ({pools[0] * stride} px) before squaring"
    return f"feature residual pooled over {', '.join(f'{k}x{k}' for k in pools)} cells, the calibrated maps averaged"


def recalibrated_sets(checkpoint: Path, holdout: torch.Tensor, root: Path, pools=None, **scoring_changes) -> dict[str, ScoredSet]:
    """The default, feature-only and KL-only scores with other feature pooling or raw-map options, calibrated anew
    on the checkpoint's held-out images (the smoothing kept)."""
    detector = load_checkpoint(checkpoint)
    detector.scoring = dataclasses.replace(detector.scoring, **scoring_changes)
    detector.calibration = calibrate(detector, holdout, timesteps=(), feature_pool=pools,
                                     smoothing_sigma=detector.calibration.smoothing_sigma)
    scoring, calibration = detector.scoring, detector.calibration
    if scoring_changes:
        name = PAPER_OPTION_NAMES[tuple(sorted(scoring_changes))]
        kinds = {name: "combined", f"{name}, pixel KL only": "kl"}
    else:
        name = pooling_name(calibration.feature_pool, detector.backbone.stride)
        kinds = {name: "combined", f"{name}, feature only": "feature"}
    return score_test_set(detector, root, {n: Variant(scoring_for_map(scoring, kind), calibration) for n, kind in kinds.items()})


# The paper's code's scoring details (ScoringConfig), one at a time and together.
PAPER_OPTIONS = ({"kl_jump": 4}, {"clip_x0": True}, {"fresh_noise": True}, {"kl_jump": 4, "clip_x0": True, "fresh_noise": True})
PAPER_OPTION_NAMES = {
    ("kl_jump",): "KL of the respaced step t -> t-4 (250-step chain)",
    ("clip_x0",): "x̂0 clipped in the KL",
    ("fresh_noise",): "fresh noise per timestep",
    ("clip_x0", "fresh_noise", "kl_jump"): "all three of the paper code's scoring details",
}


def baseline_sets(train_images: torch.Tensor, test: torch.Tensor, backbone, reference: ScoredSet) -> tuple[dict[str, dict], dict[str, ScoredSet]]:
    results, sets = {}, {}
    for name, model in (("PaDiM (same backbone)", PaDiM(backbone)), ("PatchCore 10% (same backbone)", PatchCore(backbone))):
        start = time.time()
        model.fit(train_images)
        scores, maps = [], []
        for i in range(0, len(test), 16):
            s, m = model.predict(test[i : i + 16])
            scores.append(s)
            maps.append(m.astype(np.float16))
        seconds = time.time() - start
        sets[name] = dataclasses.replace(reference, scores=np.concatenate(scores), maps=np.concatenate(maps))
        metrics = metrics_for(sets[name])
        results[name] = {**metrics.pop("overall"), "seconds_fit_and_test": round(seconds, 1), "per_defect": metrics}
    return results, sets


def evaluation_split_metrics(sets: dict[str, ScoredSet]) -> dict:
    """Every method on the test images outside select_on_validation.py's validation split (the same images for all)."""
    keep = ~validation_split(next(iter(sets.values())).defects)
    return {"images": int(keep.sum()),
            **{name: evaluate_maps(s.labels[keep], s.scores[keep], s.masks[keep], s.maps[keep]) for name, s in sets.items()}}


def measure(detector, checkpoint: Path, root: Path, ablation: str = "full") -> dict:
    """Metrics, ablation, baselines and the evaluation split of one category; also returns the default ScoredSet."""
    chosen = ablations(detector.scoring, detector.calibration)
    if ablation in ("core", "paper"):
        chosen = dict(list(chosen.items())[:5])
    print(f"[{detector.category}] scoring the test split with {len(chosen)} variants")
    variants = score_test_set(detector, root, chosen)
    default = next(iter(variants.values()))
    t = detector.training
    r = {
        "training": f"{t.get('steps_done')} steps, batch {t.get('batch_size')}, {t.get('seconds', 0) / 60:.0f} min on {t.get('device')} "
                    f"({t.get('train_images')} training + {t.get('holdout_images')} held-out images)",
        "metrics": metrics_for(default),
        "feature_pool": list(detector.calibration.feature_pool),
        "pixel_smoothing": detector.scoring.pixel_smoothing,
        "ablation": {name: evaluate_maps(s.labels, s.scores, s.masks, s.maps) for name, s in variants.items()},
        # Always present, so that a core re-run replaces an earlier full run's pooled rows (another checkpoint's).
        "pooled": {},
    }
    train_images, holdout = checkpoint_split(detector, root)
    test = torch.stack([detector.preprocess(p) for p in default.paths])
    if ablation == "full":
        print(f"[{detector.category}] reconstruction-error ablation")
        s = reconstruction_error_set(detector, split_paths(detector, root)[1], default)
        r["ablation"][RECONSTRUCTION_ROW] = evaluate_maps(s.labels, s.scores, s.masks, s.maps)
        for pools in FEATURE_POOLS:
            if pools == detector.calibration.feature_pool:
                continue
            print(f"[{detector.category}] feature residual pooled over {pools}")
            for name, s in recalibrated_sets(checkpoint, holdout, root, pools).items():
                r.setdefault("pooled", {})[name] = metrics_for(s)
                r["ablation"][name] = r["pooled"][name]["overall"]
    if ablation in ("full", "paper"):
        for options in PAPER_OPTIONS:
            print(f"[{detector.category}] scoring options {options}")
            for name, s in recalibrated_sets(checkpoint, holdout, root, **options).items():
                r["ablation"][name] = evaluate_maps(s.labels, s.scores, s.masks, s.maps)
    print(f"[{detector.category}] baselines")
    r["baselines"], baselines = baseline_sets(train_images, test, detector.backbone, default)
    r["evaluation_split"] = evaluation_split_metrics({"diffad": default, **baselines})
    return r


def render(r: dict) -> list[str]:
    out = ["### Quality against baselines (whole test split)", ""]
    out += metric_table({"diffad": r["metrics"]["overall"], **r["baselines"]}, METRIC_NAMES)
    if r.get("evaluation_split"):
        e = r["evaluation_split"]
        pools = ",".join(map(str, r.get("feature_pool", [1])))
        out += ["", f"### The same on the {e['images']} test images outside the validation split", "",
                f"The checkpoint's feature pooling ({pools}) and pixel-map smoothing (sigma {r.get('pixel_smoothing', 0.0):g}) "
                "were chosen on the other fifth of the test images (`benchmarks/select_on_validation.py`, "
                "[feature_pool_selection.json](feature_pool_selection.json), "
                "[pixel_smoothing_selection.json](pixel_smoothing_selection.json)); these images never took part in "
                "those choices.", ""]
        out += metric_table({name: m for name, m in e.items() if name != "images"}, METRIC_NAMES)
    out += ["", "### Per defect type (diffad)", "", "| subset | " + " | ".join(METRIC_NAMES) + " | images |",
            "|---" * (len(METRIC_NAMES) + 2) + "|"]
    for subset, m in r["metrics"].items():
        out.append(f"| {subset} | " + " | ".join(fmt(m[k]) for k in METRIC_NAMES) + f" | {m['images']} |")
    out += per_defect_comparison(r)
    out += ["", "### Ablation", "", "| variant | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
    return out + metric_table(r["ablation"], METRIC_NAMES)[2:]


def per_defect_comparison(r: dict) -> list[str]:
    """Pixel AUROC / AUPRO of diffad and each baseline, per defect type (each type together with the good images)."""
    columns = {"diffad": r["metrics"], **{name: {"overall": m, **m["per_defect"]} for name, m in r["baselines"].items()}}
    out = ["", "### Per defect type against the baselines (pixel AUROC / AUPRO)", ""] + per_defect_table(r["metrics"], columns)
    if r.get("pooled"):
        out += ["", "### Per defect type with the feature residual pooled (ablation; pixel AUROC / AUPRO)", ""]
        out += per_defect_table(r["metrics"], {"diffad (default)": r["metrics"], **r["pooled"]})
    return out


def per_defect_table(subsets, columns: dict) -> list[str]:
    out = ["| subset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for subset in subsets:
        cells = [metrics[subset] for metrics in columns.values()]
        out.append(f"| {subset} | " + " | ".join(f"{fmt(c['pixel_auroc'])} / {fmt(c['aupro'])}" for c in cells) + " |")
    return out


