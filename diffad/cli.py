"""Command line: `diffad train | evaluate | calibrate | predict | morph | examples | push | space` (also `python -m diffad`)."""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from PIL import Image

from .checkpoint import CheckpointError, load_checkpoint
from .data import IMAGE_SUFFIXES, DataError, list_images, to_uint8
from .evaluate import MAP_KINDS
from .examples import POLISH_LOOPS
from .morph import STOP_RULES, MorphConfig
from .train import AUGMENTATIONS, PRECISIONS, TrainConfig

log = logging.getLogger("diffad")


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="category folder, a folder of categories, or a Hub repo id")
    parser.add_argument("--category", help="category inside --checkpoint (a folder of categories or a Hub repo)")
    parser.add_argument("--revision", help="Hub branch, tag or commit to pin")
    parser.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffad", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a category from a folder of good images")
    train.add_argument("--data", required=True, help="MVTec-layout category folder (train/good) or a plain image folder")
    train.add_argument("--out", required=True, help="checkpoint folder to write, e.g. checkpoints/NAME")
    train.add_argument("--category", help="category name (default: the --out folder's name)")
    train.add_argument("--resolution", type=int, default=TrainConfig.resolution)
    train.add_argument("--steps", type=int, default=TrainConfig.steps)
    train.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    train.add_argument("--lr", type=float, default=TrainConfig.lr)
    train.add_argument("--augment", choices=AUGMENTATIONS, default=TrainConfig.augment)
    train.add_argument("--seed", type=int, default=TrainConfig.seed)
    train.add_argument("--device", default=TrainConfig.device, help="cpu, cuda or auto")
    train.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                       help="bf16: mixed precision for the network (fast on a GPU)")
    train.add_argument("--save-every", type=int, default=TrainConfig.save_every)
    train.add_argument("--time-limit", type=float, metavar="MINUTES",
                       help="stop after this many minutes (loading included), saving the checkpoint there (--resume continues)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt")
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="start from this checkpoint's network (folder or Hub id): train it longer or fine-tune it")
    train.add_argument("--net", type=json.loads, default={}, help='network overrides as JSON, e.g. \'{"patch": 2}\'')
    train.add_argument("--scoring", type=json.loads, default={},
                       help='scoring settings as JSON, e.g. \'{"aspect": "windows"}\' (the network then trains on the '
                       'windows it will score); `diffad calibrate` can change all but the aspect later')
    train.add_argument("--feature-pool", metavar="K[,K...]", default="1",
                       help="feature-residual pooling sizes calibrated at save time (as for calibrate)")

    evaluate = sub.add_parser("evaluate", help="metrics on an MVTec-layout test split")
    _add_checkpoint_args(evaluate)
    evaluate.add_argument("--data", required=True, help="category folder with test/ and ground_truth/")
    evaluate.add_argument("--out", help="folder for metrics.json, metrics.md and --save-maps overlays")
    evaluate.add_argument("--save-maps", action="store_true")
    evaluate.add_argument("--map", choices=MAP_KINDS, default="combined",
                          help="score with this map alone (ablation): the KL, feature or RGB error maps, or their combination")

    calibrate = sub.add_parser("calibrate", help="re-measure calibration and refit the morph's feature model")
    calibrate.add_argument("--checkpoint", required=True, help="local category folder (rewritten in place)")
    calibrate.add_argument("--data", required=True, help="the category's training data (same folder as for train)")
    calibrate.add_argument("--feature-pool", metavar="K[,K...]",
                           help="average the feature residual over K x K feature cells before squaring (odd K, 1 = off; "
                           "helps large texture defects, blurs small ones); several sizes, e.g. 1,3,9, average their "
                           "calibrated maps; default: keep the checkpoint's")
    calibrate.add_argument("--scoring", type=json.loads, default={},
                           help='scoring overrides as JSON, e.g. \'{"pixel_smoothing": 16, "kl_jump": 4}\'')
    calibrate.add_argument("--smoothing", type=float, metavar="SIGMA",
                           help="Gaussian smoothing of the combined map in pixels at the model resolution (0 = none); "
                           "default: chosen on synthetic defects pasted into held-out normal images")
    calibrate.add_argument("--threshold-quantile", type=float, metavar="Q",
                           help="the verdict threshold is this quantile of the held-out normal images' scores (a "
                           "share of normal parts let pass, e.g. 0.95); default: keep the checkpoint's (0.99 unless "
                           "changed)")
    calibrate.add_argument("--morph", type=json.loads, default={},
                           help='the category\'s morph settings as JSON, kept by later calibrations, e.g. '
                           '\'{"gradient_smoothing": 0}\' (benchmarks/select_on_validation.py --choose morph_smoothing)')

    morph = sub.add_parser("morph", help="morph an image into a normal-looking one (GIF, MP4, before/after PNG)")
    _add_checkpoint_args(morph)
    morph.add_argument("image")
    morph.add_argument("--out", required=True)
    morph.add_argument("--step-size", type=float, default=MorphConfig.step_size)
    morph.add_argument("--denoise-every", type=int, default=MorphConfig.denoise_every)
    morph.add_argument("--loops", type=int, default=MorphConfig.max_loops)
    morph.add_argument("--seed", type=int, default=MorphConfig.seed)
    morph.add_argument("--focus", type=float, default=MorphConfig.focus,
                       help="above 0: change pixels by how anomalous they look (keeps normal detail); 0: every pixel, "
                            "as the paper's morph")
    morph.add_argument("--gradient-smoothing", type=float, metavar="SIGMA",
                       help="smooth the energy gradient (pixels) so the picture changes, not its texture; 0: the "
                       f"paper's; default: the category's (else {MorphConfig.gradient_smoothing:g})")
    morph.add_argument("--timestep", type=int, metavar="T",
                       help="the denoising timestep; default: the category's (else matched to the noise the gradient "
                            "steps add)")
    morph.add_argument("--stop-at", choices=STOP_RULES, default=MorphConfig.stop_at,
                       help="typical: stop once the part scores like a normal part (see --stop-quantile); threshold: "
                            "once the verdict is normal; never: run every loop")
    morph.add_argument("--stop-quantile", type=float, metavar="Q",
                       help="under --stop-at typical, the quantile of held-out normal scores to reach (0.5: a typical "
                            f"part; lower clears more of the defect); default: the category's (else {MorphConfig.stop_quantile:g})")

    examples = sub.add_parser("examples", help="make example images: diffusion samples plus synthetic defects")
    _add_checkpoint_args(examples)
    examples.add_argument("--data", required=True, help="the category's training data (only its mean image is used)")
    examples.add_argument("--out", required=True)
    examples.add_argument("--seed", type=int, default=0)
    examples.add_argument("--defects", nargs="+", default=None, help="defect types (default: all of diffad.synth's)")
    examples.add_argument("--polish-loops", type=int, default=POLISH_LOOPS,
                          help="morph each sample for up to this many loops until it scores normal (0: raw samples)")

    push = sub.add_parser("push", help="upload checkpoints and a model card to a Hugging Face Hub model repo, in one commit")
    push.add_argument("--checkpoint", required=True, help="a category folder, or a folder of categories (all are pushed)")
    push.add_argument("--repo-id", required=True, help="USER/REPO; each category goes into its own subfolder")
    push.add_argument("--licence", default="cc-by-nc-sa-4.0", help="licence of the weights (follow the training data's)")
    push.add_argument("--data-note", default="", help="where the training data came from and its licence")
    push.add_argument("--dataset", help="Hub dataset id of the training/test data (card metadata and eval results)")
    push.add_argument("--revision", help="branch to commit to (created from the default branch if missing)")
    push.add_argument("--private", action="store_true")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")

    space = sub.add_parser("space", help="assemble a Hugging Face Space (app, package, examples, requirements, README)")
    space.add_argument("--out", required=True, help="folder to write the Space into (replaced)")
    space.add_argument("--model-repo", help="Hub model repo to preload the checkpoints from (else checkpoints/ is copied)")
    space.add_argument("--model-revision", help="commit of --model-repo to pin (default: its current commit)")
    space.add_argument("--categories", nargs="+", help="categories to serve (default: those in checkpoints/)")
    space.add_argument("--repo-id", help="USER/SPACE: upload the folder there (created if missing)")
    space.add_argument("--token", help="Hub token (default: HF_TOKEN or the saved login)")
    space.add_argument("--private", action="store_true")

    predict = sub.add_parser("predict", help="score images or folders of images")
    _add_checkpoint_args(predict)
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--out", required=True, help="folder for predictions.csv and overlay PNGs")
    predict.add_argument("--seed", type=int)
    return parser


