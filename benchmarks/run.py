"""Benchmarks: quality against PaDiM/PatchCore on the same backbone, ablations, latency and the morph.

    python benchmarks/run.py                      # every shipped category whose data is in ../shared/data
    python benchmarks/run.py --categories bottle --morph-images 10

Writes benchmarks/results.json and benchmarks/results.md (linked from the README). Latency is measured with
torch limited to --threads CPU threads (2 by default, like a free Hugging Face Space).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import PaDiM, PatchCore  # noqa: E402
from diffad import load_checkpoint  # noqa: E402
from diffad.data import list_images, list_test_samples, load_mask, read_image, to_uint8  # noqa: E402
from diffad.demo import VIEW_TIMESTEPS  # noqa: E402
from diffad.evaluate import METRIC_NAMES, ScoredSet, metrics_for, score_test_set, validation_split  # noqa: E402
from diffad.metrics import evaluate_maps  # noqa: E402
from diffad.morph import MorphConfig, morph  # noqa: E402
from diffad.scoring import top_k_mean  # noqa: E402
from diffad.train import checkpoint_split  # noqa: E402

DATA = {
    "bottle": ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile",
}


def ablations(base):
    replace = dataclasses.replace
    return {
        "diffad (default: KL + feature, t = 20/200/400)": base,
        "pixel KL only": replace(base, alpha=1.0),
        "feature only": replace(base, alpha=0.0),
        "RGB error + feature (RGB baseline)": replace(base, pixel_map="rgb"),
        "RGB error only": replace(base, alpha=1.0, pixel_map="rgb"),
        "1 timestep (t = 20)": replace(base, timesteps=(20,)),
        "2 timesteps (20/200)": replace(base, timesteps=(20, 200)),
        "5 timesteps (5/20/100/200/400)": replace(base, timesteps=(5, 20, 100, 200, 400)),
        "default + Gaussian smoothing (sigma 4)": replace(base, smoothing_sigma=4.0),
        "one normal mean per timestep, not per position": replace(base, centre_by_position=False),
        "every map z-normalised by its own mean and std, per image": replace(base, normalisation="per_image"),
        "pixel KL only, z-normalised per image (the paper's code)": replace(base, alpha=1.0, normalisation="per_image"),
    }


# The score of reconstruction-based methods, one reading of the "RGB" score the paper's KL map beats: noise the
# image to t, denoise it all the way back, take the pixel error.
RECONSTRUCTION_T, RECONSTRUCTION_STEPS = 100, 10
RECONSTRUCTION_ROW = (f"RGB error of a full reconstruction (noise to t = {RECONSTRUCTION_T}, {RECONSTRUCTION_STEPS} DDIM steps back: "
                      "classic reconstruction scoring)")


def reconstruction_error_set(detector, holdout: torch.Tensor, test: torch.Tensor, reference: ScoredSet) -> ScoredSet:
    """Mean-over-channels |x0 - reconstruction| maps, centred per position and scaled on the held-out normal images."""
    def error_maps(images) -> np.ndarray:
        return np.stack([(detector.reconstruct(x, RECONSTRUCTION_T, RECONSTRUCTION_STEPS) - x).abs().mean(0).numpy() for x in images])

    normal = error_maps(holdout)
    maps = (error_maps(test) - normal.mean(0)) / normal.std()
    scores = np.array([top_k_mean(m, detector.scoring.top_k) for m in maps])
    return dataclasses.replace(reference, scores=scores, maps=maps.astype(np.float16))


# Feature-residual pooling sizes measured in the full ablation (ScoringConfig.feature_pool), each calibrated anew;
# the checkpoint's own is the default row.
FEATURE_POOLS = ((1,), (3,), (9,), (1, 3, 9))


def pooling_name(pools, stride: int) -> str:
    if pools == (1,):
        return "feature residual not pooled"
    if len(pools) == 1:
        return f"feature residual averaged over {pools[0]}x{pools[0]} cells ({pools[0] * stride} px) before squaring"
    return f"feature residual pooled over {', '.join(f'{k}x{k}' for k in pools)} cells, the calibrated maps averaged"


def pooled_feature_sets(checkpoint: Path, holdout: torch.Tensor, root: Path, pools) -> dict[str, ScoredSet]:
    """The default and feature-only scores with the feature residual averaged over these pooling sizes."""
    pooled = load_checkpoint(checkpoint)  # its own copy: calibrating replaces the calibration and position means
    pooled.scoring = dataclasses.replace(pooled.scoring, feature_pool=pools)
    pooled.calibrate(holdout, pooled.scoring.timesteps, select_smoothing=False)
    name = pooling_name(pooled.scoring.feature_pool, pooled.backbone.stride)
    return score_test_set(pooled, root, {name: pooled.scoring, f"{name}, feature only": dataclasses.replace(pooled.scoring, alpha=0.0)})


def baseline_sets(train_images: torch.Tensor, test: torch.Tensor, backbone, reference: ScoredSet) -> tuple[dict[str, dict], dict[str, ScoredSet]]:
    results, sets = {}, {}
    for name, model in (("PaDiM (same backbone)", PaDiM(backbone)), ("PatchCore 10% (same backbone)", PatchCore(backbone))):
        start = time.time()
        model.fit(train_images)
        scores, maps = [], []
        for i in range(0, len(test), 16):
            s, m = model.predict(test[i : i + 16])
            scores.append(s)
            maps.append(m.astype(np.float16))
        seconds = time.time() - start
        sets[name] = dataclasses.replace(reference, scores=np.concatenate(scores), maps=np.concatenate(maps))
        metrics = metrics_for(sets[name])
        results[name] = {**metrics.pop("overall"), "seconds_fit_and_test": round(seconds, 1), "per_defect": metrics}
    return results, sets


def evaluation_split_metrics(sets: dict[str, ScoredSet]) -> dict:
    """Every method on the test images outside select_feature_pool.py's validation split (the same images for all)."""
    keep = ~validation_split(next(iter(sets.values())).defects)
    return {"images": int(keep.sum()),
            **{name: evaluate_maps(s.labels[keep], s.scores[keep], s.masks[keep], s.maps[keep]) for name, s in sets.items()}}


