"""The Gradio app: through gradio_client against a launched server, and its handlers called directly."""
import ast
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import BOTTLE, CHECKPOINTS, MAGNETIC_TILE, ROOT

EXAMPLES = ROOT / "examples" / "bottle"
needs_both = pytest.mark.skipif(not (BOTTLE.is_dir() and MAGNETIC_TILE.is_dir()),
                                reason=f"real data not found at {BOTTLE} and {MAGNETIC_TILE}")
# gradio_client drops the State: the /analyse outputs in order.
OUT = {name: i for i, name in enumerate(("verdict", "details", "map", "map_choice", "mask", "image", "xt", "x0", "kl",
                                         "feature", "step_text", "t", "frame", "frame_map", "morph_status", "compare",
                                         "downloads"))}


def example_images(dataset: Path):
    return sorted((dataset / "test" / "hole").iterdir())[0], sorted((dataset / "test" / "good").iterdir())[0]


def test_analyse_scrub_threshold_and_morph(client, tiny_dataset):
    from gradio_client import handle_file

    normal_details = client.predict(handle_file(str(EXAMPLES / "normal_0.png")), "bottle", api_name="/analyse")[1]
    result = client.predict(handle_file(str(EXAMPLES / "crack.png")), "bottle", api_name="/analyse")
    details = result[OUT["details"]]
    assert details["category"] == "bottle" and details["verdict"] == "anomalous"
    assert details["score"] > normal_details["score"]
    assert details["checkpoint"].startswith("local:") and "Hub unavailable" in details["checkpoint"]
    assert Path(result[OUT["map"]]).is_file()
    # A new analysis leaves nothing of a previous morph on screen.
    assert all(result[OUT[k]] in (None, "", []) for k in ("frame", "frame_map", "morph_status", "compare", "downloads"))

    # The state holds the last analysis: scrubbing (in t units) and thresholds answer without recomputation.
    views = client.predict(150, api_name="/timestep")
    assert all(Path(p).is_file() for p in views[:4]) and "t = 150" in views[4]
    assert "t = 50" in client.predict(47, api_name="/timestep")[4]
    # The slider spans every calibrated timestep from the start, though /analyse computed only the scored ones.
    assert "**t = 5**" in client.predict(5, api_name="/timestep")[4] and "**t = 500**" in client.predict(500, api_name="/timestep")[4]
    score = details["score"]
    _, verdict, shown = client.predict("Combined", 0.5, score * 1.1, api_name="/threshold")
    assert "Normal" in verdict and "Flagged area: 0.00%" not in verdict and shown["verdict"] == "normal"
    _, verdict, shown = client.predict("Feature error", 0.5, 0.0, api_name="/threshold")
    assert "Anomalous" in verdict and shown["verdict"] == "anomalous"

    # "part" exists only in the (offline) Hub cache.
    defective, _ = example_images(tiny_dataset)
    part = client.predict(handle_file(str(defective)), "part", api_name="/analyse")[1]
    assert part["checkpoint"] == "Hub: someone/diffad-checkpoints/part"

    job = client.submit(handle_file(str(defective)), "part", 0.02, 2, 2, 0, api_name="/morph")
    outputs = job.result(timeout=300)
    # It says what was reached, judged against a typical normal part (and what to try when loops ran out).
    assert "finished" in outputs[2] and ("scores like a typical normal part" in outputs[2] or "Try more loops" in outputs[2])
    assert len(outputs[4]) == 3 and all(Path(f).stat().st_size > 0 for f in outputs[4])


def test_details_never_name_server_paths(client):
    from gradio_client import handle_file

    details = client.predict(handle_file(str(EXAMPLES / "hole.png")), "bottle", api_name="/analyse")[1]
    text = json.dumps(details)
    assert str(ROOT) not in text and "/tmp" not in text and details["checkpoint"].startswith("local: checkpoints/bottle")


