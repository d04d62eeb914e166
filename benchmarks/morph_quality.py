"""Morph section: how often and how cleanly the morph turns defective test images normal, and how fast."""
from __future__ import annotations

import time

import numpy as np
import torch

from diffad.data import to_uint8
from diffad.morph import MorphConfig, morph

def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    if not where.any():
        return float("nan")
    mse = float(np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# The default morph (each update weighted by the anomaly map, focus = 2) and the paper's (every pixel updated).
MORPH_VARIANTS = {"morph": MorphConfig(), "morph_paper": MorphConfig(focus=0.0)}


def morph_quality(detector, scored: ScoredSet, n_images: int, threads: int, config: MorphConfig) -> dict:
    """Morph defective test images, spread over the split, until `n_images` of them were flagged by the model.

    Images the model already scores as normal need no morph: they are counted, and left out of the summary.
    """
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
        row = {"image": f"{scored.defects[i]}/{path.name}", "loops": frames[-1].loop, "score_before": frames[0].score}
        rows.append(row)
        if not row["loops"]:
            continue
        before, after = frames[0].rgb(), frames[-1].rgb()
        recon = to_uint8(detector.reconstruct(detector.preprocess(path), 200, steps=10))
        inside_change = float(np.abs(after[mask].astype(float) - before[mask]).mean()) if mask.any() else float("nan")
        row.update({
            "score_after": frames[-1].score, "normal_after": frames[-1].is_normal, "energy_ratio": frames[-1].energy / frames[0].energy,
            "psnr_outside_mask_db": psnr(after, before, ~mask), "mean_abs_change_inside_mask": inside_change,
            "reconstruction_psnr_outside_mask_db": psnr(recon, before, ~mask), "first_frame_s": first_frame, "total_s": total,
        })
    morphed = [r for r in rows if r["loops"] > 0]
    if not morphed:
        return {"images": len(rows), "focus": config.focus, "rows": rows}
    return {
        "images": len(rows),
        "focus": config.focus,
        "max_loops": config.max_loops,
        "loops_used": [r["loops"] for r in morphed],
        "normal_after_fraction": float(np.mean([r["normal_after"] for r in morphed])),
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


def render(r: dict) -> list[str]:
    """The morph lines of a category's results (`morph` and the paper's `morph_paper`); none when not measured."""
    out = []
    needed = [row for row in r.get("morph", {}).get("rows", []) if row["loops"] > 0]
    if r.get("morph") and not needed:
        out = ["", f"### Morph: all {r['morph']['images']} sampled defective test images already scored below the normal "
               "threshold (the model misses them), so the morph had nothing to do; no morph figures for this category."]
    elif r.get("morph"):
        m = r["morph"]
        out = [f"- morph: first frame {m['median_first_frame_s']:.2f} s, complete {m['median_total_s']:.2f} s", "",
               f"### Morph ({m['images']} defective test images, default settings (focus = {m['focus']:g}); "
               f"{sum(row['loops'] == 0 for row in m.get('rows', []))} of them already scored normal, needed no morph "
               f"and are left out of these figures)", "",
               f"- final score below the normal threshold: **{m['normal_after_fraction']:.0%}** within {m['max_loops']} loops "
               f"(loops used: {', '.join(map(str, sorted(m['loops_used'])))})",
               f"- PSNR outside the defect mask, morph vs input: **{m['median_psnr_outside_mask_db']:.1f} dB** (median)",
               f"- same for a plain diffusion reconstruction (noise to t = 200, denoise back): {m['median_reconstruction_psnr_outside_mask_db']:.1f} dB",
               f"- mean absolute change inside the mask: {m['median_abs_change_inside_mask']:.1f} grey levels (median)",
               f"- feature energy at the end / at the start: {m['median_energy_ratio']:.2f} (median)"]
        f = r.get("morph_paper", {})
        if "normal_after_fraction" in f:
            out += [f"- the paper's morph (`focus = 0`, every pixel updated): below the threshold "
                    f"**{f['normal_after_fraction']:.0%}**, PSNR outside the mask **{f['median_psnr_outside_mask_db']:.1f} dB**, "
                    f"change inside {f['median_abs_change_inside_mask']:.1f} grey levels, energy ratio "
                    f"{f['median_energy_ratio']:.2f}, complete in {f['median_total_s']:.2f} s"]
    return out


def measure(detector, root, n_images: int, threads: int) -> dict:
    """The default and the paper's morph on up to `n_images` defective test images the model flags."""
    from diffad.data import list_test_samples, load_mask, read_image
    from diffad.evaluate import ScoredSet

    samples = list_test_samples(root)
    masks = [load_mask(x.mask_path, read_image(x.path).size, detector.resolution) for x in samples]
    labelled = ScoredSet([x.defect for x in samples], np.array([x.is_anomalous for x in samples]), None, None,
                         np.stack(masks), [x.path for x in samples])
    return {name: morph_quality(detector, labelled, n_images, threads, config) for name, config in MORPH_VARIANTS.items()}
