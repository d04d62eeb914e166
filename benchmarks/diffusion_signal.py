"""Does the diffusion part carry signal? The denoiser against trivial answers, the KL panel on real defects, and the
morph judged by a detector it does not optimise (PatchCore on the same backbone).

    python benchmarks/diffusion_signal.py --category bottle --out runs/signal

Writes OUT/signal.json and OUT/morph_grid.png (real test images: kept out of the repository) and, with --save,
the "diffusion signal" section of benchmarks/results.json / results.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baselines import PatchCore  # noqa: E402
from diffad import load_checkpoint  # noqa: E402
from diffad.data import list_images, list_test_samples, load_mask, read_image  # noqa: E402
from diffad.detector import IMAGE_THRESHOLD_QUANTILE  # noqa: E402
from diffad.metrics import auroc  # noqa: E402
from diffad.morph import MorphConfig, morph  # noqa: E402
from diffad.train import CALIBRATED_TIMESTEPS, checkpoint_split  # noqa: E402
from diffad.visualize import outline  # noqa: E402

DATA = {
    "bottle": ROOT.parent / "shared" / "data" / "mvtec_ad" / "bottle",
    "magnetic_tile": ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile",
}
DENOISER_TIMESTEPS = (5, 20, 50, 100, 200, 400)


@torch.no_grad()
def denoiser_quality(detector, root: Path, train_images: torch.Tensor, n_images: int = 8, seed: int = 0) -> dict:
    """eps-MSE by timestep on good test images, against answering every x_t with the mean training image."""
    x0 = torch.stack([detector.preprocess(p) for p in list_images(root / "test" / "good")[:n_images]])
    mean_image = train_images.mean(dim=0, keepdim=True).expand_as(x0)
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for t in DENOISER_TIMESTEPS:
        tt = torch.full((len(x0),), t)
        noise = torch.randn(x0.shape, generator=generator)
        xt = detector.diffusion.q_sample(x0, tt, noise)
        out = detector.net(xt, tt)
        rows[t] = {"eps_mse": float((out.eps - noise).pow(2).mean()),
                   "mean_image_eps_mse": float((detector.diffusion.predict_eps(xt, tt, mean_image) - noise).pow(2).mean()),
                   "x0_rmse": float((out.x0 - x0).pow(2).mean().sqrt())}
    return {"images": len(x0), "rows": rows}


def kl_panel_auroc(detector, prediction, mask: np.ndarray) -> dict[int, float]:
    """Pixel AUROC of the timestep slider's KL panel (the z-normalised, position-centred KL map) at each t."""
    centres = detector.position_means() or {}
    result = {}
    for step in prediction.steps:
        mean, std = detector.calibration.step_stats[str(step.t)]["kl"]
        centre = centres.get(step.t, {}).get("kl", mean)
        result[step.t] = auroc(mask.ravel(), ((step.kl - centre) / std).ravel())
    return result


