"""diffad web demo (Gradio): upload a part photo, see where the defect is, scrub the diffusion, watch the morph.

Run `python app.py` (options: --help). Checkpoints come from the Hub repo in DIFFAD_HUB_REPO (one subfolder per
category, DIFFAD_HUB_REVISION pins a revision) with the local checkpoints/ folder as the fallback.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import inspect
import io
import itertools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import torch
from PIL import Image

from diffad import CheckpointError, DataError
from diffad.data import read_image
from diffad.demo import (
    FOCUS_LABEL,
    MAP_CHOICES,
    MORPH_STARTED,
    Analysis,
    MorphCanvas,
    analyse,
    example_labels,
    export_morph_gif,
    known_examples,
    map_picture,
    map_with_colorbar,
    message_markdown,
    morph_done,
    morph_status,
    nearest_timestep,
    resize_map,
    sha256_of,
    slider_ranges,
    step_colorbar,
    step_view,
    summary,
    verdict_markdown,
    with_all_steps,
    with_step_near,
)
from diffad.morph import MorphConfig, MorphGoal, before_after, export_mp4, morph
from diffad.paint import as_rgb, auroc_sentence, canvas, painted_mask, pixel_auroc, place_defect
from diffad.registry import CheckpointRegistry
from diffad.space import hub_source
from diffad.synth import DEFECT_TYPES
from diffad.visualize import anomaly_picture
from photo_input import PhotoInput

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


PAPER_URL = ("https://openaccess.thecvf.com/content/ICCV2023/html/"
             "Lu_Removing_Anomalies_as_Noises_for_Industrial_Defect_Localization_ICCV_2023_paper.html")


def code_link() -> str:
    # On a Space its files are the code; elsewhere the reader is running a checkout already.
    space = os.environ.get("SPACE_ID")
    return f"[Code](https://huggingface.co/spaces/{space}/tree/main)" if space else "Code: the diffad repository (README.md)"


def intro_markdown() -> str:
    return (
        "# diffad — find and explain defects in product photos\n"
        "A diffusion model trained only on defect-free parts of one product treats a defect as noise it would remove: "
        "where it disagrees with the photo, the photo is anomalous.\n\n"
        "1. **Pick an example** below, or choose a category and **upload a photo** of that product.\n"
        "2. **Read the verdict and the map**: red is anomalous, the green outline is the flagged area.\n"
        "3. **Explore**: scrub the diffusion timesteps, move the thresholds, or morph the defect away.\n\n"
        f"[Paper: Lu et al., ICCV 2023]({PAPER_URL}) · {code_link()}"
    )


HOW_IT_WORKS = """
**Anomalies as noise.** A denoising diffusion model is trained only on defect-free images of one product.
To inspect a photo we add a small amount of Gaussian noise (a few *timesteps* t) and ask the model to take one
denoising step. On normal regions the model's step agrees with the true reverse step of the noising process; a
defect looks to the model like noise it should remove, so there the two disagree. The per-pixel **KL divergence**
between the true posterior q(x<sub>t-1</sub>|x<sub>t</sub>,x<sub>0</sub>) and the model's p(x<sub>t-1</sub>|x<sub>t</sub>)
is the pixel score. A head on the model's decoder also predicts pre-trained **EfficientNet features** of the clean
image; where it cannot, the **feature error** is high. Both maps, z-normalised per timestep on held-out normal images,
are summed over timesteps into the anomaly map; its top values give the image score, compared with the scores of
normal images to give a calibrated verdict. **RGB error** (a map choice) is the plain colour difference between the
photo and the model's clean estimate; it is shown for comparison and not used in the score.

**Photos keep their shape.** A category whose model was trained on photos at their own aspect (magnetic_tile) scores
a long photo in overlapping squares along it and averages their maps where they overlap; the others resize the
photo to a square. Either way the map is shown over the photo at its own aspect.

**Does it look like the category at all?** The photo's overall EfficientNet features are compared with those of
normal images of the category; a photo far outside them (another product, noise) gets a warning next to the verdict.

**The morph** walks the image down the gradient of a Gaussian model of normal features (PaDiM-style energy), in
steps that look like diffusion noise, and every few steps lets the diffusion model denoise, only where the map is
high, so normal regions keep their detail. It denoises as if the noise were stronger than those steps added (t = 50
for bottle, 20 for magnetic tiles, chosen on validation defects), so that it repaints what the steps mark. It stops
once the part scores like a normal one: for bottles, like the most normal tenth of held-out normal bottles, a few
loops past a typical one, where an independent check still saw what was left of the defect; for magnetic tiles, like
a typical one. It also stops when three loops in a row have not lowered the score. On 12 real bottle defects it took
away a median three quarters of the defect's contrast with its surroundings, and an independent PatchCore check
passed 92% of the results (58% when they stopped at a typical score). On magnetic tiles it takes away almost
nothing: the score soon stops falling, and the morph then ends on the frame that scored lowest, for a third of real
tile defects the photo itself, so a tile's blowhole or crack stays visible (the repository's benchmarks/results.md).
What is painted in is the diffusion model's own estimate, smoother and grainier than a photo: read the result as how
the model would change the part, not as a photo of a repaired one.

