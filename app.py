"""diffad web demo (Gradio): upload a part photo, see where the defect is, scrub the diffusion, watch the morph.

Run `python app.py` (options: --help). Checkpoints come from the Hub repo in DIFFAD_HUB_REPO (one subfolder per
category, DIFFAD_HUB_REVISION pins a revision) with the local checkpoints/ folder as the fallback.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from diffad import CheckpointError, DataError
from diffad.data import MAX_IMAGE_PIXELS, read_image
from diffad.demo import MAP_CHOICES, VIEW_TIMESTEPS, analyse, colorbar, known_examples, map_picture, sha256_of, step_view, verdict_markdown
from diffad.postprocess import verdict as verdict_of
from diffad.morph import MorphConfig, before_after, export_gif, export_mp4, morph
from diffad.registry import CheckpointRegistry
from diffad.space import hub_source
from diffad.visualize import anomaly_picture, display_range

log = logging.getLogger("diffad.app")
ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "examples"
DEFAULT_CATEGORY = "bottle"
OUTPUT_DIR = Path(tempfile.gettempdir()) / "diffad-app"
# Served files are dropped after this long (Gradio keeps its own copies for its delete_cache period), checked at
# most every PRUNE_EVERY_S so that analyses do not scan the folder each time.
OUTPUT_MAX_AGE_S = 3600
PRUNE_EVERY_S = 600
_last_prune = 0.0
MAX_MORPH_LOOPS = 20
# Gradio opens uploads with PIL before the app sees them: refuse decompression bombs there too.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

try:  # glibc keeps freed model buffers in per-thread arenas; give them back after each model call
    import ctypes

    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc (macOS, Windows, musl)
    _malloc_trim = None


def release_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


try:  # on a ZeroGPU Space, heavy calls get a GPU; elsewhere this is a no-op
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn
# How the spaces package itself recognises ZeroGPU hardware.
ZERO_GPU = os.environ.get("SPACES_ZERO_GPU", "").lower() in ("1", "true")

HOW_IT_WORKS = """
**Anomalies as noise.** A denoising diffusion model is trained only on defect-free images of one product.
To inspect a photo we add a small amount of Gaussian noise (a few *timesteps* t) and ask the model to take one
denoising step. On normal regions the model's step agrees with the true reverse step of the noising process; a
defect looks to the model like noise it should remove, so there the two disagree. The per-pixel **KL divergence**
between the true posterior q(x<sub>t-1</sub>|x<sub>t</sub>,x<sub>0</sub>) and the model's p(x<sub>t-1</sub>|x<sub>t</sub>)
is the pixel score. A head on the model's decoder also predicts pre-trained **EfficientNet features** of the clean
image; where it cannot, the **feature error** is high. Both maps, z-normalised per timestep on held-out normal images,
are summed over timesteps into the anomaly map; its top values give the image score, compared with the scores of
normal images to give a calibrated verdict.

**The morph** walks the image down the gradient of a Gaussian model of normal features (PaDiM-style energy), in
steps that look like diffusion noise, and lets the diffusion model remove that noise every few steps. The defect is
replaced while normal regions keep their detail.

