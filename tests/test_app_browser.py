"""The app in headless Chromium, as a new user meets it: the main path, stale results, bad input.

DIFFAD_SCREENSHOTS=folder keeps the screenshots (docs/ pictures are made from them); otherwise they go to tmp_path.
"""
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from benchmarks.browser import CHROMIUM, SLOW, chromium_page, set_number, wait_image, wait_text

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")


def text(page, selector) -> str:
    return page.inner_text(selector)


def images_in(page, selector) -> int:
    return page.eval_on_selector_all(f"{selector} img", "imgs => imgs.filter(i => i.naturalWidth > 0).length")


def links_in(page, selector) -> int:
    return page.eval_on_selector_all(f"{selector} a", "links => links.length")


def error_pills(page) -> int:
    """Gradio's red "Error" status on output panels."""
    return page.get_by_text("Error", exact=True).count()


@pytest.fixture(scope="module")
def page(app_server, tmp_path_factory):
    with chromium_page() as page:
        page.goto(app_server, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_selector("#photo input[type=file]", state="attached", timeout=120_000)
        yield page


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DIFFAD_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_main_path_example_analysis_timesteps_threshold_morph_new_photo(page, shots):
    # Onboarding: what it does, three steps, the paper; examples of every category named and on one page.
    header = text(page, "#header")
    assert "diffusion model trained only on defect-free parts" in header and "Paper" in header
    assert all(step in header for step in ("Pick an example", "Read the verdict", "Explore"))
    for label in ("bottle · crack", "bottle · normal 1", "magnetic tile · crack", "magnetic tile · scratch"):
        assert page.get_by_text(label, exact=True).first.is_visible(), label
    assert "Hub" in text(page, "#source-note") or "local" in text(page, "#source-note")
    page.screenshot(path=str(shots / "0_start.png"))

    # An example click analyses at once.
    page.get_by_text("bottle · crack", exact=True).click()
    wait_text(page, "#verdict", "Score", "Anomalous")
    wait_image(page, "#result")
    first_verdict = text(page, "#verdict")
    page.get_by_text("Details", exact=True).click()
    wait_text(page, "#details", "anomalous")
    assert "/work" not in text(page, "#details") and "/tmp" not in text(page, "#details")
    page.screenshot(path=str(shots / "1_analysis.png"), full_page=True)
    page.get_by_text("Details", exact=True).click()  # closed again for the README picture
    page.evaluate("window.scrollTo(0, 0)")
    page.screenshot(path=str(shots / "analysis.png"))

    # Timestep scrub in t units, once the other timesteps have followed the verdict.
    page.wait_for_function("!document.querySelector('#step-text').innerText.includes('on their way')", timeout=SLOW)
    set_number(page, "t-slider", 50)
    wait_text(page, "#step-text", "t = 50", "(z)")
    for panel in ("#xt", "#x0", "#kl", "#feat"):
        wait_image(page, panel)
    page.locator("#timesteps-tab").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "2_timesteps.png"), full_page=True)
    page.locator("#timesteps-tab").screenshot(path=str(shots / "timesteps.png"))
    set_number(page, "t-slider", 60)
    wait_text(page, "#step-text", "nearest computed timestep to 60", "t = 50")

    # The verdict threshold above the score: headline, text and JSON agree; ↺ restores the calibrated value.
    calibrated = page.locator("#image-threshold input[type=number]").input_value()
    top = page.get_attribute("#image-threshold input[type=range]", "max")  # above the score by construction
    set_number(page, "image-threshold", top)
    wait_text(page, "#verdict", "Normal", f"at or below the verdict threshold {float(top):.2f}")
    page.get_by_text("Details", exact=True).click()
    wait_text(page, "#details", "normal")
    assert "anomalous" not in text(page, "#details")
    page.click("#image-reset")
    wait_text(page, "#verdict", "Anomalous", "(the calibrated one)")
    assert page.locator("#image-threshold input[type=number]").input_value() == calibrated
    set_number(page, "mask-threshold", 0.5)
    wait_text(page, "#verdict", "mask threshold 0.50")
    page.click("#mask-reset")
    page.wait_for_function("!document.querySelector('#verdict').innerText.includes('mask threshold 0.50')")
    assert float(page.locator("#mask-threshold input[type=number]").input_value()) > 0.5

    # Morph: streams, then before/after and downloads; a second morph clears them while it streams.
    page.get_by_role("tab", name="Morph to normal").click()
    # A morph started before the slider holds 2 runs the default 16 loops. The tab's controls mount on its first
    # opening, and a value typed while they mount can be lost: type it until the slider holds it.
    page.locator("#loops input[type=number]").wait_for(state="visible")
    for attempt in range(3):
        set_number(page, "loops", 2)
        try:
            page.wait_for_function("Number(document.querySelector('#loops input[type=range]').value) === 2", timeout=10_000)
            break
        except PlaywrightTimeout:
            assert attempt < 2, "the loops slider never took the value 2"
    page.click("#morph")
    wait_text(page, "#morph-status", "finished")
    page.wait_for_function("document.querySelectorAll('#downloads a').length >= 3", timeout=60_000)
    wait_image(page, "#compare")
    page.screenshot(path=str(shots / "3_morph.png"), full_page=True)
    page.click("#morph")
    page.wait_for_function("!document.querySelector('#morph-status').innerText.includes('finished')", timeout=60_000)
    assert links_in(page, "#downloads") == 0 and images_in(page, "#compare") == 0
    wait_text(page, "#morph-status", "finished")

    # A new photo: the old verdict, map, timestep panels and morph go at once (a morph still streaming stops),
    # then the new analysis arrives.
    page.click("#morph")
    wait_text(page, "#morph-status", "Step")
    page.get_by_text("bottle · normal 1", exact=True).click()
    first_score = next(line for line in first_verdict.splitlines() if line.startswith("Score"))
    page.wait_for_function(f"!document.querySelector('#verdict').innerText.includes({first_score!r})", timeout=SLOW)
    assert links_in(page, "#downloads") == 0 and "finished" not in text(page, "#morph-status")
    wait_text(page, "#verdict", "Score")
    assert text(page, "#verdict") != first_verdict
    # The stopped morph sends nothing more: a 2-loop morph left running would have finished within this wait.
    page.wait_for_timeout(15_000)
    assert text(page, "#morph-status") == "" and links_in(page, "#downloads") == 0 and images_in(page, "#compare") == 0

    # Switching the category re-analyses the same photo and says it does not look like the category.
    page.locator("#category input").click()
    page.get_by_role("option", name="magnetic_tile").click()
    wait_text(page, "#verdict", "Score", "magnetic_tile", "does not look like")
    assert error_pills(page) == 0
    page.screenshot(path=str(shots / "4_category_switch.png"), full_page=True)