Checkpoints trained on MVTec AD (CC BY-NC-SA 4.0) and Magnetic-Tile (cite Huang et al.).
"""


class InputProblem(Exception):
    """Something about the photo or category the user can fix; shown as a message, raised as gr.Error for the API."""


@functools.lru_cache(maxsize=1)
def examples_by_hash() -> dict:
    return known_examples(EXAMPLES)


def example_rows() -> tuple[list, list[str]]:
    """([photo, category] rows, their labels): every category's examples, normal ones first."""
    entries = sorted(examples_by_hash().values(), key=lambda e: (e["category"], e.get("kind") != "normal", e["file"]))
    return [[e["path"], e["category"]] for e in entries], example_labels(entries)


def _load(registry: CheckpointRegistry, category: str):
    if category not in registry.categories():
        raise InputProblem(f"Unknown category {category!r}. Choose one of: {', '.join(registry.categories())}")
    try:
        return registry.get(category)
    except CheckpointError as exc:
        raise InputProblem(str(exc)) from exc


def _analysis(registry: CheckpointRegistry, image_path, category, progress, known_mask=None,
              all_steps: bool = True) -> Analysis:
    """`known_mask`: the defect's true pixels (a painting's); by default an example's own mask, if it is one.
    `all_steps=False`: only the scored timesteps' panels (`_completed` adds the others)."""
    if not image_path:
        raise InputProblem("Upload a photo or pick an example first.")
    progress(0.1, desc=f"loading {category}")
    detector, origin = _load(registry, category)
    known = examples_by_hash().get(sha256_of(image_path)) if known_mask is None and Path(image_path).is_file() else None
    if known and known.get("mask_path") and known["category"] == category:
        known_mask = np.asarray(read_image(known["mask_path"]).convert("L")) > 127
    progress(0.3, desc="noising and denoising")
    try:
        analysis = analyse(detector, image_path, known_mask=known_mask, ood=registry.feature_distance(category),
                           source=origin, all_steps=all_steps)
    except (DataError, ValueError) as exc:  # the temporary upload path means nothing to the user
        raise InputProblem(str(exc).replace(str(image_path), Path(image_path).name)) from exc
    finally:
        release_memory()
    prune_outputs()
    return analysis


def _completed(registry: CheckpointRegistry, analysis: Analysis) -> Analysis:
    """The analysis with every calibrated timestep's panels."""
    detector, _ = _load(registry, analysis.category)
    try:
        return with_all_steps(detector, analysis)
    finally:
        release_memory()


def analysis_outputs(analysis: Analysis, pending_note: str = "") -> tuple:
    """Every output of an analysis, in ANALYSIS_OUTPUTS order, with the panels at its smallest timestep; the morph's
    previous results are cleared. `pending_note`: what the text under the panels says while timesteps are missing."""
    label = next(iter(MAP_CHOICES))
    ranges = slider_ranges(analysis)
    (_, mask_top, mask_value), (_, image_top, image_value) = ranges["mask"], ranges["image"]
    first = min(analysis.timesteps)
    *pictures, step_text = step_files(analysis, first)
    if not analysis.complete and pending_note:
        step_text += "\n\n" + pending_note
    return (
        analysis,
        verdict_markdown(analysis, image_value, mask_value),
        summary(analysis, image_value, mask_value),
        picture_file(map_with_colorbar(analysis, label, mask_value)),
        gr.update(value=label),
        gr.update(minimum=0.0, maximum=mask_top, value=mask_value),
        gr.update(minimum=0.0, maximum=image_top, value=image_value),
        *pictures,
        step_text,
        # Scrubbing waits for every timestep: until then the panels could only jump between the scored ones.
        gr.update(minimum=min(analysis.calibrated_timesteps), maximum=max(analysis.calibrated_timesteps), value=first,
                  interactive=analysis.complete),
        *MORPH_CLEARED,
    )


STEPS_COMING = "*The other timesteps are on their way: the slider opens when they are here.*"
STEPS_ON_REQUEST = "*The other timesteps are computed when `/timestep` asks for them.*"


