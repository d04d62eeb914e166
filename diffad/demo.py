"""The UI-free layer of the web demo: one analysis, what it says (verdict, summary, notes) and its pictures.

app.py only lays these out; everything a user reads about a result is decided here, so the page, the API and the
tests agree. Texts that are expected to change (the timestep explanation, the morph's messages) live in one place each.
"""
from __future__ import annotations

import functools
from collections import Counter

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import DataError, read_image, to_uint8
from .detector import AnomalyDetector
from .postprocess import verdict
from .visualize import anomaly_picture, display_range, heatmap, outline, overlay

MAP_CHOICES = {"Combined": "anomaly", "Pixel KL": "pixel", "Feature error": "feature", "RGB error": "rgb"}
# Per-timestep maps are shown in z units (standard deviations above normal pixels) on this scale.
STEP_Z_RANGE = (0.0, 8.0)
# Pictures are shown with their long side this long (maps are upsampled from the model's resolution).
DISPLAY_SIDE = 512
PANEL_SIDE = 256
# Below this many pixels on a side a photo has less detail than the model's smallest defects.
SMALL_SIDE = 32


@dataclass
class Analysis:
    """Everything one analysis shows; scrubbing and threshold changes only read it."""

    category: str
    image: np.ndarray  # (H, W, 3) uint8 at display size and the photo's own aspect
    maps: dict  # MAP_CHOICES value -> float32 map as the model scored the photo: R x R, or at its aspect (windows)
    score: float
    percentile: float
    image_threshold: float  # the calibrated ones; the sliders may differ
    mask_threshold: float
    photo_size: tuple[int, int]  # (width, height) of the uploaded photo
    steps: list = field(default_factory=list)  # dicts: t, signal, xt, x0_hat, kl, feature (uint8 pictures)
    known_mask: np.ndarray | None = None  # (H, W) bool at display size
    ood_distance: float | None = None
    ood_threshold: float | None = None
    source: str = ""  # "local" or "Hub <repo>": never a server path
    pixel_smoothing: float = 0.0  # of the KL panels, in model-input pixels
    model_input: torch.Tensor | None = None  # the photo as the model saw it (Prediction.image): the later panels are made from it
    seed: int | None = None
    calibrated_timesteps: tuple[int, ...] = ()  # every timestep the panels can show (the slider's range)

    @property
    def complete(self) -> bool:
        """Whether the panels of every calibrated timestep are there (an analysis shows its scored ones first)."""
        return self.model_input is None

    @property
    def timesteps(self) -> list[int]:
        return [s["t"] for s in self.steps]

    @property
    def display_size(self) -> tuple[int, int]:
        return self.image.shape[1], self.image.shape[0]


def known_examples(examples_root) -> dict[str, dict]:
    """sha256 of each example image -> its manifest entry (with the mask path resolved)."""
    found = {}
    for manifest in sorted(Path(examples_root).glob("*/manifest.json")):
        for entry in json.loads(manifest.read_text()).get("images", []):
            entry = dict(entry, path=str(manifest.parent / entry["file"]))
            if entry.get("mask"):
                entry["mask_path"] = str(manifest.parent / entry["mask"])
            if entry.get("sha256"):
                found[entry["sha256"]] = entry
    return found


def example_labels(entries: list[dict]) -> list[str]:
    """"category · kind" for each example, numbered where a category has several of a kind (normal 1, normal 2)."""
    labels = [f"{e['category'].replace('_', ' ')} · {e.get('kind', 'example').replace('_', ' ')}" for e in entries]
    counts, seen = Counter(labels), Counter()
    numbered = []
    for label in labels:
        seen[label] += 1
        numbered.append(f"{label} {seen[label]}" if counts[label] > 1 else label)
    return numbered


def sha256_of(path) -> str:
    """The file's SHA-256, read once per version of the file: a page analysis asks for it several times."""
    stat = Path(path).stat()
    return _sha256_of_version(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=256)