# In-process: the handlers are module-level functions taking the registry.
@pytest.fixture(scope="module")
def registry():
    from diffad.registry import CheckpointRegistry

    return CheckpointRegistry(local_root=CHECKPOINTS)


def no_progress(*args, **kwargs):
    pass


PAGE = ["state", *OUT, "photo", "request"]


def page_results(registry, path, category="bottle"):
    """What analyse_page yields, each result's outputs by name (with the State first and the photo last)."""
    import app

    results = list(app.analyse_page(registry, str(path) if path else None, category, 0, None, no_progress))
    assert all(len(outputs) == len(PAGE) for outputs in results)
    return [dict(zip(PAGE, outputs)) for outputs in results]


def page(registry, path, category="bottle"):
    """The page after an analysis: the first result's outputs with the State of the last (every timestep)."""
    results = page_results(registry, path, category)
    return results[0] | {"state": results[-1]["state"]}


def test_the_verdict_comes_first_and_the_other_timesteps_follow(registry):
    """The first result is the whole verdict, with the scored timesteps' panels; the second adds the other timesteps
    to the State and the slider and touches nothing else (a scrub or threshold moved meanwhile stays)."""
    from diffad.demo import analyse

    first, second = page_results(registry, EXAMPLES / "crack.png")
    detector, _ = registry.get("bottle")
    assert first["state"].timesteps == list(detector.scoring.timesteps) and "t = 20" in first["step_text"]
    assert first["t"]["value"] == 20 and first["t"]["interactive"] is False and "on their way" in first["step_text"]
    assert Path(first["map"]).is_file() and "Anomalous" in first["verdict"]
    complete = second["state"]
    assert complete.complete and complete.timesteps == list(detector.calibration.timesteps)
    assert second["t"] == {"__type__": "update", "minimum": 5, "maximum": 500, "interactive": True}
    assert "t = 20" in second["step_text"] and "on their way" not in second["step_text"]
    skipped = [name for name in PAGE if name not in ("state", "t", "step_text")]
    assert all(second[name] == {"__type__": "update"} for name in skipped), second
    # Each timestep's panels are those of one analysis of every timestep at once.
    whole = analyse(detector, EXAMPLES / "crack.png")
    assert whole.score == pytest.approx(complete.score) and whole.timesteps == complete.timesteps
    for ours, reference in zip(complete.steps, whole.steps):
        for view in ("xt", "x0_hat", "kl", "feature"):
            assert np.abs(ours[view].astype(int) - reference[view].astype(int)).mean() < 0.5, (ours["t"], view)


def test_the_api_computes_a_timestep_when_the_slider_asks_for_it(registry):
    """/analyse returns the verdict with the scored timesteps only; /timestep computes another one once, into the
    State, equal to what an analysis of every timestep shows."""
    import app
    from diffad.demo import analyse

    state, *_ = app.analyse_api(registry, str(EXAMPLES / "crack.png"), "bottle", no_progress)
    detector, _ = registry.get("bottle")
    assert state.timesteps == list(detector.scoring.timesteps) and not state.complete
    *pictures, text, state = app.scrub(registry, state, 140)  # nearest calibrated: 150
    assert "t = 150" in text and state.timesteps == sorted([*detector.scoring.timesteps, 150])
    whole = analyse(detector, EXAMPLES / "crack.png")
    reference = whole.steps[whole.timesteps.index(150)]
    ours = state.steps[state.timesteps.index(150)]
    for view in ("xt", "x0_hat", "kl", "feature"):
        assert np.abs(ours[view].astype(int) - reference[view].astype(int)).mean() < 0.5, view
    # Asked again, nothing is computed and the State is left as it is.
    assert app.scrub(registry, state, 150)[-1] == {"__type__": "update"}
    for t in detector.calibration.timesteps:
        *_, update = app.scrub(registry, state, t)
        state = state if isinstance(update, dict) else update
    assert state.complete and state.model_input is None