def completed_outputs(analysis: Analysis, shown_t: int) -> tuple:
    """What the page changes when the remaining timesteps arrive (the panels still show `shown_t`): the State, the
    text under the panels and the slider, now open. The verdict and thresholds stay as the user may have set them."""
    return (analysis, *[gr.skip()] * 10, step_view(analysis, shown_t)[-1],
            gr.update(minimum=min(analysis.calibrated_timesteps), maximum=max(analysis.calibrated_timesteps), interactive=True),
            *[gr.skip()] * len(MORPH_CLEARED))


def cleared_outputs(message: str) -> tuple:
    """The same outputs with every result of a previous photo removed and `message` where the verdict goes."""
    return (None, message, None, None, gr.update(), gr.update(), gr.update(), None, None, None, None, "", gr.update(),
            *MORPH_CLEARED)


MORPH_CLEARED = (None, None, "", None, None)  # frame, its map, status, before/after, downloads
WELCOME = "Pick an example or upload a photo to see the verdict here."


@gpu
def analyse_api(registry: CheckpointRegistry, image_path, category, progress=gr.Progress()):
    """One result: the verdict with the scored timesteps' panels. `/timestep` computes any other timestep when asked
    (once per session's analysis), so a client that wants only the verdict does not wait for nine more."""
    try:
        return analysis_outputs(_analysis(registry, image_path, category, progress, all_steps=False), STEPS_ON_REQUEST)
    except InputProblem as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


class Requests:
    """The newest analysis each browser session asked for: one that finishes after a newer photo, example or
    category was chosen is dropped instead of showing its results beside the new photo.

    Each analysis has a token and a subject (the photo's content and the category). A call holding an older token
    still counts as current when it is about the newest subject: the two input events a dropdown choice fires return
    their tokens to the page in either order, and the page may keep the older one."""

    def __init__(self, max_sessions: int = 10_000):
        self._latest: OrderedDict[str, tuple[int, tuple]] = OrderedDict()
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        self.max_sessions = max_sessions

    def new(self, session: str, subject: tuple) -> int:
        with self._lock:
            self._latest[session] = (token := next(self._counter)), subject
            self._latest.move_to_end(session)
            while len(self._latest) > self.max_sessions:
                self._latest.popitem(last=False)
            return token

    def current(self, session: str | None, token, subject: tuple):
        """The token under which a call about `subject` may show its results (the newest, for the same subject), or
        None once the session asked for something else (API sessions never do)."""
        with self._lock:
            if session not in self._latest:
                return token
            latest, latest_subject = self._latest[session]
            return latest if token == latest or subject == latest_subject else None

    def superseded(self, session: str | None, token, subject: tuple) -> bool:
        return self.current(session, token, subject) is None


def subject(image_path, category) -> tuple:
    """What an analysis is about: the photo's content (not its temporary path) and the category."""
    readable = bool(image_path) and Path(image_path).is_file()
    return sha256_of(image_path) if readable else image_path, category


REQUESTS = Requests()


def analysing(image_path, category, request: gr.Request) -> tuple:
    """First step of every page analysis, unqueued: the previous results go at once."""
    token = REQUESTS.new(request.session_hash, subject(image_path, category))
    return *cleared_outputs(f"⏳ Analysing as `{category}`…"), gr.update(), token


@gpu
def analyse_page(registry: CheckpointRegistry, image_path, category, token, request: gr.Request, progress=gr.Progress()):
    """Upload, example, category and button: problems become one message where the verdict goes, never a
    red Error on every panel. The outputs end with the photo (an unreadable one is removed) and the request token.
    The verdict, map and scored timesteps come first; the other timesteps follow into the State and the slider.
    Nothing more is shown once the session has asked for another analysis."""
    about = subject(image_path, category)

    def superseded() -> bool:
        return request is not None and REQUESTS.superseded(request.session_hash, token, about)

    analysis = None
    if not image_path:
        outputs = (*cleared_outputs(WELCOME), gr.update())
    else:
        try:
            analysis = _analysis(registry, image_path, category, progress, all_steps=False)
            outputs = (*analysis_outputs(analysis, STEPS_COMING), gr.update())
        except InputProblem as exc:
            unreadable = isinstance(exc.__cause__, DataError)
            hint = " Photos in PNG, JPEG, BMP, TIFF or WebP work." if unreadable else ""
            outputs = (*cleared_outputs(message_markdown(str(exc).rstrip(".") + "." + hint)), None if unreadable else gr.update())
    if superseded():
        yield tuple(gr.skip() for _ in range(len(outputs) + 1))
        return
    yield *outputs, REQUESTS.current(request and request.session_hash, token, about)
    if analysis is not None and not superseded():
        try:
            complete = _completed(registry, analysis)
        except InputProblem as exc:  # the checkpoint went away meanwhile: the verdict stands, the slider keeps 3 stops
            log.warning("no further timesteps for %s: %s", category, exc)
            return
        if not superseded():
            yield *completed_outputs(complete, min(analysis.timesteps)), gr.skip(), gr.skip()