def _collect(inputs) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += list_images(item)
        elif item.exists():
            paths.append(item)
        else:
            raise DataError(f"{item}: no such file or folder")
    if not paths:
        raise DataError("no images found in " + ", ".join(map(str, inputs)) + f" (looked for {sorted(IMAGE_SUFFIXES)})")
    return paths


def cmd_train(args) -> int:
    from .train import STATE_NAME, train

    out = Path(args.out)
    if (out / STATE_NAME).exists() and not args.resume:
        raise DataError(f"{out} holds an unfinished run ({STATE_NAME}); pass --resume or choose another --out")
    config = TrainConfig(
        data=args.data, out=args.out, category=args.category, resolution=args.resolution, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, augment=args.augment, seed=args.seed, device=args.device,
        save_every=args.save_every, init_from=args.init_from, time_limit=args.time_limit, net=args.net,
        scoring=args.scoring, feature_pool=args.feature_pool, precision=args.precision,
    )
    train(config)
    print(f"checkpoint written to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, markdown_table

    detector = load_checkpoint(args.checkpoint, args.category, args.revision, device=args.device)
    metrics = evaluate(detector, args.data, out=args.out, save_maps=args.save_maps, map_kind=args.map)
    print(markdown_table(metrics, f"{detector.category}, {args.map} map"))
    return 0


def cmd_calibrate(args) -> int:
    from .train import recalibrate

    detector = recalibrate(args.checkpoint, args.data, feature_pool=args.feature_pool, scoring=args.scoring,
                           smoothing_sigma=args.smoothing, threshold_quantile=args.threshold_quantile, morph=args.morph)
    print(f"{args.checkpoint}: image threshold {detector.calibration.image_threshold:.3f} "
          f"(quantile {detector.calibration.threshold_quantile:g} of held-out normal scores), "
          f"mask threshold {detector.calibration.mask_threshold:.3f}, "
          f"feature pool {','.join(map(str, detector.calibration.feature_pool))}, "
          f"smoothing {detector.calibration.smoothing_sigma:g}"
          + (f", morph {json.dumps(detector.morph_defaults)}" if detector.morph_defaults else ""))
    return 0


def cmd_morph(args) -> int:
    from .morph import before_after, export_gif, export_mp4, morph

    detector = load_checkpoint(args.checkpoint, args.category, args.revision, device=args.device)
    # Left out, these are the category's (its checkpoint's "morph" settings), not the library defaults.
    category_settings = {name: value for name, value in (("gradient_smoothing", args.gradient_smoothing),
                                                         ("timestep", args.timestep),
                                                         ("stop_quantile", args.stop_quantile)) if value is not None}
    config = MorphConfig.for_detector(detector, step_size=args.step_size, denoise_every=args.denoise_every,
                                      max_loops=args.loops, seed=args.seed, focus=args.focus, stop_at=args.stop_at,
                                      **category_settings)
    frames = []
    for frame in morph(detector, args.image, config):
        frames.append(frame)
        state = (" (stalled: the result is this lowest-scoring frame)" if frame.stalled else " (reached the stop score)"
                 if frame.reached_stop else " (scores like a typical normal part)" if frame.is_typical
                 else " (under the verdict threshold)" if frame.is_normal else "")
        print(f"step {frame.gradient_steps:3d}: score {frame.score:.3f} energy {frame.energy:.0f}{state}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(args.image).stem
    pictures = [f.rgb() for f in frames]
    export_gif(pictures, out / f"{stem}_morph.gif")
    export_mp4(pictures, out / f"{stem}_morph.mp4")
    Image.fromarray(before_after(pictures[0], pictures[-1])).save(out / f"{stem}_before_after.png")
    print(f"wrote {out}/{stem}_morph.gif, .mp4 and _before_after.png")
    return 0


def cmd_examples(args) -> int:
    from .examples import make_examples

    detector = load_checkpoint(args.checkpoint, args.category, args.revision, device=args.device)
    manifest = make_examples(detector, args.data, args.out, seed=args.seed, polish_loops=args.polish_loops, **({"defects": args.defects} if args.defects else {}))
    print(f"wrote {len(manifest['images'])} examples to {args.out}")
    return 0


def cmd_push(args) -> int:
    from .hub import push

    url = push(args.checkpoint, args.repo_id, licence=args.licence, data_note=args.data_note, revision=args.revision,
               private=args.private, dataset=args.dataset, token=args.token)
    print(f"uploaded: {url}")
    return 0


def cmd_space(args) -> int:
    from .space import assemble, upload

    folder = assemble(args.out, args.model_repo, args.model_revision, categories=args.categories)
    print(f"Space assembled in {folder}")
    if args.repo_id:
        print(f"uploaded: {upload(folder, args.repo_id, token=args.token, private=args.private)}")
    return 0


def cmd_predict(args) -> int:
    from .visualize import anomaly_picture

    detector = load_checkpoint(args.checkpoint, args.category, args.revision, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    for path in _collect(args.inputs):
        try:
            prediction = detector.predict(path, seed=args.seed)
        except DataError as exc:
            failed += 1
            print(f"skipped: {exc}", file=sys.stderr)
            continue
        picture = anomaly_picture(to_uint8(prediction.image), prediction.anomaly_map, prediction.mask_threshold)
        overlay_path = out / f"{path.stem}_overlay.png"
        Image.fromarray(picture).save(overlay_path)
        rows.append([str(path), f"{prediction.score:.4f}", f"{prediction.percentile:.1f}", prediction.verdict, overlay_path.name])
        print(f"{path}: score {prediction.score:.3f}, percentile {prediction.percentile:.1f}, {prediction.verdict}")
    with (out / "predictions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "score", "percentile", "verdict", "overlay"])
        writer.writerows(rows)
    print(f"{len(rows)} images scored, {failed} unreadable skipped; results in {out / 'predictions.csv'}")
    return 0 if rows else 1


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    handler = {
        "train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "calibrate": cmd_calibrate, "morph": cmd_morph,
        "examples": cmd_examples, "push": cmd_push, "space": cmd_space,
    }[args.command]
    try:
        return handler(args)
    except (DataError, CheckpointError, ValueError, OSError) as exc:  # OSError: also the Hub's HTTP errors
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