def test_an_analysis_overtaken_by_a_newer_request_shows_nothing(registry):
    import app

    session = SimpleNamespace(session_hash="s1")
    crack = str(EXAMPLES / "crack.png")
    old = app.REQUESTS.new("s1", app.subject(crack, "bottle"))
    app.REQUESTS.new("s1", app.subject(str(EXAMPLES / "normal_0.png"), "bottle"))  # the user picked another example
    (outputs,) = app.analyse_page(registry, crack, "bottle", old, session, no_progress)
    assert all(isinstance(o, dict) and o.get("__type__") == "update" and len(o) == 1 for o in outputs), outputs[:3]
    # Overtaken after its verdict: the other timesteps are neither computed nor shown.
    results = app.analyse_page(registry, crack, "bottle", app.REQUESTS.new("s1", app.subject(crack, "bottle")), session,
                               no_progress)
    assert "Anomalous" in next(results)[1]
    app.REQUESTS.new("s1", app.subject(crack, "magnetic_tile"))  # the same photo under another category
    assert list(results) == []


def test_two_events_of_one_choice_returning_out_of_order_still_show_the_analysis(registry):
    """A dropdown choice fires two input events; the page can keep the older token of the two. Seen in Chromium as
    a verdict stuck at "Analysing as magnetic_tile…" after a category switch."""
    import app

    session = SimpleNamespace(session_hash="s2")
    crack = str(EXAMPLES / "crack.png")
    older = app.REQUESTS.new("s2", app.subject(crack, "bottle"))
    newer = app.REQUESTS.new("s2", app.subject(crack, "bottle"))
    outputs = next(app.analyse_page(registry, crack, "bottle", older, session, no_progress))
    assert "Anomalous" in outputs[1]
    assert outputs[-1] == newer  # the page now holds the newest token, so a morph of this photo is not stopped
    morph = app.run_morph(registry, crack, "bottle", 0.02, 5, 1, 0, 2.0, older, request=session)
    assert next(morph)[2] == app.MORPH_STARTED


def test_one_verdict_when_the_threshold_moves(registry):
    import app

    analysis = page(registry, EXAMPLES / "crack.png")["state"]
    above = analysis.score * 1.5
    _, verdict, details = app.redraw(analysis, "Combined", analysis.mask_threshold, above)
    assert "Normal" in verdict and "Anomalous" not in verdict and details["verdict"] == "normal"
    assert f"at or below the verdict threshold **{above:.2f}**" in verdict and "higher than" not in verdict
    _, verdict, details = app.redraw(analysis, "Combined", analysis.mask_threshold, analysis.image_threshold)
    assert "Anomalous" in verdict and details["verdict"] == "anomalous"


def test_reset_buttons_restore_the_calibrated_thresholds(registry):
    import app

    analysis = page(registry, EXAMPLES / "crack.png")["state"]
    assert app.calibrated_threshold("mask", analysis) == round(analysis.mask_threshold, 2)
    assert app.calibrated_threshold("image", analysis) == round(analysis.image_threshold, 2)
    assert abs(analysis.image_threshold - 10) > 0.1 and abs(analysis.mask_threshold - 5) > 0.1  # not the placeholders


def test_mask_slider_spans_the_colour_bar_which_marks_the_threshold(registry):
    from diffad.demo import map_colorbar, slider_ranges
    from diffad.visualize import display_range

    out = page(registry, EXAMPLES / "crack.png")
    analysis = out["state"]
    low, high, value = slider_ranges(analysis)["mask"]
    assert (low, high) == tuple(round(v, 2) for v in display_range(analysis.mask_threshold))
    assert out["mask"]["maximum"] == high and out["mask"]["value"] == value
    marked, unmarked = (map_colorbar(analysis, "Combined", t, 512) for t in (value, high + 1))
    assert (marked != unmarked).any()  # the ▲ at the threshold; none when it is off the bar