PAINT_KINDS = {kind.replace("_", " "): kind for kind in DEFECT_TYPES}
# The brush's palette: dark and light marks show on both dark and bright parts; the picker offers any other colour.
PAINT_COLOURS = ["#141414", "#f0f0f0", "rgb(120, 80, 40)", "rgb(204, 50, 50)", "rgb(50, 112, 204)"]
NOTHING_PAINTED = ("Nothing is painted yet: draw on the photo with the brush, or choose a defect and click where it "
                   "goes on the picture beside the editor.")


def _editor_images(edited) -> tuple[np.ndarray, np.ndarray]:
    """(the photo under the painting, the painting) as RGB arrays from the image editor's value."""
    if not edited or edited.get("background") is None:
        raise gr.Error("Put a photo in the editor first: start from the current photo or a normal example, or "
                       "upload one into it.", print_exception=False)
    composite = edited.get("composite")
    try:
        return as_rgb(edited["background"]), as_rgb(edited["background"] if composite is None else composite)
    except DataError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def start_painting(source: str, photo, category):
    """The editor and the click target loaded with the current photo ("photo") or a normal example ("example")."""
    if source == "example":
        normals = sorted(e["path"] for e in examples_by_hash().values()
                         if e["category"] == category and e.get("kind") == "normal")
        if not normals:
            raise gr.Error(f"No normal `{category}` example ships with the app: upload a photo into the editor.",
                           print_exception=False)
        photo = normals[0]
    elif not photo:
        raise gr.Error("Upload a photo or pick an example first, or start from a normal example.", print_exception=False)
    try:
        image = canvas(photo)
    except DataError as exc:
        raise gr.Error(str(exc).replace(str(photo), Path(photo).name), print_exception=False) from exc
    return {"background": image, "layers": [], "composite": image}, image


def paint_tab_opened(edited, photo, category):
    """Opening the tab with an empty editor fills it: the current photo, else a normal example of the category."""
    if edited and edited.get("background") is not None:
        return gr.skip(), gr.skip()
    for source in ("photo", "example"):
        try:
            return start_painting(source, photo, category)
        except gr.Error:
            continue
    return gr.skip(), gr.skip()


def place_clicked(edited, kind_label, size, evt: gr.SelectData):
    """A click on the picture beside the editor: one defect of the chosen kind there, as a new layer of the painting."""
    _, painting = _editor_images(edited)
    kind = PAINT_KINDS.get(kind_label)
    if kind is None:
        raise gr.Error(f"Unknown defect {kind_label!r}; choose one of: {', '.join(PAINT_KINDS)}", print_exception=False)
    layers = list(edited.get("layers") or [])
    try:  # each placement a different defect of its kind, the same ones for the same clicks
        result, _, layer = place_defect(painting, kind, tuple(evt.index), seed=len(layers), size=_finite(size, "defect size"))
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    return {"background": edited["background"], "layers": [*layers, layer], "composite": result}, result


@gpu
def analyse_painting(registry: CheckpointRegistry, edited, category, request: gr.Request, progress=gr.Progress()):
    """Analyse my defect: the painting becomes the current photo (the timesteps and the morph then work on it) and is
    analysed with the painted pixels as its known defect; the tab shows the map and how well it finds them."""
    background, painting = _editor_images(edited)
    try:
        mask = painted_mask(background, painting)
    except ValueError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    if not mask.any():
        raise gr.Error(NOTHING_PAINTED, print_exception=False)
    path = picture_file(painting, lossless=True)
    about = subject(path, category)
    token = REQUESTS.new(request.session_hash, about) if request is not None else None
    try:
        analysis = _analysis(registry, path, category, progress, known_mask=mask)
    except InputProblem as exc:
        raise gr.Error(str(exc).replace(path, "your painting"), print_exception=False) from exc
    outputs = analysis_outputs(analysis)
    if request is not None and REQUESTS.superseded(request.session_hash, token, about):  # another photo since
        return tuple(gr.skip() for _ in range(len(outputs) + 4))
    found = auroc_sentence(pixel_auroc(analysis.maps["anomaly"], analysis.known_mask), analysis.known_mask)
    verdict, picture = outputs[1], outputs[3]
    return *outputs, path, picture, f"{verdict}\n\n{found}", token