def test_bad_input_gets_one_clear_message(page, shots, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_text("not an image")
    page.set_input_files("#photo input[type=file]", str(fake))
    wait_text(page, "#verdict", "Cannot analyse", "holiday.png", "not a readable image")
    body = page.inner_text("body")
    assert "Could not preprocess" not in body and "/tmp" not in text(page, "#verdict")
    assert error_pills(page) == 0 and images_in(page, "#result") == 0
    page.screenshot(path=str(shots / "5_bad_input.png"), full_page=True)

    tiny = tmp_path / "tiny.png"
    Image.fromarray(np.full((8, 8, 3), 128, np.uint8)).save(tiny)
    page.set_input_files("#photo input[type=file]", str(tiny))
    wait_text(page, "#verdict", "Score", "only 8×8 px")
    assert error_pills(page) == 0


@pytest.fixture
def new_visitor(page, app_server):
    """A page of its own, as a new visitor opens it: the default category, no photo, nothing left by other tests."""
    fresh = page.context.browser.new_page(viewport=page.viewport_size)
    try:
        fresh.goto(app_server, wait_until="domcontentloaded", timeout=120_000)
        fresh.wait_for_selector("#photo input[type=file]", state="attached", timeout=120_000)
        yield fresh
    finally:
        fresh.close()


def test_paint_a_defect_place_one_with_a_click_and_analyse_it(new_visitor, shots):
    page = new_visitor
    page.get_by_role("tab", name="Paint a defect").click()
    page.click("#paint-from-example")
    wait_image(page, "#paint-click")
    # Nothing painted yet: a clear message, no analysis.
    page.click("#paint-analyse")
    page.get_by_text("Nothing is painted yet").first.wait_for(timeout=60_000)

    page.locator("#paint-kind input").click()
    page.get_by_role("option", name="hole").click()
    before = page.get_attribute("#paint-click img", "src")
    box = page.locator("#paint-click img").bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.6, box["y"] + box["height"] * 0.35)
    page.wait_for_function("b => document.querySelector('#paint-click img')?.src !== b", arg=before, timeout=60_000)
    # A brush stroke too (the editor's default tool).
    area = page.locator("#paint-editor canvas").first.bounding_box()
    page.mouse.move(area["x"] + area["width"] * 0.35, area["y"] + area["height"] * 0.7)
    page.mouse.down()
    page.mouse.move(area["x"] + area["width"] * 0.45, area["y"] + area["height"] * 0.7, steps=8)
    page.mouse.up()

    page.click("#paint-analyse")
    wait_text(page, "#paint-text", "Score", "The map finds your painted defect with pixel AUROC", "0.5 = chance")
    wait_image(page, "#paint-map")
    wait_text(page, "#verdict", "Score")  # the painting is now the photo the page shows and explores
    # The same headline in both places, once the page has finished showing progress over them.
    page.wait_for_function("() => document.querySelector('#paint-text').innerText.split('\\n')[0] === "
                           "document.querySelector('#verdict').innerText.split('\\n')[0]", timeout=60_000)
    assert error_pills(page) == 0
    page.locator("#paint-tab").screenshot(path=str(shots / "6_paint.png"))