Paper: Lu et al., *Removing Anomalies as Noises for Industrial Defect Localization*, ICCV 2023.
Code: diffad (this repository) — checkpoints trained on MVTec AD (CC BY-NC-SA 4.0) and Magnetic-Tile (cite Huang et al.).
"""


def _error(exc: Exception) -> gr.Error:
    return gr.Error(str(exc), print_exception=False)


def make_app(registry: CheckpointRegistry) -> gr.Blocks:
    categories = registry.categories()
    default = default_category(categories)
    examples_by_hash = known_examples(EXAMPLES)
    example_rows = [[e["path"], e["category"]] for e in sorted(examples_by_hash.values(), key=lambda e: (e["category"], e["file"]))]
    source_note = registry.hub_note or "Using local checkpoints."
    if not categories:
        source_note += " No checkpoints found: train one with `diffad train`."

    def load(category):
        try:
            return registry.get(category)
        except CheckpointError as exc:
            raise _error(exc) from exc

    @gpu
    def run_analysis(image_path, category, progress=gr.Progress()):
        if not image_path:
            raise gr.Error("Upload a photo or pick an example first.", print_exception=False)
        if category not in categories:
            raise gr.Error(f"Unknown category {category!r}. Choose one of: {', '.join(categories)}", print_exception=False)
        progress(0.1, desc=f"loading {category}")
        detector, origin = load(category)
        known = examples_by_hash.get(sha256_of(image_path)) if Path(image_path).is_file() else None
        known_mask = None
        if known and known.get("mask_path"):
            known_mask = np.asarray(read_image(known["mask_path"]).convert("L")) > 127
        progress(0.3, desc="noising and denoising")
        try:
            analysis = analyse(detector, image_path, known_mask=known_mask)
        except (DataError, ValueError) as exc:
            raise _error(exc) from exc
        release_memory()
        prune_outputs()
        progress(0.9, desc="rendering")
        label = next(iter(MAP_CHOICES))
        vmin, vmax = display_range(analysis.mask_threshold)
        summary = {
            "category": category, "score": round(analysis.score, 4), "percentile": round(analysis.percentile, 2),
            "verdict": verdict_of(analysis.score, analysis.image_threshold),
            "image_threshold": round(analysis.image_threshold, 4), "pixel_threshold": round(analysis.mask_threshold, 4),
            "checkpoint": origin,
        }
        top = max(2 * analysis.mask_threshold, float(analysis.maps["anomaly"].max()), 1.0)
        top_score = max(2 * analysis.image_threshold, analysis.score * 1.2, 1.0)
        return (
            analysis,
            verdict_markdown(analysis, analysis.image_threshold, analysis.mask_threshold),
            summary,
            picture_file(map_picture(analysis, label, analysis.mask_threshold)),
            picture_file(colorbar(vmin, vmax, "anomaly (z units over normal pixels)")),
            gr.update(value=label),
            gr.update(minimum=0.0, maximum=round(top, 2), value=round(analysis.mask_threshold, 2)),
            gr.update(minimum=0.0, maximum=round(top_score, 2), value=round(analysis.image_threshold, 2)),
            *step_files(analysis, 0),
            gr.update(value=0),
        )

    def redraw(analysis, map_label, mask_threshold, image_threshold):
        if analysis is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        mask_threshold, image_threshold = _finite(mask_threshold, "mask threshold"), _finite(image_threshold, "verdict threshold")
        try:
            picture = picture_file(map_picture(analysis, map_label, mask_threshold))
        except DataError as exc:
            raise _error(exc) from exc
        return picture, verdict_markdown(analysis, image_threshold, mask_threshold)

    def scrub(analysis, index):
        if analysis is None:
            raise gr.Error("Analyse an image first.", print_exception=False)
        return step_files(analysis, _finite(index, "timestep index"))

    @gpu
    def run_morph(image_path, category, step_size, denoise_every, loops, seed, keep_normal):
        config = MorphConfig(step_size=_finite(step_size, "step size"), denoise_every=int(_finite(denoise_every, "denoise every")),
                             max_loops=int(min(_finite(loops, "loops"), MAX_MORPH_LOOPS)), seed=int(_finite(seed, "seed")),
                             focus=MorphConfig.focus if keep_normal else 0.0)
        if not image_path:
            raise gr.Error("Upload a photo or pick an example first.", print_exception=False)
        detector, _ = load(category)
        frames = []
        try:
            for frame in morph(detector, image_path, config):
                frames.append(frame.rgb())
                status = (f"Step {frame.step} (loop {frame.loop}): score **{frame.score:.2f}** "
                          f"(threshold {detector.calibration.image_threshold:.2f}), energy {frame.energy:,.0f}"
                          + (" — normal ✅" if frame.is_normal else ""))
                shown = picture_file(frames[-1]), picture_file(anomaly_picture(frames[-1], frame.anomaly_map,
                                                                                detector.calibration.mask_threshold))
                yield *shown, status, gr.update(), gr.update()
        except (DataError, ValueError) as exc:
            raise _error(exc) from exc
        except GeneratorExit:  # Gradio closes the generator when the client leaves: no more frames are computed
            log.info("morph stopped after %d frames: the client left", len(frames))
            raise
        finally:
            release_memory()
        folder = Path(tempfile.mkdtemp(dir=_output_folder("morphs")))
        gif, mp4 = export_gif(frames, folder / "morph.gif"), export_mp4(frames, folder / "morph.mp4")
        pair = folder / "before_after.png"
        Image.fromarray(before_after(frames[0], frames[-1])).save(pair)
        yield (*shown, status + f" — done after {len(frames) - 1} loops.", (picture_file(frames[0]), shown[0]),
               [str(gif), str(mp4), str(pair)])

    with gr.Blocks(title="diffad — defects as noise", delete_cache=(1800, 3600)) as demo:
        analysis_state = gr.State(None)
        gr.Markdown("# diffad — find and explain defects with a diffusion model\n" + source_note, elem_id="header")
        with gr.Row():
            with gr.Column(scale=1):
                category = gr.Dropdown(categories, value=default, label="Category", elem_id="category")
                # image_mode=None hands the file over untouched: diffad.data.read_image does modes, alpha and EXIF itself.
                image_in = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"], label="Photo",
                                    elem_id="photo", height=300)
                analyse_button = gr.Button("Analyse", variant="primary", elem_id="analyse")
                if example_rows:
                    gr.Examples(example_rows, inputs=[image_in, category], label="Examples (white outline: known defect)", examples_per_page=12)
            with gr.Column(scale=2):
                verdict = gr.Markdown("Upload a photo or pick an example.", elem_id="verdict")
                with gr.Row():
                    map_choice = gr.Radio(list(MAP_CHOICES), value=next(iter(MAP_CHOICES)), label="Map")
                result = gr.Image(label="Anomaly map (green: predicted defect, white: known defect)", interactive=False, elem_id="result", height=400)
                bar = gr.Image(show_label=False, interactive=False, height=70, container=False)
                with gr.Row():
                    mask_threshold = gr.Slider(0, 20, value=5, step=0.01, label="Mask threshold (z units)")
                    image_threshold = gr.Slider(0, 40, value=10, step=0.01, label="Verdict threshold (score)")
                details = gr.JSON(label="Details", elem_id="details")
        with gr.Tab("Diffusion timesteps"):
            t_slider = gr.Slider(0, len(VIEW_TIMESTEPS) - 1, value=0, step=1,
                                 label="Timestep: " + ", ".join(f"{i}→t={t}" for i, t in enumerate(VIEW_TIMESTEPS)))
            with gr.Row():
                xt_img = gr.Image(label="Noised input x_t", interactive=False)
                x0_img = gr.Image(label="Model's clean estimate x̂0", interactive=False)
                kl_img = gr.Image(label="Per-pixel KL (z)", interactive=False)
                feat_img = gr.Image(label="Feature error (z)", interactive=False)
            step_text = gr.Markdown()
        with gr.Tab("Morph to normal"):
            with gr.Row():
                step_size = gr.Slider(0.005, 0.1, value=MorphConfig.step_size, step=0.005, label="Step size s")
                denoise_every = gr.Slider(1, 20, value=MorphConfig.denoise_every, step=1, label="Denoise every N_d steps")
                loops = gr.Slider(1, MAX_MORPH_LOOPS, value=MorphConfig.max_loops, step=1, label="Max loops")
                seed = gr.Number(MorphConfig.seed, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
                keep_normal = gr.Checkbox(True, label="Only change what looks anomalous (off: the paper's morph)")
            morph_button = gr.Button("Morph", variant="primary", elem_id="morph")
            morph_status = gr.Markdown()
            with gr.Row():
                frame_img = gr.Image(label="Current frame", interactive=False)
                frame_map = gr.Image(label="Its anomaly map", interactive=False)
            compare = gr.ImageSlider(label="Before / after", interactive=False)
            downloads = gr.File(label="Download (GIF, MP4, before/after PNG)", file_count="multiple", interactive=False)
        with gr.Accordion("How it works", open=False):
            gr.Markdown(HOW_IT_WORKS)

        analysis_outputs = [analysis_state, verdict, details, result, bar, map_choice, mask_threshold, image_threshold,
                            xt_img, x0_img, kl_img, feat_img, step_text, t_slider]
        analyse_button.click(run_analysis, [image_in, category], analysis_outputs, api_name="analyse", concurrency_id="model")
        image_in.upload(run_analysis, [image_in, category], analysis_outputs, api_visibility="private", concurrency_id="model")
        redraw_inputs = [analysis_state, map_choice, mask_threshold, image_threshold]
        mask_threshold.change(redraw, redraw_inputs, [result, verdict], api_name="threshold", concurrency_limit=None, show_progress="hidden")
        for trigger in (map_choice.change, image_threshold.change):
            trigger(redraw, redraw_inputs, [result, verdict], api_visibility="private", concurrency_limit=None, show_progress="hidden")
        t_slider.change(scrub, [analysis_state, t_slider], [xt_img, x0_img, kl_img, feat_img, step_text], api_name="timestep",
                        concurrency_limit=None, show_progress="hidden")
        morph_button.click(run_morph, [image_in, category, step_size, denoise_every, loops, seed, keep_normal],
                           [frame_img, frame_map, morph_status, compare, downloads], api_name="morph", concurrency_id="model")
        category.change(lambda: None, None, analysis_state, api_visibility="private")
    return demo


def _finite(value, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}", print_exception=False) from None
    if not np.isfinite(number):
        raise gr.Error(f"{name} must be a finite number, got {value!r}", print_exception=False)
    return number


def _output_folder(name: str) -> Path:
    folder = OUTPUT_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def prune_outputs() -> None:
    """Delete served files and morph exports older than OUTPUT_MAX_AGE_S (at most once every PRUNE_EVERY_S)."""
    global _last_prune
    if time.time() - _last_prune < PRUNE_EVERY_S:
        return
    _last_prune = time.time()
    for path in OUTPUT_DIR.glob("*/*"):
        try:
            if time.time() - path.stat().st_mtime > OUTPUT_MAX_AGE_S:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        except OSError:  # another worker removed it first
            pass


def picture_file(picture: np.ndarray) -> str:
    """A PNG file with this picture, named by its content and written atomically.

    Gradio rewrites its cached copy of an array output in place, so two users getting the same picture (the same
    example, colour bar or timestep) could be served a half-written file; a file output is copied atomically instead.
    """
    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    data = buffer.getvalue()
    path = _output_folder("pictures") / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    try:
        os.utime(path)  # reused: keep it from being pruned
    except FileNotFoundError:
        fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staging, path)
    return str(path)


def step_files(analysis, index) -> tuple:
    *pictures, text = step_view(analysis, index)
    return (*map(picture_file, pictures), text)


def default_category(categories: list[str]) -> str | None:
    return DEFAULT_CATEGORY if DEFAULT_CATEGORY in categories else (categories[0] if categories else None)


def hub_defaults() -> tuple[str | None, str | None]:
    """The Hub repo and revision: DIFFAD_HUB_REPO / DIFFAD_HUB_REVISION, else what this folder's README preloads (a
    Space made by `diffad space` reads the commit its builder put in the Hub cache); none for a plain checkout."""
    if os.environ.get("DIFFAD_HUB_REPO"):
        return os.environ["DIFFAD_HUB_REPO"], os.environ.get("DIFFAD_HUB_REVISION")
    return hub_source(ROOT / "README.md") or (None, None)


def parse_args(argv=None):
    hub_repo, revision = hub_defaults()
    parser = argparse.ArgumentParser(description="diffad web demo")
    parser.add_argument("--checkpoints", default=os.environ.get("DIFFAD_CHECKPOINTS", str(ROOT / "checkpoints")))
    parser.add_argument("--hub-repo", default=hub_repo, help="Hub model repo, one subfolder per category")
    parser.add_argument("--revision", default=revision)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument("--max-queue", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=2, help="model calls run at once (analysis, morph)")
    return parser.parse_args(argv)


def set_threads() -> None:
    """Torch threads: the Space's CPU share when it says (CPU_CORES; os.cpu_count() sees the host's cores), else
    OMP_NUM_THREADS as torch already reads it, else every core."""
    if os.environ.get("CPU_CORES", "").isdigit():
        torch.set_num_threads(max(1, int(os.environ["CPU_CORES"])))
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, os.cpu_count() or 1))


def start(args) -> CheckpointRegistry:
    """The registry with the default category loaded, and warmed by one analysis of an example, so that the first
    user's analysis is as fast as the next. On ZeroGPU the categories loaded here (up to the registry's limit) are
    moved to CUDA in the main process; the GPU itself only exists inside @spaces.GPU calls, so nothing runs on it yet."""
    set_threads()
    log.info("torch threads: %d", torch.get_num_threads())
    registry = CheckpointRegistry(local_root=args.checkpoints, hub_repo=args.hub_repo, revision=args.revision)
    categories = registry.categories()
    default = default_category(categories)
    others = [c for c in categories if c != default] if ZERO_GPU else []
    for category in ([default] if default else []) + others[:registry.max_loaded - 1]:
        try:
            detector, origin = registry.get(category)
        except CheckpointError as exc:  # the page says so when the category is picked
            log.warning("could not load %s at start: %s", category, exc)
            continue
        log.info("loaded %s (%s) on %s", category, origin, registry.device)
        if not ZERO_GPU:
            started = time.perf_counter()
            warm_up(detector)
            log.info("warmed %s in %.1f s", category, time.perf_counter() - started)
    return registry


def warm_up(detector) -> None:
    """One analysis and its pictures, on an example of the category when there is one."""
    examples = sorted((EXAMPLES / detector.category).glob("normal_*.png"))
    image = examples[0] if examples else Image.new("RGB", (detector.resolution, detector.resolution), (128, 128, 128))
    analysis = analyse(detector, image)
    map_picture(analysis, next(iter(MAP_CHOICES)), analysis.mask_threshold)
    step_view(analysis, 0)
    release_memory()


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise


REGISTRY = None
if ZERO_GPU:  # its docs' pattern: models on CUDA at module level, before the app starts
    setup_logging()
    REGISTRY = start(parse_args([]))


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    demo = make_app(REGISTRY or start(args))
    demo.queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    demo.launch(server_name=args.host, server_port=args.port, max_file_size="20mb", show_error=True)


if __name__ == "__main__":
    main()
