"""Anomaly-detection metrics: image/pixel AUROC, F1-max and AUPRO (the official MVTec AD definition)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score


def auroc(labels, scores) -> float:
    labels = np.asarray(labels).ravel().astype(bool)
    if labels.all() or not labels.any():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64).ravel()))


def f1_max(labels, scores) -> float:
    labels = np.asarray(labels).ravel().astype(bool)
    if not labels.any():
        return float("nan")
    precision, recall, _ = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    return float(f1.max())


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact per-region-overlap curve: (false-positive rate, PRO, threshold) at every distinct threshold.

    Points run from the highest threshold (+inf: nothing flagged) down, so FPR ascends. A pixel counts as flagged
    when its score is >= the threshold.

    PRO(thr) is the mean over connected ground-truth regions of the fraction of that region above thr; FPR is the
    fraction of normal pixels above thr. Sorting all pixels once gives both as cumulative sums.
    """
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    weights_pro = np.zeros(maps.shape, dtype=np.float64)
    n_regions = 0
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count:
            sizes = np.bincount(labelled.ravel())
            regions.append((i, labelled, sizes))
            n_regions += count
    if n_regions == 0:
        raise ValueError("AUPRO needs at least one defect region")
    for i, labelled, sizes in regions:
        inside = labelled > 0
        weights_pro[i][inside] = 1.0 / sizes[labelled[inside]]
    weights_pro /= n_regions
    normal = ~masks
    weights_fpr = normal / max(int(normal.sum()), 1)
    order = np.argsort(-maps.ravel(), kind="stable")
    sorted_scores = maps.ravel()[order]
    pro = np.cumsum(weights_pro.ravel()[order])
    fpr = np.cumsum(weights_fpr.ravel()[order])
    # Keep the last index of each run of equal scores: a threshold cannot split tied pixels.
    last = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]], np.r_[np.inf, sorted_scores[last]]


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (1.0 is perfect)."""
    fpr, pro, _ = pro_curve(masks, maps)
    cut = np.searchsorted(fpr, fpr_limit, side="right")
    x, y = fpr[:cut], pro[:cut]
    if cut < fpr.size:  # interpolate the curve at exactly fpr_limit
        x0, x1, y0, y1 = fpr[cut - 1], fpr[cut], pro[cut - 1], pro[cut]
        y_end = y0 + (y1 - y0) * (fpr_limit - x0) / max(x1 - x0, 1e-15)
        x, y = np.r_[x, fpr_limit], np.r_[y, y_end]
    return float(min(1.0, np.trapezoid(y, x) / fpr_limit))


def localisation_quality(metrics: dict) -> float:
    """What scoring settings are chosen by (smoothing, feature pooling): pixel AUROC + AUPRO."""
    return metrics["pixel_auroc"] + metrics["aupro"]


def evaluate_maps(image_labels, image_scores, masks, maps) -> dict:
    """All standard metrics for a set of images. `masks`/`maps`: (N, H, W)."""
    masks = np.asarray(masks).astype(bool)
    maps = np.asarray(maps, dtype=np.float32)
    result = {
        "image_auroc": auroc(image_labels, image_scores),
        "image_f1_max": f1_max(image_labels, image_scores),
        "pixel_auroc": auroc(masks, maps),
        "pixel_f1_max": f1_max(masks, maps),
        "aupro": aupro(masks, maps) if masks.any() else float("nan"),
        "images": int(len(image_labels)),
        "anomalous_images": int(np.sum(image_labels)),
    }
    return result
