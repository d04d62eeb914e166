"""The Gradio app, driven through gradio_client against a launched server on localhost."""
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROOT


def example_images(dataset: Path):
    return sorted((dataset / "test" / "hole").iterdir())[0], sorted((dataset / "test" / "good").iterdir())[0]


EXAMPLES = ROOT / "examples" / "bottle"


def test_analyse_scrub_threshold_and_morph(client, tiny_dataset):
    from gradio_client import handle_file

    normal_details = client.predict(handle_file(str(EXAMPLES / "normal_0.png")), "bottle", api_name="/analyse")[1]
    result = client.predict(handle_file(str(EXAMPLES / "crack.png")), "bottle", api_name="/analyse")
    details = result[1]
    assert details["category"] == "bottle" and details["verdict"] == "anomalous"
    assert details["score"] > normal_details["score"]
    assert details["checkpoint"].startswith("local:") and "Hub unavailable" in details["checkpoint"]
    assert Path(result[2]).is_file()  # the overlay picture

    # The state holds the last analysis: scrubbing and thresholds answer without recomputation.
    views = client.predict(5, api_name="/timestep")
    assert all(Path(p).is_file() for p in views[:4]) and "t = 150" in views[4]
    score = details["score"]
    _, verdict = client.predict("Combined", 0.0, score * 1.1, api_name="/threshold")
    assert "Normal" in verdict and "Flagged area: 0.00%" not in verdict
    _, verdict = client.predict("Feature error", 0.0, 0.0, api_name="/threshold")
    assert "Anomalous" in verdict

    # "part" exists only in the (offline) Hub cache.
    defective, _ = example_images(tiny_dataset)
    part = client.predict(handle_file(str(defective)), "part", api_name="/analyse")[1]
    assert part["checkpoint"] == "Hub: someone/diffad-checkpoints/part"

    job = client.submit(handle_file(str(defective)), "part", 0.02, 2, 2, 0, api_name="/morph")
    outputs = job.result(timeout=300)
    assert "done after" in outputs[2]
    assert len(outputs[4]) == 3 and all(Path(f).stat().st_size > 0 for f in outputs[4])


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian chromium is not installed (.ci/run installs it)")
def test_real_browser_upload_and_result(app_server, tmp_path):
    from playwright.sync_api import sync_playwright

    defective = EXAMPLES / "crack.png"
    flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(app_server, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector("#photo input[type=file]", state="attached", timeout=120_000)
            page.set_input_files("#photo input[type=file]", str(defective))
            page.wait_for_function(
                "document.querySelector('#verdict') && document.querySelector('#verdict').innerText.includes('Score')",
                timeout=180_000,
            )
            verdict = page.inner_text("#verdict")
            assert "Anomalous" in verdict and "held-out normal bottle images" in verdict
            page.wait_for_selector("#result img", timeout=60_000)
            assert page.eval_on_selector("#result img", "img => img.naturalWidth") > 0
            page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000


def test_pictures_shared_by_concurrent_users_are_never_half_written():
    import threading

    import numpy as np
    from PIL import Image

    import app

    picture = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    path = app.picture_file(picture)
    errors, stop = [], threading.Event()

    def writer():
        for _ in range(40):
            assert app.picture_file(picture) == path

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