def test_bad_files_in_the_page_give_one_message_and_no_error(registry, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image")
    for path in (fake, tmp_path / "notes.txt"):
        path.write_text("hello")
        out = page(registry, path)
        assert "Cannot analyse" in out["verdict"] and path.name in out["verdict"] and str(tmp_path) not in out["verdict"]
        assert out["state"] is None and out["map"] is None and out["photo"] is None  # the broken upload goes too
    assert "Pick an example" in page(registry, None)["verdict"]


@pytest.mark.parametrize("side", [1, 8])
def test_tiny_images_get_a_word_about_their_size(registry, tmp_path, side):
    path = tmp_path / f"{side}.png"
    Image.fromarray(np.full((side, side, 3), 200, np.uint8)).save(path)
    out = page(registry, path)
    assert f"only {side}×{side} px" in out["verdict"] and out["details"]["photo_size"] == [side, side]


def test_noise_does_not_look_like_the_category(registry, tmp_path):
    path = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
    out = page(registry, path)
    assert "does not look like a `bottle` photo" in out["verdict"] and out["details"]["looks_like_category"] is False


def test_shipped_examples_look_like_their_category(registry):
    for category in ("bottle", "magnetic_tile"):
        for path in sorted((ROOT / "examples" / category).glob("*.png")):
            details = page(registry, path, category)["details"]
            assert details["looks_like_category"] is True, (path, details)


@needs_both
def test_out_of_distribution_note_on_real_photos(registry):
    """Real photos: the other category is flagged, the category's own normal and defective test photos are not.
    The stored reports hold the same rates on images the threshold was not chosen on."""
    from diffad.data import list_images
    from diffad.ood import FeatureDistance

    for category, own, other in (("bottle", BOTTLE, MAGNETIC_TILE), ("magnetic_tile", MAGNETIC_TILE, BOTTLE)):
        report = FeatureDistance.load(CHECKPOINTS / category / "ood.safetensors").report
        flagged = report["flagged_on_unseen"]
        assert flagged["held_out_normals"] <= 0.02 and flagged["own_defective_test_images"] <= 0.05
        assert flagged["other_category"] >= 0.98 and flagged["uniform_noise"] == 1 and flagged["flat_colour"] == 1
        for path in list_images(own / "test" / "good")[:2] + list_images(own / "test" / sorted(
                p.name for p in (own / "test").iterdir() if p.name != "good")[0])[:2]:
            assert page(registry, path, category)["details"]["looks_like_category"] is True, path
        for path in list_images(other / "test" / "good")[:2]:
            out = page(registry, path, category)
            assert out["details"]["looks_like_category"] is False and "does not look like" in out["verdict"], path


def test_maps_keep_the_photo_aspect(registry, tmp_path):
    wide = tmp_path / "wide.png"
    Image.open(EXAMPLES / "crack.png").convert("RGB").resize((592, 247)).save(wide)
    out = page(registry, wide)
    height, width = out["state"].image.shape[:2]
    assert abs(width / height - 592 / 247) < 0.02 and max(width, height) == 512
    picture = np.asarray(Image.open(out["map"]))
    assert picture.shape[1] == 512 and picture.shape[0] > height  # the map, then its colour bar under it
    assert np.asarray(Image.open(out["xt"])).shape[1] > np.asarray(Image.open(out["xt"])).shape[0]


def test_morph_clears_old_results_first_and_exports_a_steady_gif_at_the_input_size(registry, tmp_path):
    import app
    from diffad import demo

    photo = tmp_path / "large.png"
    Image.open(EXAMPLES / "crack.png").convert("RGB").resize((512, 512), Image.BICUBIC).save(photo)
    updates = list(app.run_morph(registry, str(photo), "bottle", 0.02, 5, 2, 0, 2.0))
    assert updates[0][3] is None and updates[0][4] is None  # before/after and downloads go at once
    assert all(u[3] is None and u[4] is None for u in updates[:-1])
    gif = Image.open(updates[-1][4][0])
    assert gif.size == (512, 512)
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    loops = len(updates) - 3  # not the clearing update, the first frame and the final summary
    assert gif.n_frames >= loops * demo.GIF_FADE_FRAMES
    # Steady in between; the first and last frames are held (identical frames merge into one long one).
    assert set(durations[1:-1]) == {demo.GIF_FRAME_MS}
    assert min(durations[0], durations[-1]) >= demo.GIF_HOLD_FRAMES * demo.GIF_FRAME_MS


def test_a_new_photo_stops_a_morph_of_the_previous_one(registry):
    import gradio as gr

    import app

    session = SimpleNamespace(session_hash="user-1")
    crack = str(EXAMPLES / "crack.png")
    token = app.REQUESTS.new(session.session_hash, app.subject(crack, "bottle"))  # the page's analysis of that photo
    running = app.run_morph(registry, str(EXAMPLES / "crack.png"), "bottle", 0.02, 5, 4, 0, 2.0, token, request=session)
    assert next(running)[2] == app.MORPH_STARTED
    assert next(running)[2].startswith("Step 0")
    app.REQUESTS.new(session.session_hash, app.subject(str(EXAMPLES / "hole.png"), "bottle"))  # another photo
    # No further frame, summary or downloads: one last update clears a frame that reached the page after its clearing.
    assert list(running) == [app.MORPH_CLEARED]
    # A morph asked for before the new photo, still waiting in the queue, changes nothing and computes nothing.
    queued = app.run_morph(registry, str(EXAMPLES / "crack.png"), "bottle", 0.02, 5, 4, 0, 2.0, token, request=session)
    assert list(queued) == [tuple(gr.skip() for _ in app.MORPH_CLEARED)]


def test_importing_the_app_has_no_side_effects():
    def sources():
        return {p: p.read_bytes() for p in ROOT.iterdir() if p.suffix in (".py", ".pyi")}

    files = sources()
    code = "import PIL.Image as I; before = I.MAX_IMAGE_PIXELS; import app; assert I.MAX_IMAGE_PIXELS == before"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=300)
    assert sources() == files  # Gradio's .pyi stub is committed as it writes it


