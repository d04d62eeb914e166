"""The project's own example images: normal images sampled from a category's diffusion model, plus synthetic
defects on them with exact masks and a manifest. No dataset image is copied.

Sampling starts from the *mean* of the training images (a blur of many parts, not any one of them) noised to
t_start, then runs the model's reverse process with diffusers' DDIMScheduler (deterministic after the noising,
which gives cleaner images than ancestral sampling in few steps).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .data import list_images, load_images, to_uint8, train_folder
from .detector import AnomalyDetector
from .synth import add_defect

DEFAULT_DEFECTS = ("scratch", "hole", "stain", "crack", "particle", "colour_spot")


def make_examples(detector: AnomalyDetector, data, out, n_normal: int = 2, defects=DEFAULT_DEFECTS, seed: int = 0,
                  t_start: int = 250) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, _, _ = load_images(list_images(train_folder(data)), detector.resolution)
    mean_image = images.mean(dim=0)
    entries = []

    def save(name: str, picture: np.ndarray, kind: str, mask: np.ndarray | None = None, **info):
        Image.fromarray(picture).save(out / name)
        entry = {"file": name, "category": detector.category, "kind": kind, "sha256": hashlib.sha256((out / name).read_bytes()).hexdigest(), **info}
        if mask is not None:  # masks live in a subfolder so that `diffad predict examples/NAME` scores images only
            mask_name = f"masks/{name.replace('.png', '_mask.png')}"
            (out / "masks").mkdir(exist_ok=True)
            Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_name)
            entry["mask"] = mask_name
        entries.append(entry)

    bases = [to_uint8(detector.reconstruct(mean_image, t_start, steps=25, seed=seed + i)) for i in range(n_normal + len(defects))]
    for i in range(n_normal):
        save(f"normal_{i}.png", bases[i], "normal", source=f"diffusion sample, seed {seed + i}")
    for j, kind in enumerate(defects):
        picture, mask = add_defect(bases[n_normal + j], kind, seed=seed + j, size=0.8)
        save(f"{kind}.png", picture, kind, mask, source=f"diffusion sample, seed {seed + n_normal + j}, synthetic {kind}")
    manifest = {"category": detector.category, "generator": "diffad.examples.make_examples", "images": entries}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