def _sha256_of_version(path: str, _mtime_ns: int, _size: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def display_size(width: int, height: int, side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(width, height) with the long side `side` and the photo's aspect (at least 1 px each)."""
    scale = side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(np.asarray(amap, dtype=np.float32)).resize(size, Image.BILINEAR))


def resize_picture(picture: np.ndarray, size: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
    return np.asarray(Image.fromarray(picture).resize(size, resample))


def _step_views(detector: AnomalyDetector, step_maps, size: tuple[int, int]) -> list[dict]:
    steps = []
    for step in step_maps:
        steps.append({
            "t": step.t,
            "signal": float(detector.diffusion.sqrt_alphas_cumprod[step.t]),
            "xt": resize_picture(to_uint8(step.xt.clamp(-1, 1)), size),
            "x0_hat": resize_picture(to_uint8(step.x0_hat), size),
            # z units as the score uses them (centred and smoothed as in the score).
            "kl": resize_picture(heatmap(step.kl_z, *STEP_Z_RANGE), size),
            # The finest map: pooled ones spread one defect over many pixels and saturate this fixed scale on texture.
            "feature": resize_picture(heatmap(step.feature_z, *STEP_Z_RANGE), size),
        })
    return steps


def analyse(detector: AnomalyDetector, image, known_mask: np.ndarray | None = None, seed: int | None = None,
            ood=None, source: str = "", all_steps: bool = True) -> Analysis:
    """Score a photo (anything read_image reads, or a (3, H, W) tensor in [-1, 1]) and keep what the page shows.
    `ood`: a diffad.ood.FeatureDistance for this category. `all_steps=False`: only the scored timesteps' panels,
    for a verdict in a third of the time; `with_all_steps` adds the others."""
    photo = Image.fromarray(to_uint8(image)) if isinstance(image, torch.Tensor) else read_image(image)
    size = display_size(*photo.size)
    prediction = detector.predict(photo, seed=seed, view_timesteps=detector.calibration.timesteps if all_steps else ())
    if known_mask is not None:
        known_mask = np.asarray(Image.fromarray(known_mask.astype(np.uint8) * 255).resize(size, Image.NEAREST)) > 127
    distance = None
    if ood is not None:
        from .ood import global_features

        # The distance is calibrated on squashed photos, whichever way the category scores them.
        squashed = prediction.image if prediction.image.shape[-1] == prediction.image.shape[-2] else detector.preprocess(photo)
        distance = float(ood.distance(global_features(detector.backbone, squashed[None]))[0])
    return Analysis(
        category=detector.category,
        image=np.asarray(photo.resize(size, Image.BICUBIC)),
        maps={"anomaly": prediction.anomaly_map.astype(np.float32), "pixel": prediction.pixel_map.astype(np.float32),
              "feature": prediction.feature_map.astype(np.float32), "rgb": prediction.rgb_map.astype(np.float32)},
        score=prediction.score,
        percentile=prediction.percentile,
        image_threshold=prediction.image_threshold,
        mask_threshold=prediction.mask_threshold,
        photo_size=photo.size,
        steps=_step_views(detector, prediction.steps, display_size(*photo.size, PANEL_SIDE)),
        known_mask=known_mask,
        ood_distance=distance,
        ood_threshold=None if ood is None else float(ood.threshold),
        source=source,
        pixel_smoothing=detector.scoring.pixel_smoothing,
        model_input=None if all_steps else prediction.image,
        seed=seed,
        calibrated_timesteps=tuple(detector.calibration.timesteps),
    )


def with_steps(detector: AnomalyDetector, analysis: Analysis, timesteps) -> Analysis:
    """The analysis with the panels of these calibrated timesteps added, computed from the same input and noise (so
    each equals what one full analysis shows); complete once every calibrated timestep is there."""
    missing = [t for t in timesteps if t not in analysis.timesteps]
    if analysis.complete or not missing:
        return analysis
    size = display_size(*analysis.photo_size, PANEL_SIDE)
    steps = sorted(analysis.steps + _step_views(detector, detector.steps(analysis.model_input, missing, seed=analysis.seed), size),
                   key=lambda step: step["t"])
    done = {step["t"] for step in steps} >= set(analysis.calibrated_timesteps)
    return replace(analysis, steps=steps, model_input=None if done else analysis.model_input)


def with_all_steps(detector: AnomalyDetector, analysis: Analysis) -> Analysis:
    """The analysis with the panels of every calibrated timestep."""
    return with_steps(detector, analysis, analysis.calibrated_timesteps)


def with_step_near(detector: AnomalyDetector, analysis: Analysis, t: float) -> Analysis:
    """The analysis with the panels of the calibrated timestep nearest to t (what the slider then shows)."""
    return with_steps(detector, analysis, [min(analysis.calibrated_timesteps, key=lambda s: (abs(s - float(t)), s))])


def is_anomalous(analysis: Analysis, image_threshold: float) -> bool:
    """The one verdict: the headline, the text and the JSON all read it."""
    return verdict(analysis.score, image_threshold) == "anomalous"


def flagged_fraction(analysis: Analysis, mask_threshold: float) -> float:
    return float(np.mean(analysis.maps["anomaly"] > mask_threshold))


def slider_ranges(analysis: Analysis) -> dict:
    """(minimum, maximum, calibrated value) of the two threshold sliders. The mask slider spans the colour bar."""
    top_score = max(2 * analysis.image_threshold, analysis.score * 1.2, 1.0)
    return {"mask": (0.0, round(display_range(analysis.mask_threshold)[1], 2), round(analysis.mask_threshold, 2)),
            "image": (0.0, round(top_score, 2), round(analysis.image_threshold, 2))}


def looks_unlike_category(analysis: Analysis) -> bool:
    return analysis.ood_distance is not None and analysis.ood_distance > analysis.ood_threshold


def notes(analysis: Analysis) -> list[str]:
    """Warnings that change how far the verdict can be trusted."""
    found = []
    width, height = analysis.photo_size
    if min(width, height) < SMALL_SIDE:
        found.append(f"This photo is only {width}×{height} px; the model looks at {analysis.maps['anomaly'].shape[1]} px "
                     f"squares, so a photo this small has too little detail for the verdict to mean much.")
    if looks_unlike_category(analysis):
        found.append(f"This does not look like a `{analysis.category}` photo at all (its overall appearance is "
                     f"{analysis.ood_distance / analysis.ood_threshold:.1f}× further from normal `{analysis.category}` "
                     f"images than the cut-off): the verdict says it is unusual, not what is wrong with it. "
                     f"Is the category right?")
    return found


def summary(analysis: Analysis, image_threshold: float, mask_threshold: float) -> dict:
    """The Details JSON: the same verdict as the headline, for the thresholds in use."""
    result = {
        "category": analysis.category, "verdict": "anomalous" if is_anomalous(analysis, image_threshold) else "normal",
        "score": round(analysis.score, 4), "verdict_threshold": round(float(image_threshold), 4),
        "calibrated_verdict_threshold": round(analysis.image_threshold, 4),
        "percentile_of_normal_scores": round(analysis.percentile, 2),
        "mask_threshold": round(float(mask_threshold), 4), "calibrated_mask_threshold": round(analysis.mask_threshold, 4),
        "flagged_area_percent": round(100 * flagged_fraction(analysis, mask_threshold), 2),
        "photo_size": list(analysis.photo_size),
        "looks_like_category": None if analysis.ood_distance is None else not looks_unlike_category(analysis),
        "checkpoint": analysis.source,
    }
    if analysis.ood_distance is not None:
        result["appearance_distance"] = round(analysis.ood_distance, 2)
        result["appearance_cutoff"] = round(analysis.ood_threshold, 2)
    return result


def verdict_markdown(analysis: Analysis, image_threshold: float, mask_threshold: float) -> str:
    anomalous = is_anomalous(analysis, image_threshold)
    icon = "🔴 **Anomalous**" if anomalous else "🟢 **Normal**"
    relation = "above" if anomalous else "at or below"
    calibrated = ("the calibrated one" if np.isclose(image_threshold, analysis.image_threshold, atol=5e-3)
                  else f"calibrated: {analysis.image_threshold:.2f}")
    text = (
        f"### {icon}\n"
        f"Score **{analysis.score:.2f}** is {relation} the verdict threshold **{image_threshold:.2f}** ({calibrated}). "
        f"For reference, {analysis.percentile:.0f}% of held-out normal `{analysis.category}` images score lower.  \n"
        f"Flagged area: {100 * flagged_fraction(analysis, mask_threshold):.2f}% of the image (mask threshold {mask_threshold:.2f})."
    )
    return text + "".join(f"\n\n⚠️ {note}" for note in notes(analysis))


def message_markdown(text: str) -> str:
    """A problem with the input, shown where the verdict goes."""
    return f"### ⚠️ Cannot analyse this\n{text}"


def map_picture(analysis: Analysis, map_label: str, mask_threshold: float) -> np.ndarray:
    """The chosen map over the photo at its own aspect: predicted mask outlined in green, a known defect in white."""
    key = MAP_CHOICES.get(map_label)
    if key is None:
        raise DataError(f"unknown map {map_label!r}; choose from {', '.join(MAP_CHOICES)}")
    amap = resize_map(analysis.maps[key], analysis.display_size)
    if key == "anomaly":
        return anomaly_picture(analysis.image, amap, analysis.mask_threshold, mask_threshold, analysis.known_mask)
    # The other maps have their own units: show them between their median and 99.9th percentile.
    picture = overlay(analysis.image, amap, float(np.median(amap)), float(np.quantile(amap, 0.999)))
    if analysis.known_mask is not None:
        picture = outline(picture, analysis.known_mask, colour=(255, 255, 255))
    return picture


def map_colorbar(analysis: Analysis, map_label: str, mask_threshold: float, width: int) -> np.ndarray:
    """The colour bar of map_picture's colours, with the mask threshold marked on the combined map."""
    key = MAP_CHOICES.get(map_label, "anomaly")
    if key == "anomaly":
        vmin, vmax = display_range(analysis.mask_threshold)
        return colorbar(vmin, vmax, "anomaly, z units (▲ and green outline: mask threshold)", width, marker=mask_threshold)
    amap = analysis.maps[key]
    return colorbar(float(np.median(amap)), float(np.quantile(amap, 0.999)),
                    f"{map_label}: this photo's median to 99.9th percentile", width)


def map_with_colorbar(analysis: Analysis, map_label: str, mask_threshold: float) -> np.ndarray:
    """map_picture with its colour bar underneath, so the two never disagree."""
    picture = map_picture(analysis, map_label, mask_threshold)
    bar = map_colorbar(analysis, map_label, mask_threshold, max(picture.shape[1], 360))
    if bar.shape[1] > picture.shape[1]:  # a tall, narrow photo: centre it over the bar
        pad = bar.shape[1] - picture.shape[1]
        picture = np.pad(picture, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)), constant_values=255)
    return np.concatenate([picture, np.full((6, picture.shape[1], 3), 255, np.uint8), bar])