def latency(detector, paths, threads: int, repeats: int = 7) -> dict:
    torch.set_num_threads(threads)
    images = [detector.preprocess(p) for p in paths[:repeats]]
    detector.predict(images[0])  # warm-up
    score_times, view_times = [], []
    for image in images:
        start = time.perf_counter()
        detector.predict(image)
        score_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        detector.predict(image, view_timesteps=VIEW_TIMESTEPS)
        view_times.append(time.perf_counter() - start)
    return {"threads": threads, "score_one_image_s": round(statistics.median(score_times), 3),
            "score_with_12_view_timesteps_s": round(statistics.median(view_times), 3)}


DENOISER_TIMESTEPS = (5, 20, 100, 200, 400)


@torch.no_grad()
def denoiser_quality(detector, root: Path, train_images: torch.Tensor, n_images: int = 8, seed: int = 0) -> dict:
    """Noise-prediction error by timestep on good test images: how well the model knows what normal looks like."""
    paths = list_images(root / "test" / "good")[:n_images]
    x0 = torch.stack([detector.preprocess(p) for p in paths]).to(detector.device)
    # Reference: the noise estimate a model would make if it answered every x_t with the mean training image.
    mean_image = train_images.mean(dim=0, keepdim=True).expand_as(x0).to(detector.device)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for t in DENOISER_TIMESTEPS:
        tt = torch.full((len(x0),), t, device=detector.device)
        noise = torch.randn(x0.shape, generator=generator).to(detector.device)
        xt = detector.diffusion.q_sample(x0, tt, noise)
        out = detector.net(xt, tt)
        x0_hat = detector.diffusion.predict_x0(xt, tt, out.eps)
        eps_from_mean = detector.diffusion.predict_eps(xt, tt, mean_image)
        # Per pixel, the KL is the squared x0 error divided by the learned variance (plus a variance-only term); the
        # variance can only move between the posterior's and beta_t, so this ratio bounds how much it can re-rank pixels.
        log_variance = detector.diffusion.model_log_variance(tt, out.v).mean(dim=1)
        variance_range = float((detector.diffusion.betas[t].log() - detector.diffusion.posterior_log_variance_clipped[t]).exp())
        rows[t] = {"noise_std": float(detector.diffusion.sqrt_one_minus_alphas_cumprod[t]), "eps_mse": float((out.eps - noise).pow(2).mean()),
                   "x0_rmse": float((x0_hat - x0).pow(2).mean().sqrt()),
                   "mean_image_eps_mse": float((eps_from_mean - noise).pow(2).mean()),
                   "variance_range": variance_range,
                   "log_variance_spatial_std": float(log_variance.flatten(1).std(dim=1).mean())}
    return {"images": len(paths), "rows": rows}


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


def morph_timing(detector, paths, threads: int) -> dict:
    torch.set_num_threads(threads)
    timings = [timed_morph(detector, path, MorphConfig())[1:] for path in paths]
    return {"median_first_frame_s": float(np.median([t[0] for t in timings])),
            "median_total_s": float(np.median([t[1] for t in timings]))} if paths else {}


def fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def markdown(results: dict) -> str:
    out = ["# diffad benchmark results", "", f"Generated by `python benchmarks/run.py` on {results['date']} "
           f"({results['machine']}). Evaluation at each checkpoint's resolution; AUPRO integrated to FPR 0.3.", ""]
    for category, r in results["categories"].items():
        out += [f"## {category}", "", f"Checkpoint: `checkpoints/{category}` — {r['training']}", ""]
        out += ["### Quality against baselines (whole test split)", "",
                "| method | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
        for name, m in {**{"diffad": r["metrics"]["overall"]}, **r["baselines"]}.items():
            out.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRIC_NAMES) + " |")
        if r.get("evaluation_split"):
            e = r["evaluation_split"]
            pools = ",".join(map(str, r.get("feature_pool", [1])))
            out += ["", f"### The same on the {e['images']} test images outside the validation split", "",
                    f"The checkpoint's feature pooling ({pools}) was chosen on the other fifth of the test images "
                    "(`benchmarks/select_feature_pool.py`, [feature_pool_selection.json](feature_pool_selection.json)); "
                    "these images never took part in that choice.", "",
                    "| method | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
            for name, m in e.items():
                if name != "images":
                    out.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRIC_NAMES) + " |")
        out += ["", "### Per defect type (diffad)", "", "| subset | " + " | ".join(METRIC_NAMES) + " | images |",
                "|---" * (len(METRIC_NAMES) + 2) + "|"]
        for subset, m in r["metrics"].items():
            out.append(f"| {subset} | " + " | ".join(fmt(m[k]) for k in METRIC_NAMES) + f" | {m['images']} |")
        out += per_defect_comparison(r)
        out += ["", "### Ablation", "", "| variant | " + " | ".join(METRIC_NAMES) + " |", "|---" * (len(METRIC_NAMES) + 1) + "|"]
        for name, m in r["ablation"].items():
            out.append(f"| {name} | " + " | ".join(fmt(m[k]) for k in METRIC_NAMES) + " |")
        if r.get("denoiser"):
            d = r["denoiser"]
            out += ["", f"### Denoiser ({d['images']} good test images; noise std and x̂0 RMSE in pixel units of [-1, 1])", "",
                    "| t | noise std | ε-MSE | x̂0 RMSE | ε-MSE if x̂0 were the mean training image | β_t / β̃_t (most the learned "
                    "variance can re-weight the KL) | learned log-variance, std across the image |", "|---|---|---|---|---|---|---|"]
            out += [f"| {t} | {row['noise_std']:.3f} | {row['eps_mse']:.3f} | {row['x0_rmse']:.3f} | {row['mean_image_eps_mse']:.3f} "
                    f"| {row['variance_range']:.3f} | {row['log_variance_spatial_std']:.4f} |" for t, row in d["rows"].items()]
        lat = r["latency"]
        out += ["", f"### Speed ({lat['threads']} CPU threads, medians)", "",
                f"- scoring one image (3 timesteps, KL + feature maps): **{lat['score_one_image_s']:.3f} s**",
                f"- the app's analysis (12 timesteps kept for the slider): {lat['score_with_12_view_timesteps_s']:.3f} s"]
        needed = [row for row in r.get("morph", {}).get("rows", []) if row["loops"] > 0]
        if r.get("morph") and not needed:
            out += ["", f"### Morph: all {r['morph']['images']} sampled defective test images already scored below the normal "
                    "threshold (the model misses them), so the morph had nothing to do; no morph figures for this category."]
        elif r.get("morph"):
            m = r["morph"]
            out += [f"- morph: first frame {m['median_first_frame_s']:.2f} s, complete {m['median_total_s']:.2f} s", "",
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
        out.append("")
    if results.get("app"):
        a = results["app"]
        out += [f"## Web app ({a['threads']} CPU threads, `benchmarks/app_latency.py`, medians through gradio_client)", "",
                f"- cold start to first served page: {a['cold_start_to_first_page_s']:.1f} s (default category loaded and warmed)",
                f"- first analysis after the start: {a['first_analysis_round_trip_s']:.2f} s",
                f"- analysis round trip ({a['category']}, 12 timesteps for the slider): {a['analysis_round_trip_s']:.2f} s",
                f"- timestep slider round trip: {a['timestep_slider_round_trip_s'] * 1000:.0f} ms; threshold: {a['threshold_round_trip_s'] * 1000:.0f} ms",
                f"- morph round trip (default settings, up to {a['morph_max_loops']} loops): {a['morph_round_trip_s']:.1f} s", ""]
    if results.get("reliability"):
        out += reliability_markdown(results["reliability"])
    return "\n".join(out)


def per_defect_comparison(r: dict) -> list[str]:
    """Pixel AUROC / AUPRO of diffad and each baseline, per defect type (each type together with the good images)."""
    columns = {"diffad": r["metrics"], **{name: {"overall": m, **m["per_defect"]} for name, m in r["baselines"].items()}}
    out = ["", "### Per defect type against the baselines (pixel AUROC / AUPRO)", ""] + per_defect_table(r["metrics"], columns)
    if r.get("pooled"):
        out += ["", "### Per defect type with the feature residual pooled (ablation; pixel AUROC / AUPRO)", ""]
        out += per_defect_table(r["metrics"], {"diffad (default)": r["metrics"], **r["pooled"]})
    return out


def per_defect_table(subsets, columns: dict) -> list[str]:
    out = ["| subset | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for subset in subsets:
        cells = [metrics[subset] for metrics in columns.values()]
        out.append(f"| {subset} | " + " | ".join(f"{fmt(c['pixel_auroc'])} / {fmt(c['aupro'])}" for c in cells) + " |")
    return out


def write_results(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2, default=float) + "\n")
    (out / "results.md").write_text(markdown(results))


def save_section(name: str, section: dict) -> None:
    """Store one section (the app's latency, reliability) in results.json, keeping the rest; re-render results.md."""
    out = ROOT / "benchmarks"
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {"categories": {}}
    write_results({**results, name: section}, out)


def reliability_markdown(r: dict) -> list[str]:
    load, overflow, disconnect = r["load"], r["overflow"], r["disconnect"]
    memory = ", ".join(f"{n}: {m:.0f}" for n, m in load["rss_by_requests_mb"])
    out = [f"## Reliability ({r['threads']} CPU threads, `benchmarks/load_test.py`, {r['category']})", "",
           "### Bad input (cases in `tests/test_bad_input.py`, all in CI; every one gets a clear message or a documented conversion)", "",
           "| family | cases |", "|---|---|"]
    out += [f"| {family} | {n} |" for family, n in r["bad_input_cases"].items()]
    out += ["", f"### Load: {load['clients']} concurrent gradio_client clients for {load['duration_s']:.0f} s", "",
            f"- requests served: **{load['requests']}**, failed: **{load['failures']}** "
            f"(plus {load['refused_bad_uploads']} corrupt uploads refused with a clear message, as they should be)",
            f"- latency over all requests: p50 {load['p50_s']:.2f} s, p95 {load['p95_s']:.2f} s (queue wait included)", "",
            "| endpoint | requests | p50 (s) | p95 (s) |", "|---|---|---|---|"]
    out += [f"| {name} | {e['requests']} | {e['p50_s']:.2f} | {e['p95_s']:.2f} |" for name, e in load["per_endpoint"].items()]
    out += ["", f"- app process memory (RSS, MB) before the load: {load['rss_before_mb']:.0f}; after N requests: {memory}",
            f"- peak RSS: **{load['peak_rss_mb']:.0f} MB**; growth from request 200 to the end: {load['rss_growth_after_200_requests_mb']:.0f} MB",
            f"- repeated analyses of the same image under concurrency: {load['images_with_differing_scores']} of "
            f"{load['images_analysed']} images got differing scores",
            "", f"### Bounded queue: {overflow['submitted']} analyses submitted at once (queue size {overflow['queue_size']})", "",
            f"- served: {overflow['served']}, refused with \"queue is full\" instead of waiting: {overflow['refused_queue_full']} "
            f"(slowest refusal {overflow['slowest_refusal_s']} s, client start-up included), "
            f"other failures: {len(overflow['other_failures'])}",
            "", "### Client leaving mid-morph (20 loops requested, client process killed after the first frames)", "",
            f"- server CPU busy for {disconnect['server_busy_after_disconnect_s']} s after the disconnect, then idle; "
            f"app log: \"{disconnect['server_log']}\"", ""]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--categories", nargs="+", default=list(DATA))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--morph-images", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "benchmarks"))
    parser.add_argument("--ablation", choices=["full", "core"], default="full", help="core: KL/feature/RGB variants only")
    parser.add_argument("--morph-only", action="store_true", help="re-measure only the morph section")
    parser.add_argument("--latency-only", action="store_true", help="re-measure only speed (on an otherwise idle machine)")
    parser.add_argument("--denoiser-only", action="store_true", help="re-measure only the denoiser's error by timestep")
    parser.add_argument("--quality-only", action="store_true",
                        help="re-measure only the metrics, ablation and baselines (keep the stored denoiser, speed and morph)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    results = {"date": time.strftime("%Y-%m-%d"), "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "categories": {}}
    if (out / "results.json").exists():  # categories not re-run, and the app section, keep their earlier results
        results = {**json.loads((out / "results.json").read_text()), **{k: results[k] for k in ("date", "machine")}}
    for category in args.categories:
        root, checkpoint = DATA[category], ROOT / "checkpoints" / category
        if not root.is_dir() or not (checkpoint / "config.json").exists():
            print(f"skipping {category}: data ({root}) or checkpoint ({checkpoint}) missing")
            continue
        detector = load_checkpoint(checkpoint)
        if args.latency_only:
            r = results["categories"][category]
            paths = [Path(p) for p in sorted((root / "test").glob("*/*.png"))] or sorted((root / "test").glob("*/*"))
            r["latency"] = latency(detector, paths, args.threads)
            morphed = [root / "test" / row["image"] for row in r.get("morph", {}).get("rows", []) if row["loops"] > 0]
            timing = morph_timing(detector, morphed[:3], args.threads)
            r.setdefault("morph", {}).update(timing)
            print(category, r["latency"], timing)
            continue
        if args.denoiser_only:
            results["categories"][category]["denoiser"] = denoiser_quality(detector, root, checkpoint_split(detector, root)[0])
            continue
        chosen = ablations(detector.scoring)
        if args.ablation == "core":
            chosen = dict(list(chosen.items())[:5])
        if args.morph_only:
            samples = list_test_samples(root)
            masks = [load_mask(x.mask_path, read_image(x.path).size, detector.resolution) for x in samples]
            labelled = ScoredSet([x.defect for x in samples], np.array([x.is_anomalous for x in samples]), None, None,
                                 np.stack(masks), [x.path for x in samples])
            for name, config in MORPH_VARIANTS.items():
                results["categories"][category][name] = morph_quality(detector, labelled, args.morph_images, args.threads, config)
            continue
        print(f"[{category}] scoring the test split with {len(chosen)} variants")
        variants = score_test_set(detector, root, chosen)
        default = next(iter(variants.values()))
        t = detector.training
        r = {
            "training": f"{t.get('steps_done')} steps, batch {t.get('batch_size')}, {t.get('seconds', 0) / 60:.0f} min on {t.get('device')} "
                        f"({t.get('train_images')} training + {t.get('holdout_images')} held-out images)",
            "metrics": metrics_for(default),
            "feature_pool": list(detector.scoring.feature_pool),
            "ablation": {name: evaluate_maps(s.labels, s.scores, s.masks, s.maps) for name, s in variants.items()},
        }
        train_images, holdout = checkpoint_split(detector, root)
        test = torch.stack([detector.preprocess(p) for p in default.paths])
        if args.ablation == "full":
            print(f"[{category}] reconstruction-error ablation")
            s = reconstruction_error_set(detector, holdout, test, default)
            r["ablation"][RECONSTRUCTION_ROW] = evaluate_maps(s.labels, s.scores, s.masks, s.maps)
            for pools in FEATURE_POOLS:
                if pools == detector.scoring.feature_pool:
                    continue
                print(f"[{category}] feature residual pooled over {pools}")
                for name, s in pooled_feature_sets(checkpoint, holdout, root, pools).items():
                    r.setdefault("pooled", {})[name] = metrics_for(s)
                    r["ablation"][name] = r["pooled"][name]["overall"]
        print(f"[{category}] baselines")
        r["baselines"], baselines = baseline_sets(train_images, test, detector.backbone, default)
        r["evaluation_split"] = evaluation_split_metrics({"diffad": default, **baselines})
        if args.quality_only:
            results["categories"][category] = {**results["categories"].get(category, {}), **r}
            continue
        r["denoiser"] = denoiser_quality(detector, root, train_images)
        print(f"[{category}] latency")
        r["latency"] = latency(detector, default.paths, args.threads)
        if args.morph_images:
            print(f"[{category}] morph on {args.morph_images} images")
            for name, config in MORPH_VARIANTS.items():
                r[name] = morph_quality(detector, default, args.morph_images, args.threads, config)
        results["categories"][category] = r
        print(json.dumps({k: v for k, v in r.items() if k != "morph"}, indent=1, default=str)[:3000])
    write_results(results, out)
    print(f"wrote {out / 'results.md'}")


if __name__ == "__main__":
    main()
