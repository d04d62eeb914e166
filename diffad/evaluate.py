"""Evaluating a detector on an MVTec-layout test split: overall and per-defect metrics, optional overlays."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .data import DataError, load_mask, read_image, list_test_samples, to_tensor, to_uint8
from .calibration import Calibration
from .detector import AnomalyDetector
from .metrics import evaluate_maps
from .postprocess import combine, normalise
from .scoring import ScoringConfig
from .windows import cut, per_photo, photo_input
from .visualize import anomaly_picture

log = logging.getLogger(__name__)
METRIC_NAMES = ("image_auroc", "pixel_auroc", "aupro", "image_f1_max", "pixel_f1_max")


class Variant(NamedTuple):
    """One way of scoring the same raw maps (an ablation, a pooling choice)."""

    scoring: ScoringConfig
    calibration: Calibration


@dataclass
class ScoredSet:
    """Scores and maps of one scoring variant on a test split."""

    defects: list[str]
    labels: np.ndarray
    scores: np.ndarray
    maps: np.ndarray  # (N, R, R) float16
    masks: np.ndarray  # (N, R, R) bool
    paths: list[Path]


def score_test_set(detector: AnomalyDetector, root, variants: dict[str, Variant] | None = None,
                   batch_size: int = 8, progress: bool = True, limit: int | None = None,
                   subset: np.ndarray | None = None) -> dict[str, ScoredSet]:
    """Score every test image once at the union of the variants' timesteps and combine per variant. `subset`: a
    boolean mask over the split's images (e.g. `validation_split`) to score only those."""
    variants = variants or {"default": Variant(detector.scoring, detector.calibration)}
    samples = list_test_samples(root)
    if subset is not None:
        samples = [s for s, keep in zip(samples, subset) if keep]
    samples = samples[:limit] if limit else samples
    # Variants whose raw maps agree (same noise and KL options) share one model pass over the union of their needs.
    groups: dict[tuple, list[str]] = {}
    for name, variant in variants.items():
        groups.setdefault(variant.scoring.raw_options, []).append(name)
    res = detector.resolution
    maps = {name: [] for name in variants}
    scores = {name: [] for name in variants}
    masks, kept, skipped = [], [], 0
    for start in tqdm(range(0, len(samples), batch_size), disable=not progress, desc="evaluate", unit="batch"):
        photos, batch_masks = [], []
        for sample in samples[start : start + batch_size]:
            try:
                photo = read_image(sample.path)
                batch_masks.append(load_mask(sample.mask_path, photo.size, res))
                photos.append(photo)
                kept.append(sample)
            except DataError as exc:
                skipped += 1
                log.warning("skipped %s", exc)
        if not photos:
            continue
        masks += batch_masks
        for names in groups.values():
            timesteps = sorted({t for n in names for t in variants[n].scoring.timesteps})
            pools = sorted({k for n in names for k in variants[n].calibration.feature_pool})
            inputs = [photo_input(photo, res, variants[names[0]].scoring.aspect) for photo in photos]
            layouts = [layout for _, layout in inputs]
            raw = detector.raw_maps(torch.cat([cut(x, layout) for x, layout in inputs]), timesteps, pools,
                                    keep_images=False, batch_size=batch_size, scoring=variants[names[0]].scoring)
            for name in names:
                scoring, calibration = variants[name]
                for amap, score in per_photo(combine(normalise(raw, calibration, scoring), calibration, scoring),
                                             layouts, scoring.top_k):
                    maps[name].append(on_grid(amap, res).astype(np.float16))
                    scores[name].append(score)
    if not kept:
        raise DataError(f"no readable test images under {root}")
    if skipped:
        log.warning("%d unreadable test files skipped", skipped)
    labels = np.array([s.is_anomalous for s in kept])
    return {
        name: ScoredSet([s.defect for s in kept], labels, np.array(scores[name]), np.stack(maps[name]), np.stack(masks), [s.path for s in kept])
        for name in variants
    }


def on_grid(amap: np.ndarray, resolution: int) -> np.ndarray:
    """A map at the R x R grid the masks are compared on (a photo scored at its own aspect is squashed to it)."""
    if amap.shape == (resolution, resolution):
        return amap
    return np.asarray(Image.fromarray(amap.astype(np.float32)).resize((resolution, resolution), Image.BILINEAR))


