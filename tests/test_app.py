"""The Gradio app, driven through gradio_client against a launched server on localhost."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

gradio_client = pytest.importorskip("gradio_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process, timeout: float = 180) -> None:
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


@pytest.fixture(scope="module")
def app_server(tiny_checkpoint, tmp_path_factory):
    """The app on the shipped checkpoints, plus a Hub repo that is offline but cached locally (category "part")."""
    from tests.test_checkpoint import make_hub_cache

    hub_cache = tmp_path_factory.mktemp("hub_cache")
    make_hub_cache(hub_cache, "someone/diffad-checkpoints", "part", tiny_checkpoint)
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(hub_cache), GRADIO_ANALYTICS_ENABLED="False")
    log = (tmp_path_factory.mktemp("app_log") / "app.log").open("w")
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port), "--hub-repo", "someone/diffad-checkpoints"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(url, process)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(app_server):
    return gradio_client.Client(app_server, verbose=False)


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


def test_bad_requests_get_clear_errors(client, tmp_path):
    from gradio_client import handle_file

    junk = tmp_path / "junk.png"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(Exception, match="(?i)cannot identify image|not a readable"):
        client.predict(handle_file(str(junk)), "part", api_name="/analyse")
    defective = EXAMPLES / "crack.png"
    with pytest.raises(Exception, match="(?i)not in the list of choices|unknown category"):
        client.predict(handle_file(str(defective)), "../../etc", api_name="/analyse")


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
