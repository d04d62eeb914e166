"""The project's own example images: normal images sampled from a category's diffusion model, plus synthetic
defects on them with exact masks and a manifest. No dataset image is copied.

Sampling starts from the *mean* of the training images (a blur of many parts, not any one of them) noised to
t_start, then runs the model's reverse process with diffusers' DDIMScheduler (deterministic after the noising,
which gives cleaner images than ancestral sampling in few steps). The briefly trained models leave grain in their
samples that they themselves flag, so each sample is then morphed (`diffad.morph`, which only touches the pixels the
model flags) until the model scores it normal: otherwise the "normal" examples would light up in the app.
Pixels that every training image shows alike (bottle: the saturated white background) keep that value: the model
cannot reach the clip boundary and leaves them grey and grainy, which it then flags itself.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import list_images, load_images, train_folder
from .detector import AnomalyDetector
from .morph import MorphConfig, morph
from .synth import add_defect

DEFAULT_DEFECTS = ("scratch", "hole", "stain", "crack", "particle", "colour_spot")
POLISH_LOOPS = 16
# A pixel whose value ranges over less than this (images in [-1, 1], any channel) across all training images is
# background that is the same in every one (a studio backdrop, like bottle's white; textures have none).
CONSTANT_RANGE = 0.02


def constant_pixels(images: torch.Tensor) -> torch.Tensor:
    """(R, R) mask of the pixels that every image of the (N, 3, R, R) stack shows alike."""
    return (images.amax(dim=0) - images.amin(dim=0)).amax(dim=0) < CONSTANT_RANGE


def normal_sample(detector: AnomalyDetector, mean_image, t_start: int, seed: int, polish_loops: int,
                  constant: torch.Tensor | None = None) -> tuple[np.ndarray, dict]:
    """A diffusion sample from the noised mean image, morphed for up to `polish_loops` loops until it scores normal.

    `constant` (R, R) marks pixels that take the mean image's value instead of the sample's.
    """
    sample = detector.reconstruct(mean_image, t_start, steps=25, seed=seed)
    if constant is not None:
        sample = torch.where(constant, mean_image, sample)
    # The scoring seed stays the default one, so that the stop matches the score the app shows for the picture.
    frames = list(morph(detector, sample, MorphConfig.for_detector(detector, max_loops=polish_loops)))
    picture = frames[-1].rgb()
    # The score of the 8-bit picture as saved, which is what `predict` and the app give for the file.
    info = {"source": f"diffusion sample, seed {seed}", "sample_score": round(frames[0].score, 2),
            "polish_loops": frames[-1].loop, "score": round(detector.predict(Image.fromarray(picture)).score, 2)}
    return picture, info


def make_examples(detector: AnomalyDetector, data, out, n_normal: int = 2, defects=DEFAULT_DEFECTS, seed: int = 0,
                  t_start: int = 250, polish_loops: int = POLISH_LOOPS) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, _, _ = load_images(list_images(train_folder(data)), detector.resolution)
    mean_image, constant = images.mean(dim=0), constant_pixels(images)
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

    bases = [normal_sample(detector, mean_image, t_start, seed + i, polish_loops, constant) for i in range(n_normal + len(defects))]
    # The cleanest samples become the normal examples, if the model scores them normal; the defects go on the others.
    bases.sort(key=lambda base: base[1]["score"])
    threshold = detector.calibration.image_threshold
    normal = [base for base in bases[:n_normal] if base[1]["score"] <= threshold]
    for i, (picture, info) in enumerate(normal):
        save(f"normal_{i}.png", picture, "normal", **info)
    for j, kind in enumerate(defects):
        base, info = bases[len(normal) + j]
        picture, mask = add_defect(base, kind, seed=seed + j, size=0.8)
        save(f"{kind}.png", picture, kind, mask, source=info["source"] + f", synthetic {kind}",
             polish_loops=info["polish_loops"], base_score=info["score"])
    manifest = {"category": detector.category, "generator": "diffad.examples.make_examples",
                "constant_background_fraction": round(float(constant.float().mean()), 3), "images": entries}
    if len(normal) < n_normal:
        manifest["no_normal_example"] = (
            f"{len(normal)} of the {len(bases)} diffusion samples scored normal after up to {polish_loops} polishing "
            f"loops (scores {', '.join(format(info['score'], '.2f') for _, info in bases[:n_normal])} against a threshold of "
            f"{threshold:.2f}); a sample the model itself flags would be a normal example in name only")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