def redraw(analysis, map_label, mask_threshold, image_threshold):
    """Map with its colour bar, verdict and details for new thresholds or another map (no model call)."""
    if analysis is None:
        raise gr.Error("Analyse an image first.", print_exception=False)
    mask_threshold, image_threshold = _finite(mask_threshold, "mask threshold"), _finite(image_threshold, "verdict threshold")
    try:
        picture = picture_file(map_with_colorbar(analysis, map_label, mask_threshold))
    except DataError as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    return (picture, verdict_markdown(analysis, image_threshold, mask_threshold), summary(analysis, image_threshold, mask_threshold))


def calibrated_threshold(which: str, analysis):
    """↺: a threshold slider back to the category's calibrated value ("mask" or "image")."""
    return gr.update() if analysis is None else slider_ranges(analysis)[which][2]


def scrub(registry: CheckpointRegistry, analysis, t):
    """The panels at the computed timestep nearest to t, and the State when a timestep had to be computed first (an
    API analysis computes only its scored ones; the page's slider opens once all are there)."""
    if analysis is None:
        raise gr.Error("Analyse an image first.", print_exception=False)
    t = _finite(t, "timestep")
    updated = analysis if analysis.complete else _with_step_near(registry, analysis, t)
    return (*step_files(updated, t), gr.skip() if updated is analysis else updated)


@gpu
def _with_step_near(registry: CheckpointRegistry, analysis: Analysis, t: float) -> Analysis:
    try:
        detector, _ = _load(registry, analysis.category)
        return with_step_near(detector, analysis, t)
    except InputProblem as exc:
        raise gr.Error(str(exc), print_exception=False) from exc


def snap_timestep(analysis, t):
    """On release the slider lands on the computed timestep it shows."""
    if analysis is None:
        return gr.update()
    return nearest_timestep(analysis, _finite(t, "timestep"))


@gpu
def run_morph(registry: CheckpointRegistry, image_path, category, step_size, denoise_every, loops, seed,
              focus=MorphConfig.focus, token=0, request: gr.Request = None):
    """`token`: the page's analysis when the morph was asked for; the morph ends once another photo, example or
    category is chosen in that tab, whether or not it had started."""
    chosen = dict(step_size=_finite(step_size, "step size"), denoise_every=int(_finite(denoise_every, "denoise every")),
                  max_loops=int(min(_finite(loops, "loops"), MAX_MORPH_LOOPS)), seed=int(_finite(seed, "seed")),
                  focus=_finite(focus, "focus"))
    if not image_path:
        raise gr.Error("Upload a photo or pick an example first.", print_exception=False)
    try:
        detector, _ = _load(registry, category)
    except InputProblem as exc:
        raise gr.Error(str(exc), print_exception=False) from exc
    config = MorphConfig.for_detector(detector, **chosen)
    session, about = request.session_hash if request is not None else None, subject(image_path, category)
    if REQUESTS.superseded(session, token, about):  # asked for before a new photo, queued since: nothing to show
        yield tuple(gr.skip() for _ in MORPH_CLEARED)
        return
    yield None, None, MORPH_STARTED, None, None  # a new morph: the previous one's results go at once
    frames, shown, goal = [], [], MorphGoal.of(detector, config)
    try:
        for frame in morph(detector, image_path, config):
            if REQUESTS.superseded(session, token, about):
                log.info("morph stopped after %d frames: a new photo was chosen", len(frames))
                # A frame sent just before the choice can reach the page after it cleared the morph: clear again.
                yield MORPH_CLEARED
                return
            frames.append(frame.rgb())
            if len(frames) == 1:
                canvas = MorphCanvas(image_path, frames[0])
            shown.append(canvas(frames[-1]))
            amap = resize_map(frame.anomaly_map, canvas.size)
            status, last = morph_status(frame, goal), frame
            pictures = picture_file(shown[-1]), picture_file(anomaly_picture(shown[-1], amap, detector.calibration.mask_threshold))
            yield *pictures, status, None, None
    except (DataError, ValueError) as exc:
        raise gr.Error(str(exc).replace(str(image_path), Path(image_path).name), print_exception=False) from exc
    except GeneratorExit:  # Gradio closes the generator when the client leaves: no more frames are computed
        log.info("morph stopped after %d frames: the client left", len(frames))
        raise
    finally:
        release_memory()
    folder = Path(tempfile.mkdtemp(dir=_output_folder("morphs")))
    gif, mp4 = export_morph_gif(shown, folder / "morph.gif"), export_mp4(shown, folder / "morph.mp4")
    pair = folder / "before_after.png"
    Image.fromarray(before_after(shown[0], shown[-1])).save(pair)
    yield (*pictures, morph_done(status, last, config, goal), (picture_file(shown[0]), pictures[0]), [str(gif), str(mp4), str(pair)])