# The timestep explanation; the KL sentence is expected to be reworded (issue 19): change it here only.
STEP_TEXT = (
    "**t = {t}**: the photo mixed with noise (signal kept: {signal:.0%}) is all the model sees; x̂0 is its estimate of "
    "the clean part. The **KL** panel is the per-pixel KL divergence between the true reverse step (which knows the "
    "photo) and the model's: in effect the squared difference between the photo and x̂0, weighed by the model's "
    "variance{smoothing}. It lights up where x̂0 differs from the photo more than it typically does on normal parts at "
    "this t: a defect the model paints over with normal appearance, or detail it cannot restore at this noise level. "
    "At small t the defect shows "
    "through the noise and x̂0 keeps part of it; at large t x̂0 is closer to a typical normal part, and also blurrier."
)
STEP_SCALE_TEXT = (
    "**(z)**: standard deviations above what normal `{category}` pixels show at this timestep (0 = typical, "
    "{top:g} or more = red). **Feature error**: how far the model's reconstruction of EfficientNet features of the clean "
    "image is from the photo's own features."
)


def nearest_timestep(analysis: Analysis, t: float) -> int:
    if not analysis.steps:
        raise DataError("analyse an image first")
    return min(analysis.timesteps, key=lambda s: (abs(s - float(t)), s))


