"""The app's main path timed once in a real browser (issue 21): what a user waits for, as seen in the page.

    python benchmarks/browser_path.py [--threads 2] [--repeats 5]

Starts `python app.py` on the shipped checkpoints (offline, torch limited to --threads through CPU_CORES, as on a
Space) and walks, in headless Debian Chromium (tests/test_app_browser.py's browser, flags and 1440×900 viewport), the
path of tests/test_app_browser.py::test_main_path_example_analysis_timesteps_threshold_morph_new_photo:

- page load: from navigating to the page until the photo input and the examples are there;
- the "bottle · crack" example clicked until the verdict and the anomaly map are shown;
- a timestep scrub (t typed into the slider's number box) until the four panels and the text for that t are shown;
- a verdict-threshold change until the verdict text has changed;
- a morph with the default settings until the status says finished and the downloads appear;
- a new photo (the "bottle · normal 1" example) until its verdict and map are shown.

Each step is timed from the user's action (click, or typing a number and Enter) to the page showing its result. Scrub
and threshold are repeated --repeats times (medians reported, alternating two values), the others are timed once.
Adds a "browser" section to benchmarks/results.json / results.md. The app's cold start is not part of it
(benchmarks/app_latency.py measures that, and the same steps through gradio_client).
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CATEGORY = "bottle"
DEFECTIVE, NORMAL = "bottle · crack", "bottle · normal 1"
PANELS = ("#xt", "#x0", "#kl", "#feat")
SCRUB_TIMESTEPS = (50, 100)  # both computed timesteps: the panels show exactly these


def walk(page, url: str, repeats: int) -> dict:
    from benchmarks.browser import SLOW, image_sources, set_number, wait_new_image, wait_text

    def timed(action, *waits) -> float:
        t0 = time.perf_counter()
        action()
        for wait in waits:
            wait()
        return time.perf_counter() - t0

    def verdict_changes_to(before: str, *needles: str):
        return lambda: page.wait_for_function(
            "([before, needles]) => { const t = document.querySelector('#verdict').innerText;"
            " return t !== before && needles.every(n => t.includes(n)); }", arg=[before, list(needles)], timeout=SLOW)

    result = {}
    result["page_load_s"] = timed(
        lambda: page.goto(url, wait_until="domcontentloaded", timeout=120_000),
        lambda: page.wait_for_selector("#photo input[type=file]", state="attached", timeout=120_000),
        lambda: page.get_by_text(DEFECTIVE, exact=True).first.wait_for(state="visible", timeout=120_000))

    old_map = image_sources(page, "#result")
    result["example_analysis_s"] = timed(
        lambda: page.get_by_text(DEFECTIVE, exact=True).first.click(),
        lambda: wait_text(page, "#verdict", "Score", "Anomalous"),
        lambda: wait_new_image(page, "#result", old_map))
    first_verdict = page.inner_text("#verdict")

    page.get_by_role("tab", name="Diffusion timesteps").click()  # a user looks at the panels in their tab
    scrubs = []
    for i in range(repeats):
        t = SCRUB_TIMESTEPS[i % 2]
        old = {panel: image_sources(page, panel) for panel in PANELS}
        scrubs.append(timed(lambda: set_number(page, "t-slider", t),
                            lambda: wait_text(page, "#step-text", f"t = {t}", "(z)"),
                            *[lambda p=panel: wait_new_image(page, p, old[p]) for panel in PANELS]))

    calibrated = page.locator("#image-threshold input[type=number]").input_value()
    top = page.get_attribute("#image-threshold input[type=range]", "max")  # above the score by construction
    thresholds = []
    for i in range(repeats):
        value, verdict = (top, "Normal") if i % 2 == 0 else (calibrated, "Anomalous")
        before = page.inner_text("#verdict")
        thresholds.append(timed(lambda: set_number(page, "image-threshold", value),
                                verdict_changes_to(before, verdict)))
    if repeats % 2:  # back to the calibrated threshold, as the test's ↺ leaves it
        page.click("#image-reset")
        wait_text(page, "#verdict", "Anomalous", "(the calibrated one)")

    page.get_by_role("tab", name="Morph to normal").click()
    result["morph_s"] = timed(
        lambda: page.click("#morph"),
        lambda: wait_text(page, "#morph-status", "finished"),
        lambda: page.wait_for_function("document.querySelectorAll('#downloads a').length >= 3", timeout=SLOW))
    status = page.inner_text("#morph-status")
    loops = re.search(r"finished after (\d+) loops|finished at the (\d+)-loop limit", status)
    result["morph_loops"] = int(next(g for g in loops.groups() if g)) if loops else None

    old_map = image_sources(page, "#result")
    result["new_photo_analysis_s"] = timed(
        lambda: page.get_by_text(NORMAL, exact=True).click(),
        verdict_changes_to(first_verdict, "Score"),
        lambda: wait_new_image(page, "#result", old_map))
    result["new_photo_verdict"] = "Normal" if "Normal" in page.inner_text("#verdict") else "Anomalous"

    result.update(timestep_scrub_s=statistics.median(scrubs), timestep_scrub_all_s=scrubs,
                  threshold_s=statistics.median(thresholds), threshold_all_s=thresholds)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timestep scrubs and threshold changes (medians)")
    parser.add_argument("--no-save", action="store_true", help="print only (smoke runs)")
    parser.add_argument("--note", help="a caveat shown with the results (e.g. the machine was not idle)")
    args = parser.parse_args(argv)
    from benchmarks.app_server import running_app
    from benchmarks.browser import chromium_page
    from diffad.morph import MorphConfig

    env = {"OMP_NUM_THREADS": str(args.threads), "CPU_CORES": str(args.threads), "HF_HUB_OFFLINE": "1",
           "DIFFAD_HUB_REPO": ""}
    with running_app(env=env) as (url, _), chromium_page() as page:
        steps = walk(page, url, args.repeats)
        chromium = page.context.browser.version
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "category": CATEGORY, "repeats": args.repeats,
              "chromium": chromium, "morph_max_loops": MorphConfig().max_loops, **({"note": args.note} if args.note else {}),
              **{k: round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list) else v
                 for k, v in steps.items()}}
    print(result)
    if not args.no_save:
        from benchmarks.run import save_section

        save_section("browser", result)


def render(b: dict) -> list[str]:
    loops = f"{b['morph_loops']} of at most {b['morph_max_loops']}" if b.get("morph_loops") else f"at most {b['morph_max_loops']}"
    return [f"## Web app in a real browser ({b['threads']} CPU threads, `benchmarks/browser_path.py`, headless Chromium "
            f"{b['chromium'].split('.')[0]}, {b['date']})", "",
            "The main path of `tests/test_app_browser.py`, timed from the user's action until the page shows the result "
            f"(once each; scrub and threshold: medians of {b['repeats']}).{' ' + b['note'] if b.get('note') else ''}", "",
            f"- page load until the photo input is usable: {b['page_load_s']:.2f} s",
            f"- example \"{DEFECTIVE}\" clicked until the verdict and map show: {b['example_analysis_s']:.2f} s",
            f"- timestep scrub until the four panels and text show: {b['timestep_scrub_s'] * 1000:.0f} ms; "
            f"verdict threshold until the verdict changes: {b['threshold_s'] * 1000:.0f} ms",
            f"- morph (default settings, {loops} loops run) until it says finished and the downloads show: "
            f"{b['morph_s']:.1f} s",
            f"- a new photo (\"{NORMAL}\") until its verdict ({b['new_photo_verdict']}) and map show: "
            f"{b['new_photo_analysis_s']:.2f} s", ""]


if __name__ == "__main__":
    main()
