"""Speed section: scoring latency on a few CPU threads, with and without the app's extra view timesteps."""
from __future__ import annotations

import statistics
import time

import torch


def measure(detector, paths, threads: int, repeats: int = 7) -> dict:
    torch.set_num_threads(threads)
    images = [detector.preprocess(p) for p in paths[:repeats]]
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
            "score_with_12_view_timesteps_s": round(statistics.median(view_times), 3)}


def render(lat: dict) -> list[str]:
    return ["", f"### Speed ({lat['threads']} CPU threads, medians)", "",
            f"- scoring one image (3 timesteps, KL + feature maps): **{lat['score_one_image_s']:.3f} s**",
            f"- the app's analysis (12 timesteps kept for the slider): {lat['score_with_12_view_timesteps_s']:.3f} s"]