def step_view(analysis: Analysis, t: float) -> tuple:
    """(x_t, x̂0, KL map, feature map, explanation) at the computed timestep nearest to t."""
    shown = nearest_timestep(analysis, t)
    step = analysis.steps[analysis.timesteps.index(shown)]
    smoothing = (f", averaged over neighbouring pixels (Gaussian σ = {analysis.pixel_smoothing:g} px of the model's "
                 "input), as the score uses it") if analysis.pixel_smoothing else ""
    text = STEP_TEXT.format(t=shown, signal=step["signal"], smoothing=smoothing)
    if shown != round(float(t)):
        text = f"(nearest computed timestep to {float(t):g}) " + text
    text += "\n\n" + STEP_SCALE_TEXT.format(category=analysis.category, top=STEP_Z_RANGE[1])
    return step["xt"], step["x0_hat"], step["kl"], step["feature"], text


# The colour bar's axes as fractions of its picture (matplotlib's subplots_adjust), to place the marker in pixels.
BAR_LEFT, BAR_RIGHT, BAR_BOTTOM, BAR_TOP = 0.04, 0.96, 0.5, 0.95


def colorbar(vmin: float, vmax: float, label: str, width: int = 512, cmap: str = "jet",
             marker: float | None = None) -> np.ndarray:
    """A horizontal colour bar with ticks (none clipped at the ends) and an optional ▲ marker, as an image.

    The bar is drawn once per scale and cached; the marker, which moves with the threshold slider, is painted on a
    copy in pixels, so dragging the slider never waits for matplotlib."""
    picture = _colorbar_base(float(vmin), float(vmax), label, int(width), cmap).copy()
    if marker is not None and vmin <= marker <= vmax:
        height, width = picture.shape[:2]
        x = round(width * (BAR_LEFT + (BAR_RIGHT - BAR_LEFT) * (marker - vmin) / max(vmax - vmin, 1e-12)))
        top, bottom = round(height * (1 - BAR_TOP)), round(height * (1 - BAR_BOTTOM))
        picture[top:bottom, max(x - 1, 0) : x + 1] = 255  # a white line across the bar
        for row in range(6):  # a black ▲ under it, its tip on the bar's lower edge
            picture[bottom + 1 + row, max(x - row, 0) : x + row + 1] = 0
    return picture


