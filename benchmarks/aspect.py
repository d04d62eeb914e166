"""Non-square photos: squash to the model's square input, score square windows at the photo's own aspect
(diffad.windows), or letterbox (pad the short side, edge-replicated)?

    python benchmarks/aspect.py [--category magnetic_tile] [--per-kind 16]

Scores a fixed sample of real test images (magnetic_tile: 103-632 px wide, 222-403 high) each way with the same
checkpoint and calibration, every map brought back to the photo's own size, and writes image AUROC and pixel AUROC on
the original-size masks to benchmarks/aspect.json. Letterboxed, the model (trained on squashed images) sees the
padding as unusual: scores of normal and defective images mix, even with the image score taken inside the photo's
box only. Windows keep the texture undistorted without padding.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def letterbox(photo: Image.Image) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """The photo centred in a square, the short side padded by replicating its edge pixels; and the photo's box."""
    width, height = photo.size
    side = max(width, height)
    left, top = (side - width) // 2, (side - height) // 2
    pixels = np.pad(np.asarray(photo), ((top, side - height - top), (left, side - width - left), (0, 0)), mode="edge")
    return Image.fromarray(pixels), (left, top, left + width, top + height)


def scored_as(detector, aspect: str):
    """The same checkpoint and calibration, scoring photos squashed or in windows at their own aspect."""
    other = copy.copy(detector)
    other.scoring = dataclasses.replace(detector.scoring, aspect=aspect)
    return other


def maps_both_ways(detector, photo: Image.Image) -> dict:
    from diffad.demo import resize_map
    from diffad.postprocess import top_k_mean

    squash = scored_as(detector, "squash").predict(photo)
    boxed, box = letterbox(photo)
    padded = scored_as(detector, "squash").predict(boxed)
    side = boxed.size[0]
    scale = padded.anomaly_map.shape[0] / side
    crop = padded.anomaly_map[round(box[1] * scale):round(box[3] * scale), round(box[0] * scale):round(box[2] * scale)]
    inside = top_k_mean(crop, detector.scoring.top_k)
    windows = scored_as(detector, "windows").predict(photo)
    return {"squash": (squash.score, resize_map(squash.anomaly_map, photo.size)),
            "windows": (windows.score, resize_map(windows.anomaly_map, photo.size)),
            "letterbox": (padded.score, resize_map(crop, photo.size)),
            "letterbox_scored_inside": (inside, resize_map(crop, photo.size))}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--category", default="magnetic_tile")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "magnetic_tile" / "magnetic_tile"))
    parser.add_argument("--per-kind", type=int, default=16, help="images per test folder (good and each defect)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "aspect.json"))
    args = parser.parse_args(argv)
    from diffad import load_checkpoint
    from diffad.data import list_test_samples, read_image
    from diffad.metrics import auroc

    detector = load_checkpoint(ROOT / "checkpoints" / args.category)
    samples, seen = [], {}
    for sample in list_test_samples(args.data):  # the first per-kind images of every folder, in name order
        if seen.setdefault(sample.defect, 0) < args.per_kind:
            seen[sample.defect] += 1
            samples.append(sample)
    ways = ("squash", "windows", "letterbox", "letterbox_scored_inside")
    labels, scores, pixels = [], {w: [] for w in ways}, {w: [] for w in ways}
    masks = []
    for sample in samples:
        photo = read_image(sample.path)
        mask = (np.asarray(Image.open(sample.mask_path).convert("L")) > 127 if sample.mask_path
                else np.zeros(photo.size[::-1], bool))
        labels.append(sample.is_anomalous)
        masks.append(mask.ravel())
        for way, (score, amap) in maps_both_ways(detector, photo).items():
            scores[way].append(score)
            pixels[way].append(amap.ravel())
    truth = np.concatenate(masks)
    result = {"category": args.category, "images": len(samples), "defective": int(sum(labels))}
    for way in scores:
        result[way] = {"image_auroc": round(auroc(np.array(labels), np.array(scores[way])), 4),
                       "pixel_auroc": round(auroc(truth, np.concatenate(pixels[way])), 4)}
    print(json.dumps(result, indent=1))
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