def validation_split(defects, fraction: float = 0.2, seed: int = 0) -> np.ndarray:
    """Boolean mask of the validation images: a seeded `fraction` of every defect type and of the good images."""
    defects = np.asarray(defects)
    chosen = np.zeros(len(defects), bool)
    rng = np.random.default_rng(seed)
    for defect in sorted(set(defects)):
        members = np.flatnonzero(defects == defect)
        chosen[rng.choice(members, max(1, round(fraction * len(members))), replace=False)] = True
    return chosen


def validation_of(root) -> np.ndarray:
    """The validation fifth of a category's test split (`validation_split`), in `list_test_samples` order."""
    return validation_split([sample.defect for sample in list_test_samples(root)])


def metrics_for(scored: ScoredSet) -> dict:
    """Overall metrics plus, per defect type, the metrics on that type together with the good images."""
    result = {"overall": evaluate_maps(scored.labels, scored.scores, scored.masks, scored.maps)}
    defects = np.array(scored.defects)
    for defect in sorted(set(scored.defects) - {"good"}):
        keep = (defects == defect) | (defects == "good")
        result[defect] = evaluate_maps(scored.labels[keep], scored.scores[keep], scored.masks[keep], scored.maps[keep])
    return result


def markdown_table(metrics: dict, title: str = "") -> str:
    lines = [f"### {title}", ""] if title else []
    lines.append("| subset | " + " | ".join(METRIC_NAMES) + " | images |")
    lines.append("|---" * (len(METRIC_NAMES) + 2) + "|")
    for subset, values in metrics.items():
        cells = " | ".join("n/a" if np.isnan(values[m]) else f"{values[m]:.3f}" for m in METRIC_NAMES)
        lines.append(f"| {subset} | {cells} | {values['images']} |")
    point = metrics.get("overall", {}).get("operating_point")
    if point:
        lines += ["", f"At the checkpoint's verdict threshold ({point['threshold']:.2f}): recall {point['recall']:.3f} "
                      f"(defective images flagged), false-positive rate {point['false_positive_rate']:.3f} (good images flagged)."]
    return "\n".join(lines) + "\n"


def save_overlays(detector: AnomalyDetector, scored: ScoredSet, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path, defect, amap, mask in zip(scored.paths, scored.defects, scored.maps, scored.masks):
        image = to_uint8(to_tensor(read_image(path), detector.resolution))
        picture = anomaly_picture(image, amap.astype(np.float32), detector.calibration.mask_threshold, known_mask=mask)
        Image.fromarray(picture).save(folder / f"{defect}_{path.stem}.png")


# Which maps make the anomaly map: the method's combination, or one of its parts alone (the ablation rows).
MAP_KINDS = ("combined", "kl", "feature", "rgb")


def scoring_for_map(scoring: ScoringConfig, kind: str) -> ScoringConfig:
    """The checkpoint's scoring with only `kind`'s maps contributing (z-normalised and summed over timesteps)."""
    if kind == "combined":
        return scoring
    if kind == "feature":
        return replace(scoring, alpha=0.0)
    if kind in ("kl", "rgb"):
        return replace(scoring, alpha=1.0, pixel_kind=kind)
    raise ValueError(f"unknown map {kind!r} (use one of {', '.join(MAP_KINDS)})")


def operating_point(scored: ScoredSet, threshold: float) -> dict:
    """What the verdict does at `threshold`: defective test images flagged, and good test images flagged."""
    flagged = scored.scores > threshold
    return {"threshold": threshold, "recall": float(flagged[scored.labels].mean()),
            "false_positive_rate": float(flagged[~scored.labels].mean())}


def evaluate(detector: AnomalyDetector, root, out=None, save_maps: bool = False, progress: bool = True,
             map_kind: str = "combined") -> dict:
    """Evaluate on `root/test`; with `out`, write metrics.json, metrics.md and (optionally) overlays there.

    `map_kind` scores with one part of the map only. The checkpoint's verdict threshold belongs to the combined
    score, so only that map reports the operating point (recall and false-positive rate at the threshold)."""
    variant = Variant(scoring_for_map(detector.scoring, map_kind), detector.calibration)
    scored = score_test_set(detector, root, {map_kind: variant}, progress=progress)[map_kind]
    metrics = metrics_for(scored)
    if map_kind == "combined":
        metrics["overall"]["operating_point"] = operating_point(scored, detector.calibration.image_threshold)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (out / "metrics.md").write_text(markdown_table(metrics, f"{detector.category}, {map_kind} map ({Path(root)})"))
        if save_maps:
            save_overlays(detector, scored, out / "maps")
    return metrics