def defect_selection(detector, root: Path, n_images: int) -> list:
    """Defective test images spread over the split (every k-th), as the morph benchmark in run.py picks them."""
    defective = [s for s in list_test_samples(root) if s.is_anomalous]
    return defective[:: max(1, len(defective) // n_images)][:n_images]


def patchcore_judge(detector, root: Path) -> tuple[PatchCore, float]:
    """PatchCore fitted on the checkpoint's training images; its verdict threshold set like diffad's, on the
    checkpoint's held-out normal images."""
    train_images, holdout = checkpoint_split(detector, root)
    judge = PatchCore(detector.backbone).fit(train_images)
    scores, _ = judge.predict(holdout)
    return judge, float(np.quantile(scores, IMAGE_THRESHOLD_QUANTILE))


def psnr(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    mse = float(np.mean((a[where].astype(np.float64) - b[where].astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], size: int = 192) -> Image.Image:
    """One row per image: before (known defect outlined), after, and the change |after - before| (x3)."""
    tiles = []
    for before, after, mask in rows:
        change = np.clip(np.abs(after.astype(int) - before.astype(int)) * 3, 0, 255).astype(np.uint8)
        row = [outline(before, mask), after, change]
        tiles.append(np.concatenate([np.asarray(Image.fromarray(t).resize((size, size))) for t in row], axis=1))
    return Image.fromarray(np.concatenate(tiles, axis=0))


def measure(category: str, n_images: int, out: Path, threads: int) -> dict:
    torch.set_num_threads(threads)
    root, checkpoint = DATA[category], ROOT / "checkpoints" / category
    detector = load_checkpoint(checkpoint)
    train_images, _ = checkpoint_split(detector, root)
    result = {"category": category, "checkpoint_steps": detector.training.get("steps_done"),
              "prediction": detector.net.config.prediction, "denoiser": denoiser_quality(detector, root, train_images)}
    judge, judge_threshold = patchcore_judge(detector, root)
    rows, pictures = [], []
    for sample in defect_selection(detector, root, n_images):
        mask = load_mask(sample.mask_path, read_image(sample.path).size, detector.resolution)
        prediction = detector.predict(sample.path, view_timesteps=CALIBRATED_TIMESTEPS)
        panel = kl_panel_auroc(detector, prediction, mask)
        best_t = max(panel, key=panel.get)
        row = {"image": f"{sample.defect}/{sample.path.name}", "score": prediction.score, "flagged": prediction.is_anomalous,
               "kl_panel_best_t": best_t, "kl_panel_best_auroc": panel[best_t], "kl_panel_auroc": panel}
        if prediction.is_anomalous:
            start = time.perf_counter()
            frames = list(morph(detector, sample.path, MorphConfig()))
            seconds = time.perf_counter() - start
            before, after = frames[0].rgb(), frames[-1].rgb()
            judged, _ = judge.predict(frames[-1].image[None])
            judged_before, _ = judge.predict(frames[0].image[None])
            change = np.abs(after.astype(float) - before.astype(float)).mean(axis=-1)
            row.update({"loops": frames[-1].loop, "seconds": seconds, "score_after": frames[-1].score,
                        "typical_after": frames[-1].is_typical, "normal_after": frames[-1].is_normal,
                        "patchcore_before": float(judged_before[0]), "patchcore_after": float(judged[0]),
                        "patchcore_normal_after": bool(judged[0] <= judge_threshold),
                        "psnr_outside_mask_db": psnr(after, before, ~mask),
                        "median_change_inside_mask": float(np.median(change[mask]))})
            pictures.append((before, after, mask))
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "kl_panel_auroc"}, default=float))
    morphed = [r for r in rows if "loops" in r]
    result.update({
        "kl_panel": {"images": len(rows), "best_auroc_at_least_0.9": float(np.mean([r["kl_panel_best_auroc"] >= 0.9 for r in rows])),
                     "median_best_auroc": float(np.median([r["kl_panel_best_auroc"] for r in rows]))},
        "morph": {"images": len(morphed), "patchcore_threshold": judge_threshold,
                  "patchcore_normal_after": float(np.mean([r["patchcore_normal_after"] for r in morphed])),
                  "typical_after": float(np.mean([r["typical_after"] for r in morphed])),
                  "median_psnr_outside_mask_db": float(np.median([r["psnr_outside_mask_db"] for r in morphed])),
                  "median_change_inside_mask": float(np.median([r["median_change_inside_mask"] for r in morphed])),
                  "median_seconds": float(np.median([r["seconds"] for r in morphed])),
                  "max_seconds": float(max(r["seconds"] for r in morphed)),
                  "median_loops": float(np.median([r["loops"] for r in morphed]))} if morphed else {"images": 0},
        "rows": rows,
    })
    out.mkdir(parents=True, exist_ok=True)
    if pictures:
        grid(pictures).save(out / f"{category}_morph_grid.png")
    (out / f"{category}_signal.json").write_text(json.dumps(result, indent=2, default=float) + "\n")
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", choices=list(DATA), default="bottle")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "runs" / "signal"))
    args = parser.parse_args(argv)
    if not DATA[args.category].is_dir():
        sys.exit(f"{args.category} data not found at {DATA[args.category]}")
    result = measure(args.category, args.images, Path(args.out), args.threads)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1, default=float))


if __name__ == "__main__":
    main()
