"""Morph section: how often and how cleanly the morph turns defective test images normal, and how fast."""
from __future__ import annotations

import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from scipy.ndimage import binary_dilation

from benchmarks.baselines import PatchCore
from diffad.data import list_test_samples, load_mask, read_image, to_uint8
from diffad.evaluate import ScoredSet, validation_of
from diffad.morph import MorphConfig, denoising_timestep, morph
from diffad.train import checkpoint_split
from diffad.visualize import outline


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    mse = float(np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# A defect's surroundings: the ring this many pixels wide (at the model resolution) around its mask.
RING_PX = 8


def defect_contrast(picture: np.ndarray, mask: np.ndarray) -> float:
    """How far the defect stands out: |mean grey level inside the mask - mean in the ring around it|."""
    grey = picture.astype(np.float64).mean(axis=-1)
    ring = binary_dilation(mask, iterations=RING_PX) & ~mask
    return abs(float(grey[mask].mean()) - float(grey[ring].mean())) if mask.any() and ring.any() else float("nan")


def contrast_removed(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """The share of the defect's contrast with its surroundings the morph took away (1: gone, 0: unchanged, < 0:
    stronger): what a person sees, where the judges' scores can fall for texture alone."""
    start = defect_contrast(before, mask)
    return 1.0 - defect_contrast(after, mask) / start if start > 0 else float("nan")


def peak_at_defect(judge_map: np.ndarray, mask: np.ndarray) -> bool:
    """Whether a judge's map peaks on the defect: within the RING_PX-wide ring around its mask, or inside it."""
    y, x = np.unravel_index(np.argmax(judge_map), judge_map.shape)
    return bool(binary_dilation(mask, iterations=RING_PX)[y, x])


# A morph removes a defect when PatchCore then finds the part normal and at least this share of the defect's
# contrast is gone.
REMOVED_CONTRAST = 0.5


# The category's morph (updates weighted by the anomaly map, its gradient smoothing) and the paper's (every pixel, raw
# gradient), for a detector.
MORPH_VARIANTS = {"morph": MorphConfig.for_detector,
                  "morph_paper": lambda detector: MorphConfig(focus=0.0, gradient_smoothing=0.0)}


class Judge(NamedTuple):
    """An independent judge of the morph's result (the morph descends a PaDiM energy, not this): PatchCore on the
    checkpoint's training images, its verdict threshold set as diffad's is, on the checkpoint's held-out images."""

    patchcore: PatchCore
    threshold: float
    holdout: torch.Tensor
    holdout_scores: np.ndarray


def patchcore_judge(detector, root) -> Judge:
    train_images, holdout = checkpoint_split(detector, root)
    patchcore = PatchCore(detector.backbone).fit(train_images)
    scores = patchcore.predict(holdout)[0]
    return Judge(patchcore, float(np.quantile(scores, detector.calibration.threshold_quantile)), holdout, scores)


# Pixel noise that a camera could leave (1.3 grey levels): how sensitive the judge is to texture alone.
JUDGE_NOISE_STD = 0.01


@torch.no_grad()
def judge_ceiling(detector, judge: Judge, config: MorphConfig, seed: int = 0) -> dict:
    """What the judge makes of the checkpoint's held-out normal images as they are, after one pass of the denoiser
    at the morph's timestep (what each morph loop writes where it updates the image), and with faint pixel noise.
    The denoiser pass covers the whole image where a morph changes only part of it: it shows how much of the judge's
    verdict is texture, not a bound on the morph's figure."""
    holdout = judge.holdout
    t = denoising_timestep(detector, config)
    generator = torch.Generator().manual_seed(seed)
    noised = detector.diffusion.q_sample(holdout, t, torch.randn(holdout.shape, generator=generator))
    denoised = torch.cat([detector.net(batch.to(detector.device), torch.full((len(batch),), t, device=detector.device)).x0
                          .clamp(-1, 1).cpu() for batch in noised.split(8)])
    noisy = (holdout + JUDGE_NOISE_STD * torch.randn(holdout.shape, generator=generator)).clamp(-1, 1)
    out = {"images": len(holdout), "timestep": t, "threshold": judge.threshold, "noise_std": JUDGE_NOISE_STD}
    for name, scores in (("as_they_are", judge.holdout_scores), ("denoised", judge.patchcore.predict(denoised)[0]),
                         ("pixel_noise", judge.patchcore.predict(noisy)[0])):
        out[name] = {"normal_fraction": float(np.mean(scores <= judge.threshold)), "median_score": float(np.median(scores))}
    return out


def ceiling_line(c: dict) -> str:
    return (f"- what the judge makes of the {c['images']} held-out normal images: normal as they are "
            f"{c['as_they_are']['normal_fraction']:.0%} (median score {c['as_they_are']['median_score']:.1f}, threshold "
            f"{c['threshold']:.1f}); after one pass of the denoiser at the morph's t = {c['timestep']}, which is what each "
            f"loop writes where it changes the image, **{c['denoised']['normal_fraction']:.0%}** (median "
            f"{c['denoised']['median_score']:.1f}); with pixel noise of std {c['noise_std']:g} ({c['noise_std'] * 127.5:.1f} "
            f"grey levels) {c['pixel_noise']['normal_fraction']:.0%} (median {c['pixel_noise']['median_score']:.1f}). "
            + ("The judge rejects the denoiser's texture when it covers a whole normal part; a morph repaints only the "
               "defect's region, and where the judge's peak lies after it is in the line on the parts it still flags"
               if c["denoised"]["normal_fraction"] < 0.5 else
               "The judge accepts the denoiser's texture on normal parts"))


def grid(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int = 192) -> Image.Image:
    """One row per image: before (known defect outlined in white), after, and the change |after - before| x 3."""
    rows = []
    for before, after, mask in pairs:
        change = np.clip(np.abs(after.astype(int) - before.astype(int)) * 3, 0, 255).astype(np.uint8)
        rows.append(np.concatenate([np.asarray(Image.fromarray(p).resize((size, size))) for p in (outline(before, mask), after, change)], axis=1))
    return Image.fromarray(np.concatenate(rows, axis=0))


def morph_quality(detector, scored: ScoredSet, n_images: int, threads: int, config: MorphConfig,
                  judge: Judge, grid_path: Path | None = None) -> dict:
    """Morph defective test images, spread over the split, until `n_images` of them were flagged by the model.

    Images the model already scores as normal need no morph: they are counted, and left out of the summary.
    """
    patchcore, patchcore_threshold = judge.patchcore, judge.threshold
    pairs = []
    torch.set_num_threads(threads)
    defective = [i for i, label in enumerate(scored.labels) if label]
    spread = defective[:: max(1, len(defective) // max(n_images, 1))]
    rest = sorted(set(defective) - set(spread))
    rows = []
    for i in spread + rest:
        if sum(row["loops"] > 0 for row in rows) >= n_images:
            break
        path, mask = scored.paths[i], scored.masks[i]
        frames, first_frame, total = timed_morph(detector, path, config)
        # Loops run; a stalled morph's result is an earlier frame (`result_loop`), loop 0 when no loop lowered the score.
        row = {"image": f"{scored.defects[i]}/{path.name}", "loops": max(f.loop for f in frames),
               "result_loop": frames[-1].loop, "score_before": frames[0].score}
        rows.append(row)
        if not row["loops"]:
            continue
        # On the square grid of the masks and the judge (a photo morphed at its own aspect is squashed to it).
        first, last = (detector.preprocess(f.image) for f in (frames[0], frames[-1]))
        before, after = to_uint8(first), to_uint8(last)
        recon = to_uint8(detector.reconstruct(detector.preprocess(path), 200, steps=10))
        inside_change = float(np.abs(after[mask].astype(float) - before[mask]).mean()) if mask.any() else float("nan")
        judged_before = patchcore.predict(first[None])[0][0]
        judged_scores, judged_maps = patchcore.predict(last[None])
        judged = judged_scores[0]
        pairs.append((before, after, mask))
        row.update({
            "score_after": frames[-1].score, "normal_after": frames[-1].is_normal, "typical_after": frames[-1].is_typical,
            "reached_stop_after": frames[-1].reached_stop,
            "stalled": frames[-1].stalled,
            "patchcore_before": float(judged_before), "patchcore_after": float(judged),
            "patchcore_normal_after": bool(judged <= patchcore_threshold),
            "patchcore_peak_at_defect": peak_at_defect(judged_maps[0], mask),
            "energy_ratio": frames[-1].energy / frames[0].energy,
            "psnr_outside_mask_db": psnr(after, before, ~mask), "mean_abs_change_inside_mask": inside_change,
            "contrast_removed": contrast_removed(before, after, mask),
            "reconstruction_psnr_outside_mask_db": psnr(recon, before, ~mask), "first_frame_s": first_frame, "total_s": total,
        })
    morphed = [r for r in rows if r["loops"] > 0]
    if not morphed:
        return {"images": len(rows), "focus": config.focus, "rows": rows}
    if grid_path is not None:
        grid_path.parent.mkdir(parents=True, exist_ok=True)
        grid(pairs).save(grid_path)
    return {
        "images": len(rows),
        "threads": threads,
        "focus": config.focus,
        "gradient_smoothing": config.gradient_smoothing,
        "stop_at": config.stop_at,
        "stop_quantile": config.stop_quantile,
        "max_loops": config.max_loops,
        "loops_used": [r["loops"] for r in morphed],
        "normal_after_fraction": float(np.mean([r["normal_after"] for r in morphed])),
        "typical_after_fraction": float(np.mean([r["typical_after"] for r in morphed])),
        "reached_stop_fraction": float(np.mean([r["reached_stop_after"] for r in morphed])),
        "stalled_fraction": float(np.mean([r["stalled"] for r in morphed])),
        "unchanged": int(sum(r["result_loop"] == 0 for r in morphed)),
        "median_contrast_removed": float(np.nanmedian([r["contrast_removed"] for r in morphed])),
        "removed_fraction": float(np.mean([r["patchcore_normal_after"] and r["contrast_removed"] >= REMOVED_CONTRAST
                                           for r in morphed])),
        "patchcore_threshold": patchcore_threshold,
        "patchcore_normal_after_fraction": float(np.mean([r["patchcore_normal_after"] for r in morphed])),
        "median_patchcore_before": float(np.median([r["patchcore_before"] for r in morphed])),
        "median_patchcore_after": float(np.median([r["patchcore_after"] for r in morphed])),
        "patchcore_flagged": int(sum(not r["patchcore_normal_after"] for r in morphed)),
        "patchcore_flagged_peak_at_defect": int(sum(not r["patchcore_normal_after"] and r["patchcore_peak_at_defect"]
                                                    for r in morphed)),
        "max_total_s": float(max(r["total_s"] for r in morphed)),
        "median_psnr_outside_mask_db": float(np.median([r["psnr_outside_mask_db"] for r in morphed])),
        "median_reconstruction_psnr_outside_mask_db": float(np.median([r["reconstruction_psnr_outside_mask_db"] for r in morphed])),
        "median_abs_change_inside_mask": float(np.nanmedian([r["mean_abs_change_inside_mask"] for r in morphed])),
        "median_energy_ratio": float(np.median([r["energy_ratio"] for r in morphed])),
        "median_first_frame_s": float(np.median([r["first_frame_s"] for r in morphed])),
        "median_total_s": float(np.median([r["total_s"] for r in morphed])),
        "rows": rows,
    }


def timed_morph(detector, path, config: MorphConfig) -> tuple[list, float, float]:
    """All frames, seconds to the first frame, seconds in all."""
    start = time.perf_counter()
    frames, first_frame = [], None
    for frame in morph(detector, path, config):
        first_frame = first_frame or time.perf_counter() - start
        frames.append(frame)
    return frames, first_frame, time.perf_counter() - start


def stop_reached(m: dict) -> str:
    """How many morphs reached the score they stop at, when that is below a typical normal part's."""
    if m.get("stop_at") != "typical" or m.get("stop_quantile", 0.5) >= 0.5 or "reached_stop_fraction" not in m:
        return ""
    return (f"at or under the {m['stop_quantile']:g} quantile of the held-out normal images' scores, where the morph "
            f"stops, for **{m['reached_stop_fraction']:.0%}**; ")


def judged_lines(m: dict) -> list[str]:
    """How the morph ended; results measured before the PatchCore judge and the typical-part stop say less."""
    loops = f"within {m['max_loops']} loops (loops used: {', '.join(map(str, sorted(m['loops_used'])))})"
    if "patchcore_normal_after_fraction" not in m:
        return [f"- final score below the normal threshold: **{m['normal_after_fraction']:.0%}** {loops} "
                "(measured before the morph stopped at a typical normal part's score; no independent judge)"]
    removed = ([f"- the defect removed (PatchCore finds the part normal and at least {REMOVED_CONTRAST:.0%} of the defect's "
                f"contrast with the {RING_PX}-px ring around it is gone): **{m['removed_fraction']:.0%}**; median contrast "
                f"removed {m['median_contrast_removed']:.0%}"] if "removed_fraction" in m else [])
    flagged = ([f"- the judge's score, median: {m['median_patchcore_before']:.1f} before the morph, "
                f"{m['median_patchcore_after']:.1f} after (threshold {m['patchcore_threshold']:.1f}); of the "
                f"{m['patchcore_flagged']} part{'s' * (m['patchcore_flagged'] != 1)} it still flags, its peak lies on the defect (inside its mask or the "
                f"{RING_PX}-px ring) for **{m['patchcore_flagged_peak_at_defect']}**: what it flags is what is left of "
                "the defect where that holds, not the rest of the part"] if "patchcore_flagged" in m else [])
    return [f"- judged by PatchCore (same backbone, threshold set on the held-out normal images as diffad's is; the morph "
            f"never sees it): **{m['patchcore_normal_after_fraction']:.0%}** end normal", *flagged, *removed,
            f"- diffad's own score at the end: {stop_reached(m)}as low as the median normal part's for "
            f"**{m['typical_after_fraction']:.0%}**, below the verdict threshold for {m['normal_after_fraction']:.0%}, {loops}; slowest morph "
            f"{m['max_total_s']:.1f} s"
            + (f"; {m['stalled_fraction']:.0%} stopped because {MorphConfig.patience} loops in a row lowered the score no "
               "further, and ended on their lowest-scoring frame" if "stalled_fraction" in m else "")
            + (f" ({m['unchanged']} of them the input itself: no loop lowered its score)" if m.get("unchanged") else "")]


def render(r: dict) -> list[str]:
    """The morph lines of a category's results (`morph` and the paper's `morph_paper`); none when not measured."""
    out = []
    needed = [row for row in r.get("morph", {}).get("rows", []) if row["loops"] > 0]
    if r.get("morph") and not needed:
        out = ["", f"### Morph: all {r['morph']['images']} sampled defective test images already scored below the normal "
               "threshold (the model misses them), so the morph had nothing to do; no morph figures for this category."]
    elif r.get("morph"):
        m = r["morph"]
        threads = f" on {m['threads']} CPU thread{'s' * (m['threads'] != 1)}" if m.get("threads") else ""
        out = [f"- morph: first frame {m['median_first_frame_s']:.2f} s, complete {m['median_total_s']:.2f} s{threads}", "",
               f"### Morph ({m['images']} defective test images outside the validation fifth, the category's settings "
               f"(focus = {m['focus']:g}, gradient smoothing {m.get('gradient_smoothing', 0):g} px, stop at the "
               f"{m.get('stop_quantile', 0.5):g} quantile of normal scores); "
               f"{sum(row['loops'] == 0 for row in m.get('rows', []))} of them already scored like a typical normal part, "
               f"needed no morph and are left out of these figures)", "",
               *judged_lines(m),
               f"- PSNR outside the defect mask, morph vs input: **{m['median_psnr_outside_mask_db']:.1f} dB** (median)",
               f"- same for a plain diffusion reconstruction (noise to t = 200, denoise back): {m['median_reconstruction_psnr_outside_mask_db']:.1f} dB",
               f"- mean absolute change inside the mask: {m['median_abs_change_inside_mask']:.1f} grey levels (median)",
               f"- feature energy at the end / at the start: {m['median_energy_ratio']:.2f} (median)"]
        if r.get("morph_judge_ceiling"):
            out.append(ceiling_line(r["morph_judge_ceiling"]))
        f = r.get("morph_paper", {})
        if "normal_after_fraction" in f:
            out += [f"- the paper's morph (`focus = 0`, every pixel updated by the raw gradient): below the threshold "
                    f"**{f['normal_after_fraction']:.0%}**, PSNR outside the mask **{f['median_psnr_outside_mask_db']:.1f} dB**, "
                    f"change inside {f['median_abs_change_inside_mask']:.1f} grey levels, energy ratio "
                    f"{f['median_energy_ratio']:.2f}, complete in {f['median_total_s']:.2f} s"]
    return out


def labelled_test_set(detector, root, subset: np.ndarray | None = None) -> ScoredSet:
    """The test split's labels, masks and paths (no scores: the morph scores what it needs); `subset`: a boolean mask
    of the test samples to keep."""
    samples = list_test_samples(root)
    if subset is not None:
        samples = [x for x, keep in zip(samples, subset) if keep]
    masks = [load_mask(x.mask_path, read_image(x.path).size, detector.resolution) for x in samples]
    return ScoredSet([x.defect for x in samples], np.array([x.is_anomalous for x in samples]), None, None,
                     np.stack(masks), [x.path for x in samples])


def measure(detector, root, n_images: int, threads: int, grid_folder: Path | None = None) -> dict:
    """The category's and the paper's morph on up to `n_images` defective test images the model flags, outside the
    validation fifth the category's morph settings were chosen on; with `grid_folder`, a before/after grid of each
    variant is written there (real test images: never committed)."""
    labelled = labelled_test_set(detector, root, subset=~validation_of(root))
    judge = patchcore_judge(detector, root)
    return {**{name: morph_quality(detector, labelled, n_images, threads, variant(detector), judge,
                                   grid_folder / f"{detector.category}_{name}_grid.png" if grid_folder else None)
               for name, variant in MORPH_VARIANTS.items()},
            "morph_judge_ceiling": judge_ceiling(detector, judge, MORPH_VARIANTS["morph"](detector))}