def make_app(registry: CheckpointRegistry) -> gr.Blocks:
    """The page: layout here, behaviour in the module-level handlers above (bound to `registry`)."""
    categories = registry.categories()
    default = default_category(categories)
    with gr.Blocks(title="diffad — defects as noise", delete_cache=(1800, 3600)) as demo:
        ui = _layout(categories, default, registry.hub_note or "Using the local checkpoints/ folder.")
        _wire(ui, registry)
    return demo


def _layout(categories, default, source_note) -> SimpleNamespace:
    ui = SimpleNamespace(state=gr.State(None), request=gr.State(0))
    gr.Markdown(intro_markdown(), elem_id="header")
    with gr.Row():
        with gr.Column(scale=2):
            ui.category = gr.Dropdown(categories, value=default, label="Category", elem_id="category")
            # image_mode=None hands the file over untouched: diffad.data.read_image does modes, alpha and EXIF itself.
            ui.photo = PhotoInput(type="filepath", image_mode=None, sources=["upload", "clipboard", "webcam"], label="Photo",
                                  elem_id="photo", height=280)
            ui.analyse = gr.Button("Analyse", variant="primary", elem_id="analyse")
            rows, labels = example_rows()
            ui.examples = gr.Examples(rows, inputs=[ui.photo, ui.category], example_labels=labels, label="Examples",
                                      examples_per_page=max(1, len(rows)), elem_id="examples") if rows else None
            gr.Markdown(f"<small>{source_note}" + ("" if categories else " No checkpoints found: train one with "
                        "`diffad train`.") + "</small>", elem_id="source-note")
        with gr.Column(scale=3):
            ui.verdict = gr.Markdown(WELCOME, elem_id="verdict")
            ui.map_choice = gr.Radio(list(MAP_CHOICES), value=next(iter(MAP_CHOICES)), label="Map",
                                     info="Combined is what the verdict uses; RGB error is plain colour difference.")
            ui.result = gr.Image(label="Anomaly map (green outline: flagged area; white: the example's known defect)",
                                 interactive=False, elem_id="result", height=460, buttons=["download", "fullscreen"])
            with gr.Row():
                # Gradio's own ↺ would go back to these placeholders: ours go back to the calibrated values.
                with gr.Column(min_width=220):
                    ui.mask_threshold = gr.Slider(0, 20, value=5, step=0.01, label="Mask threshold (z units)",
                                                  elem_id="mask-threshold", buttons=[])
                    ui.mask_reset = gr.Button("↺ calibrated", elem_id="mask-reset", size="sm")
                with gr.Column(min_width=220):
                    ui.image_threshold = gr.Slider(0, 40, value=10, step=0.01, label="Verdict threshold (score)",
                                                   elem_id="image-threshold", buttons=[])
                    ui.image_reset = gr.Button("↺ calibrated", elem_id="image-reset", size="sm")
            with gr.Accordion("Details", open=False):
                ui.details = gr.JSON(show_label=False, elem_id="details")
    with gr.Tab("Diffusion timesteps", elem_id="timesteps-tab"):
        ui.t_slider = gr.Slider(5, 500, value=5, step=5, label="Timestep t", elem_id="t-slider", buttons=[],
                                info="Computed at t = 5, 10, 20, 50 and every 50 up to 500; other values show the nearest.")
        with gr.Row():
            ui.xt = gr.Image(label="Noised input x_t", interactive=False, elem_id="xt")
            ui.x0 = gr.Image(label="Model's clean estimate x̂0", interactive=False, elem_id="x0")
            ui.kl = gr.Image(label="Per-pixel KL (z)", interactive=False, elem_id="kl")
            ui.feat = gr.Image(label="Feature error (z)", interactive=False, elem_id="feat")
        gr.Image(step_colorbar(), show_label=False, interactive=False, height=60, container=False, buttons=[])
        ui.step_text = gr.Markdown(elem_id="step-text")
    with gr.Tab("Morph to normal", elem_id="morph-tab"):
        with gr.Row():
            ui.step_size = gr.Slider(0.005, 0.1, value=MorphConfig.step_size, step=0.005, label="Step size s")
            ui.denoise_every = gr.Slider(1, 20, value=MorphConfig.denoise_every, step=1, label="Denoise every N_d steps")
            ui.loops = gr.Slider(1, MAX_MORPH_LOOPS, value=MorphConfig.max_loops, step=1, label="Max loops", elem_id="loops")
            ui.seed = gr.Number(MorphConfig.seed, precision=0, minimum=0, maximum=2**32 - 1, label="Seed")
            ui.focus = gr.Slider(0, 4, value=MorphConfig.focus, step=0.5, label=f"{FOCUS_LABEL} "
                                 "(0: change every pixel, as the paper's morph does)", elem_id="focus")
        ui.morph = gr.Button("Morph", variant="primary", elem_id="morph")
        ui.morph_status = gr.Markdown(elem_id="morph-status")
        with gr.Row():
            ui.frame = gr.Image(label="Current frame", interactive=False, elem_id="frame")
            ui.frame_map = gr.Image(label="Its anomaly map", interactive=False, elem_id="frame-map")
        ui.compare = gr.ImageSlider(label="Before / after", interactive=False, elem_id="compare")
        ui.downloads = gr.File(label="Download (GIF, MP4, before/after PNG)", file_count="multiple", interactive=False,
                               elem_id="downloads")
    _paint_tab(ui)
    with gr.Accordion("How it works", open=False):
        gr.Markdown(HOW_IT_WORKS)
    ui.api_trigger = gr.Button(visible=False)  # /analyse for API clients: errors raised, not shown as a message
    return ui