def test_no_function_in_the_app_layers_is_over_120_lines():
    for path in (ROOT / "app.py", ROOT / "diffad" / "demo.py", ROOT / "diffad" / "ood.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                assert node.end_lineno - node.lineno < 120, f"{path.name}:{node.name}"


def test_pictures_shared_by_concurrent_users_are_never_half_written():
    import threading

    import app

    picture = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = app.picture_file(picture, lossless=True)
    errors, stop = [], threading.Event()

    def writer():
        for _ in range(40):
            assert app.picture_file(picture, lossless=True) == path

    def reader():
        while not stop.is_set():
            try:
                assert np.array_equal(np.asarray(Image.open(path)), picture)
            except Exception as exc:  # collected: a reader must never see a partial file
                errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer) for _ in range(4)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop.set()
    for thread in readers:
        thread.join()
    assert not errors


def test_the_morph_says_what_it_reached_and_what_to_try_when_loops_run_out():
    from types import SimpleNamespace

    from diffad.demo import FOCUS_LABEL, morph_done, morph_status
    from diffad.morph import MorphConfig, MorphGoal

    at_median = MorphGoal(threshold=28.0, typical=14.7, stop=14.7, stop_quantile=0.5)
    past_median = MorphGoal(threshold=28.0, typical=14.7, stop=8.4, stop_quantile=0.1)

    def frame(typical, normal, stalled=False, reached=None, lowest_loop=13):
        return SimpleNamespace(loop=16, gradient_steps=80, score=5.0, is_typical=typical, is_normal=normal,
                               stalled=stalled, reached_stop=typical if reached is None else reached,
                               lowest_score=5.25, lowest_loop=lowest_loop)

    def end(typical, normal, stalled=False, goal=at_median, reached=None, lowest_loop=13):
        return morph_done("status", frame(typical, normal, stalled, reached, lowest_loop), MorphConfig(max_loops=16), goal)

    assert "scores like a typical normal part" in end(True, True) and "Try" not in end(True, True)
    # The model's score is what was reached; the repainted region is the model's texture, not a photo's.
    assert "model's own texture" in end(True, True)
    assert "under the verdict threshold, but still above a typical normal part" in end(False, True) and "Try more loops" in end(False, True)
    assert "still scores as anomalous" in end(False, False) and "Try more loops" in end(False, False)
    assert f"set “{FOCUS_LABEL}” to 0" in end(False, False)  # the control the page shows, by its label
    stalled = end(False, False, stalled=True)
    assert "finished after 16 loops, stalled: no loop after loop 13 brought the score below 5.25, so the morph ends on that loop's frame" in stalled
    assert "try a smaller step size, though it is not sure to help" in stalled and "limit" not in stalled
    assert "finished after 3 loops, stalled: no loop lowered the score below the photo's own 5.25, so the morph ends on the photo itself" in end(
        False, False, stalled=True, lowest_loop=0)
    # A category that stops past a typical score says which score it reached, and when it fell short of its aim.
    assert "scores like the most normal 10% of normal parts, past a typical one" in end(True, True, goal=past_median)
    short = end(True, True, stalled=True, goal=past_median, reached=False)
    assert "stalled: no loop after loop 13" in short and "not yet like the most normal 10% (8.40)" in short
    assert "at the 16-loop limit. The part scores like a typical normal part" in end(True, True, goal=past_median, reached=False)
    going_on = morph_status(frame(True, True, reached=False), past_median)
    assert "scores like a typical normal part ✅; going on to 8.40" in going_on and "typical normal part scores 14.70" in going_on
    assert "most normal 10% of normal parts ✅" in morph_status(frame(True, True), past_median)
    assert "going on" not in morph_status(frame(True, True), at_median)
    assert "going on" not in morph_status(frame(True, True, stalled=True, reached=False), past_median)