@functools.lru_cache(maxsize=64)
def _colorbar_base(vmin: float, vmax: float, label: str, width: int, cmap: str) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width / 100, 0.7), dpi=100)
    ax.imshow(np.linspace(0, 1, 256)[None], aspect="auto", cmap=cmap, extent=(vmin, vmax, 0, 1))
    ax.set_xlim(vmin, vmax)
    ax.set_yticks([])
    ax.set_xlabel(label, fontsize=7)
    ax.tick_params(labelsize=7)
    fig.subplots_adjust(left=BAR_LEFT, right=BAR_RIGHT, bottom=BAR_BOTTOM, top=BAR_TOP)
    fig.canvas.draw()
    picture = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    picture.flags.writeable = False  # shared by every caller through the cache
    return picture


def step_colorbar() -> np.ndarray:
    return colorbar(*STEP_Z_RANGE, "KL and feature error panels: z units over normal pixels at this t", width=512)


# The morph's messages.
def morph_status(frame, goal) -> str:
    """One frame's line: its score against the verdict threshold and a typical normal part's (`goal`, a MorphGoal)."""
    if frame.reached_stop and goal.past_typical:
        reached = f" — scores like the most normal {goal.stop_quantile:.0%} of normal parts ✅"
    elif frame.is_typical:
        reached = " — scores like a typical normal part ✅" + (
            f"; going on to {goal.stop:.2f} (the most normal {goal.stop_quantile:.0%} of normal parts) to clear what is "
            "left of the defect" if goal.past_typical and not frame.stalled else "")
    else:
        reached = " — under the verdict threshold" if frame.is_normal else ""
    return (f"Step {frame.gradient_steps} (loop {frame.loop}): score **{frame.score:.2f}** (verdict threshold "
            f"{goal.threshold:.2f}; a typical normal part scores {goal.typical:.2f}){reached}")


# The app's control for MorphConfig.focus, named in the morph's advice.
FOCUS_LABEL = "Focus on what looks anomalous"

# What the score says and what it does not.
MODEL_TEXTURE = "by this model's score: the repainted region carries the model's own texture, not a photo's"


def stalled_at(frame, patience: int) -> str:
    """A stalled morph's end: `patience` loops after its lowest-scoring frame, it returned to that frame."""
    ran = f"finished after {frame.lowest_loop + patience} loops, stalled: "
    if frame.lowest_loop == 0:
        return ran + f"no loop lowered the score below the photo's own {frame.lowest_score:.2f}, so the morph ends on the photo itself"
    return (ran + f"no loop after loop {frame.lowest_loop} brought the score below {frame.lowest_score:.2f}, so the morph "
            "ends on that loop's frame")


