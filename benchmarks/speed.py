"""Speed section: scoring latency on a few CPU threads, with and without the app's extra view timesteps."""
from __future__ import annotations

import statistics
import time

import torch

from diffad.data import read_image


def measure(detector, paths, threads: int, repeats: int = 7) -> dict:
    """Photos decoded once, then scored as the model scores them (squashed, or in windows at their own aspect)."""
    torch.set_num_threads(threads)
    images = [read_image(p) for p in paths[:repeats]]
    detector.predict(images[0])  # warm-up
    score_times, view_times = [], []
    for image in images:
        start = time.perf_counter()
        detector.predict(image)
        score_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.predict(image, view_timesteps=detector.calibration.timesteps)  # what the app computes
        view_times.append(time.perf_counter() - start)
    return {"threads": threads, "score_one_image_s": round(statistics.median(score_times), 3),
            "score_with_12_view_timesteps_s": round(statistics.median(view_times), 3),
            "windows": [detector.model_input(image)[1].count for image in images]}


def render(lat: dict) -> list[str]:
    windows = lat.get("windows", [1])
    at_aspect = f"; photos at their own aspect, {min(windows)}–{max(windows)} windows each" if max(windows) > 1 else ""
    return ["", f"### Speed ({lat['threads']} CPU threads, medians{at_aspect})", "",
            f"- scoring one image (3 timesteps, KL + feature maps): **{lat['score_one_image_s']:.3f} s**",
            f"- the app's analysis (12 timesteps kept for the slider): {lat['score_with_12_view_timesteps_s']:.3f} s"]