def painting_of(photo: np.ndarray, painted: np.ndarray) -> dict:
    """The image editor's value (type numpy, RGBA) for a photo and its painted version, nothing in layers."""
    def rgba(a):
        return np.dstack([a, np.full(a.shape[:2], 255, np.uint8)])

    return {"background": rgba(photo), "layers": [], "composite": rgba(painted)}


def test_paint_a_defect_through_the_api_and_scrub_it(client, tmp_path):
    import re

    from gradio_client import handle_file

    from diffad.synth import add_defect, textured_part

    photo = textured_part(64, seed=300)
    painted, _ = add_defect(photo, "colour_spot", seed=0, size=1.0, centre=(40, 24))
    for name, picture in (("photo.png", photo), ("painted.png", painted)):
        Image.fromarray(picture).save(tmp_path / name)
    value = {"background": handle_file(str(tmp_path / "photo.png")), "layers": [],
             "composite": handle_file(str(tmp_path / "painted.png"))}
    result = client.predict(value, "part", api_name="/paint")
    assert len(result) == len(OUT) + 3
    *analysis, photo_path, paint_map, text = result
    details = analysis[OUT["details"]]
    assert details["checkpoint"] == "Hub: someone/diffad-checkpoints/part"
    assert ("Anomalous" if details["verdict"] == "anomalous" else "Normal") in text
    found = re.search(r"The map finds your painted defect with pixel AUROC \*\*([01]\.\d\d)\*\* \(1\.0 = perfect, 0\.5 = chance\)", text)
    assert found and 0 <= float(found.group(1)) <= 1, text
    assert Path(paint_map).is_file() and paint_map.endswith(Path(analysis[OUT["map"]]).name)
    # The painting became the photo: the timestep panels (and the morph) now work on it.
    assert np.array_equal(np.asarray(Image.open(photo_path).convert("RGB")), painted)
    assert "t = 20" in client.predict(20, api_name="/timestep")[4]

    same = {"background": value["background"], "layers": [], "composite": value["background"]}
    with pytest.raises(Exception, match="Nothing is painted yet"):
        client.predict(same, "part", api_name="/paint")