def morph_done(status: str, last_frame, config, goal) -> str:
    """What the morph (`config`, a MorphConfig) reached, and what to try when it ran out of loops."""
    loops, max_loops = last_frame.loop, config.max_loops
    if last_frame.is_typical and goal.past_typical and not last_frame.reached_stop:
        ended = stalled_at(last_frame, config.patience) if last_frame.stalled else f"finished after {loops} loops, at the {max_loops}-loop limit"
        return (status + f" — {ended}. The part scores like a typical normal part, but not yet like the most normal "
                f"{goal.stop_quantile:.0%} ({goal.stop:.2f}) the morph aims for, so faint traces of the defect may remain.")
    if last_frame.is_typical:
        if goal.past_typical:
            return (status + f" — finished after {loops} loops: the part now scores like the most normal "
                    f"{goal.stop_quantile:.0%} of normal parts, past a typical one; the loops after a typical score "
                    f"clear what is left of the defect ({MODEL_TEXTURE}).")
        return status + f" — finished after {loops} loops: the part now scores like a typical normal part ({MODEL_TEXTURE})."
    if last_frame.stalled:
        return (status + f" — {stalled_at(last_frame, config.patience)}. You can try a smaller step size, though it is not sure to help: "
                "a step of 0.01 reached a lower score on 3 of 6 stalled test morphs and a higher one on the other 3.")
    advice = (f"more loops, or a larger step size; for a large defect, set “{FOCUS_LABEL}” to 0 "
              "(every pixel then changes, as in the paper's morph)")
    if last_frame.is_normal:
        return (status + f" — finished at the {max_loops}-loop limit: under the verdict threshold, but still above a "
                f"typical normal part, so traces of the defect may remain. Try {advice}.")
    return status + f" — finished at the {max_loops}-loop limit and the part still scores as anomalous. Try {advice}."


MORPH_STARTED = "Morphing… the first frame is the photo itself."


class MorphCanvas:
    """Morph frames at the photo's own aspect and resolution (long side up to DISPLAY_SIDE).

    The morph works at the model's resolution; only the *change* it makes is upsampled and added to the photo,
    so untouched regions keep the photo's own detail instead of a 256-px copy of it.
    """

    def __init__(self, photo, first_frame: np.ndarray):
        photo = read_image(photo)
        self.size = display_size(*photo.size, min(DISPLAY_SIDE, max(photo.size)))
        self.photo = np.asarray(photo.resize(self.size, Image.BICUBIC), dtype=np.float32)
        self.first = first_frame.astype(np.float32)

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        change = np.stack([resize_map(c, self.size) for c in np.moveaxis(frame.astype(np.float32) - self.first, -1, 0)], -1)
        return np.clip(self.photo + change, 0, 255).round().astype(np.uint8)


# The GIF: a steady frame rate, cross-fades between morph frames, the first and last held so the change reads. A long
# morph gets shorter fades so that the whole GIF stays a few seconds (and a few MB) long.
GIF_FRAME_MS = 80
GIF_FADE_FRAMES = 6
GIF_MAX_FADES = 48
GIF_HOLD_FRAMES = 12


def export_morph_gif(frames: list[np.ndarray], path) -> Path:
    fades = max(1, min(GIF_FADE_FRAMES, GIF_MAX_FADES // max(1, len(frames) - 1)))
    sequence = [frames[0]] * GIF_HOLD_FRAMES
    for a, b in zip(frames, frames[1:]):
        a, b = a.astype(np.float32), b.astype(np.float32)
        sequence += [(a + (b - a) * (i / fades)).round().astype(np.uint8) for i in range(1, fades + 1)]
    sequence += [frames[-1]] * GIF_HOLD_FRAMES
    # One palette for all frames and no dithering: what the morph leaves alone stays identical from frame to frame,
    # so each frame stores only the region that changed.
    palette = Image.fromarray(np.concatenate([frames[0], frames[-1]])).quantize(256)
    images = [Image.fromarray(f).quantize(palette=palette, dither=Image.Dither.NONE) for f in sequence]
    images[0].save(path, save_all=True, append_images=images[1:], duration=GIF_FRAME_MS, loop=0, optimize=True)
    return Path(path)