def _paint_tab(ui: SimpleNamespace) -> None:
    with gr.Tab("Paint a defect", elem_id="paint-tab") as ui.paint_tab:
        gr.Markdown("Make your own defect: paint on the photo with the brush, or choose a kind of defect and click "
                    "where it goes on the picture beside the editor. What you change is the ground truth, and the "
                    "analysis says how well the map finds it. Your painting becomes the photo above, so the timesteps "
                    "and the morph then work on it.")
        with gr.Row():
            ui.paint_from_photo = gr.Button("Start from the current photo", size="sm", elem_id="paint-from-photo")
            ui.paint_from_example = gr.Button("Start from a normal example", size="sm", elem_id="paint-from-example")
        with gr.Row():
            # PNG and no crop or resize: the photo under the painting must stay pixel for pixel what it was, since
            # the painted pixels are found by comparing the two.
            ui.editor = gr.ImageEditor(type="numpy", image_mode="RGBA", format="png", transforms=(),
                                       sources=["upload", "clipboard"], brush=gr.Brush(colors=PAINT_COLOURS),
                                       label="Your painting (Layers: hide or delete a placed defect)",
                                       elem_id="paint-editor", height=460, scale=3)
            with gr.Column(scale=2):
                ui.paint_kind = gr.Dropdown(list(PAINT_KINDS), value=next(iter(PAINT_KINDS)), label="Defect to place",
                                            elem_id="paint-kind")
                ui.paint_size = gr.Slider(0.1, 1.0, value=0.5, step=0.05, label="Its size", elem_id="paint-size")
                ui.click_target = gr.Image(label="Click here to place it", interactive=False, elem_id="paint-click",
                                           height=300, buttons=[])
        ui.paint_analyse = gr.Button("Analyse my defect", variant="primary", elem_id="paint-analyse")
        ui.paint_text = gr.Markdown(elem_id="paint-text")
        ui.paint_map = gr.Image(label="Anomaly map (white outline: what you painted; green: flagged area)",
                                interactive=False, elem_id="paint-map", height=460)


def bind(handler, registry: CheckpointRegistry):
    """`handler` with the registry filled in, keeping the signature and type hints Gradio reads (gr.Request,
    gr.Progress); functools.partial hides the hints."""

    if inspect.isgeneratorfunction(handler):  # Gradio streams only what it can see is a generator function
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            yield from handler(registry, *args, **kwargs)
    else:
        @functools.wraps(handler)
        def bound(*args, **kwargs):
            return handler(registry, *args, **kwargs)

    signature = inspect.signature(handler)
    bound.__signature__ = signature.replace(parameters=list(signature.parameters.values())[1:])
    return bound


