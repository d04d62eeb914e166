"""KL panel section: does the timestep slider's KL panel find real defects, image by image?"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from diffad.calibration import CALIBRATED_TIMESTEPS
from diffad.data import list_test_samples, load_mask, read_image
from diffad.metrics import auroc


def spread_defects(root: Path, n_images: int) -> list:
    """Every k-th defective test image, so that each defect type is represented."""
    defective = [s for s in list_test_samples(root) if s.is_anomalous]
    return defective[:: max(1, len(defective) // max(n_images, 1))][:n_images]


def measure(detector, root: Path, n_images: int) -> dict:
    """Per image, the pixel AUROC of the KL panel (exactly the z-map the app shows) at every slider timestep."""
    rows = []
    for sample in spread_defects(root, n_images):
        mask = load_mask(sample.mask_path, read_image(sample.path).size, detector.resolution)
        prediction = detector.predict(sample.path, view_timesteps=CALIBRATED_TIMESTEPS)
        panel = {step.t: auroc(mask.ravel(), step.kl_z.ravel()) for step in prediction.steps}
        best = max(panel, key=panel.get)
        rows.append({"image": f"{sample.defect}/{sample.path.name}", "best_t": best, "best_auroc": panel[best], "auroc_by_t": panel})
    best = np.array([r["best_auroc"] for r in rows])
    by_t = {t: float(np.median([r["auroc_by_t"][t] for r in rows])) for t in CALIBRATED_TIMESTEPS}
    return {"kl_panel": {"images": len(rows), "at_least_0.9": float(np.mean(best >= 0.9)), "median_best_auroc": float(np.median(best)),
                         "median_auroc_by_t": by_t, "rows": rows}}


def render(d: dict) -> list[str]:
    out = ["", f"### KL panel of the timestep slider, image by image ({d['images']} defective test images)", "",
           f"- pixel AUROC of the KL panel at each image's best timestep: **≥ 0.9 for {d['at_least_0.9']:.0%}** of the images "
           f"(median {d['median_best_auroc']:.3f})", "", "| t | " + " | ".join(str(t) for t in d["median_auroc_by_t"]) + " |",
           "|---" * (len(d["median_auroc_by_t"]) + 1) + "|",
           "| median pixel AUROC | " + " | ".join(f"{v:.2f}" for v in d["median_auroc_by_t"].values()) + " |"]
    return out