def test_painting_without_a_photo_or_paint_gives_a_clear_error(registry):
    import gradio as gr

    import app

    photo = np.asarray(Image.open(EXAMPLES / "normal_0.png").convert("RGB"))
    for edited, message in ((None, "Put a photo in the editor first"),
                            ({"background": None, "layers": [], "composite": None}, "Put a photo in the editor first"),
                            (painting_of(photo, photo), "Nothing is painted yet"),
                            (painting_of(photo, photo[:200]), "256×200 px but the photo under it is 256×256 px")):
        with pytest.raises(gr.Error, match=message):
            app.analyse_painting(registry, edited, "bottle", None, no_progress)
    with pytest.raises(gr.Error, match="Upload a photo or pick an example first"):
        app.start_painting("photo", None, "bottle")
    with pytest.raises(gr.Error, match="No normal `part` example"):
        app.start_painting("example", None, "part")
    with pytest.raises(gr.Error, match="Put a photo in the editor first"):
        app.place_clicked(None, "hole", 0.5, SimpleNamespace(index=[10, 10]))


def test_a_defect_placed_with_a_click_on_a_normal_example_is_found_by_the_map(registry):
    import app
    from diffad.paint import painted_mask

    edited, shown = app.start_painting("example", None, "bottle")
    assert np.array_equal(shown, np.asarray(Image.open(EXAMPLES / "normal_0.png").convert("RGB")))
    edited["layers"] = [np.zeros((*shown.shape[:2], 4), np.uint8)]  # the editor's own empty layer
    edited, shown = app.place_clicked(edited, "hole", 0.5, SimpleNamespace(index=[150, 90]))
    assert len(edited["layers"]) == 2 and np.array_equal(edited["composite"], shown)
    mask = painted_mask(edited["background"], edited["composite"])
    rows, cols = np.nonzero(mask)
    assert abs(cols.mean() - 150) < 4 and abs(rows.mean() - 90) < 4

    outputs = app.analyse_painting(registry, edited, "bottle", None, no_progress)
    *outputs, path, paint_map, text, _ = outputs
    analysis = outputs[0]
    assert analysis.known_mask is not None and analysis.known_mask.any()  # the painting is its known defect
    assert "Anomalous" in text and paint_map == outputs[3]  # the map shown in the tab is the map above
    value = float(text.split("pixel AUROC **")[1][:4])
    assert value > 0.9, text
    assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), shown)


def test_the_colour_bar_marks_the_threshold_at_its_value_and_the_cached_bar_stays_clean():
    from diffad.demo import colorbar

    plain = colorbar(0.0, 10.0, "z", 500)
    for value, expected_x in ((5.0, 250), (2.5, 135)):  # 500 * (0.04 + 0.92 * value / 10)
        marked = colorbar(0.0, 10.0, "z", 500, marker=value)
        columns = np.flatnonzero((marked != plain).any(axis=(0, 2)))
        assert columns.size and expected_x - 6 <= columns.min() and columns.max() <= expected_x + 6
    np.testing.assert_array_equal(colorbar(0.0, 10.0, "z", 500), plain)


def test_every_example_has_its_own_label():
    import app

    rows, labels = app.example_rows()
    assert len(labels) == len(rows) and len(set(labels)) == len(labels), labels
    assert {"bottle · normal 1", "bottle · normal 2", "bottle · crack", "magnetic tile · crack"} <= set(labels)