def _wire(ui: SimpleNamespace, registry: CheckpointRegistry) -> None:
    outputs = [ui.state, ui.verdict, ui.details, ui.result, ui.map_choice, ui.mask_threshold, ui.image_threshold,
               ui.xt, ui.x0, ui.kl, ui.feat, ui.step_text, ui.t_slider,
               ui.frame, ui.frame_map, ui.morph_status, ui.compare, ui.downloads]
    inputs = [ui.photo, ui.category]
    ui.api_trigger.click(bind(analyse_api, registry), inputs, outputs, api_name="analyse", concurrency_id="model")
    ui.morph.click(bind(run_morph, registry),
                   [ui.photo, ui.category, ui.step_size, ui.denoise_every, ui.loops, ui.seed, ui.focus, ui.request],
                   [ui.frame, ui.frame_map, ui.morph_status, ui.compare, ui.downloads], api_name="morph", concurrency_id="model")
    page = bind(analyse_page, registry)
    page_outputs = outputs + [ui.photo, ui.request]  # an unreadable upload is removed, not left as a broken picture
    # Clear at once (no queue), then analyse: a new photo or category never sits beside the old results.
    # A morph of the previous photo stops too, at its next frame: run_morph ends once the session's analysis token
    # changes. Not Gradio's `cancels`: a cancelled stream leaves a red "Error" on the morph status, and the cancels of
    # a .then listener (the examples' path) are never fired.
    triggers = [ui.photo.upload, ui.analyse.click, ui.category.input]
    if ui.examples is not None:  # an example sets the photo and the category, then this runs once
        triggers.append(ui.examples.load_input_event.then)
    for trigger in triggers:
        trigger(analysing, inputs, page_outputs, queue=False, show_progress="hidden", api_visibility="private").then(
            page, inputs + [ui.request], page_outputs, api_visibility="private", concurrency_id="model", trigger_mode="always_last",
            show_progress_on=[ui.result])
    ui.photo.clear(lambda: cleared_outputs(WELCOME), None, outputs, queue=False, api_visibility="private")
    views = [ui.result, ui.verdict, ui.details]
    redraw_inputs = [ui.state, ui.map_choice, ui.mask_threshold, ui.image_threshold]
    ui.mask_threshold.change(redraw, redraw_inputs, views, api_name="threshold", concurrency_limit=None, show_progress="hidden")
    for trigger in (ui.map_choice.change, ui.image_threshold.change):
        trigger(redraw, redraw_inputs, views, api_visibility="private", concurrency_limit=None, show_progress="hidden")
    for which, button, slider in (("mask", ui.mask_reset, ui.mask_threshold), ("image", ui.image_reset, ui.image_threshold)):
        button.click(functools.partial(calibrated_threshold, which), [ui.state], [slider], api_visibility="private", queue=False)
    ui.t_slider.change(bind(scrub, registry), [ui.state, ui.t_slider], [ui.xt, ui.x0, ui.kl, ui.feat, ui.step_text, ui.state], api_name="timestep",
                       concurrency_limit=None, show_progress="hidden")
    ui.t_slider.release(snap_timestep, [ui.state, ui.t_slider], [ui.t_slider], api_visibility="private", queue=False)
    _wire_paint(ui, registry, outputs)


def _wire_paint(ui: SimpleNamespace, registry: CheckpointRegistry, outputs: list) -> None:
    painting = [ui.editor, ui.click_target]
    # One queue, in order: a start button clicked right after opening the tab must not be overwritten by the tab's
    # own fill (unqueued, the two could return in either order; seen in Chromium on a loaded machine). Queued, though
    # quick, also because the gr.Error of an unqueued event never reaches the page.
    loads = {"api_visibility": "private", "concurrency_id": "paint_load", "concurrency_limit": 1}
    for source, button in (("photo", ui.paint_from_photo), ("example", ui.paint_from_example)):
        button.click(functools.partial(start_painting, source), [ui.photo, ui.category], painting, **loads)
    ui.paint_tab.select(paint_tab_opened, [ui.editor, ui.photo, ui.category], painting, show_progress="hidden", **loads)
    # The click target follows the brush, so that defects are placed knowing where the paint is.
    ui.editor.change(lambda edited: edited and edited["composite"], [ui.editor], [ui.click_target],
                     api_visibility="private", queue=False, show_progress="hidden")
    ui.click_target.select(place_clicked, [ui.editor, ui.paint_kind, ui.paint_size], painting, api_visibility="private",
                           show_progress="hidden")
    # Its results replace the current photo's; a morph of that photo stops as for a new photo (a new token).
    ui.paint_analyse.click(bind(analyse_painting, registry), [ui.editor, ui.category],
                           outputs + [ui.photo, ui.paint_map, ui.paint_text, ui.request], api_name="paint", concurrency_id="model",
                           show_progress_on=[ui.paint_map])


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


def picture_file(picture: np.ndarray, lossless: bool = False) -> str:
    """A file with this picture, named by its content and written atomically: JPEG for what is only looked at
    (quality 92 without chroma subsampling, so thin coloured outlines stay sharp: a twentieth of PNG's encoding time
    and a quarter of its size), PNG for what is analysed again (a painting).

    Gradio rewrites its cached copy of an array output in place, so two users getting the same picture (the same
    example, colour bar or timestep) could be served a half-written file; a file output is copied atomically instead.
    """
    buffer = io.BytesIO()
    if lossless:
        Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
    else:
        Image.fromarray(picture).save(buffer, format="JPEG", quality=92, subsampling=0)
    data = buffer.getvalue()
    path = _output_folder("pictures") / f"{hashlib.sha256(data).hexdigest()[:32]}.{'png' if lossless else 'jpg'}"
    try:
        os.utime(path)  # reused: keep it from being pruned
    except FileNotFoundError:
        fd, staging = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(staging, path)
    return str(path)


def step_files(analysis, t) -> tuple:
    *pictures, text = step_view(analysis, t)
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
