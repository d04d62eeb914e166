"""The Spaces builder, played as closely as this machine allows (slow: a fresh venv and every package).

On the front matter's Python (a pyenv or PATH interpreter of the same minor version), from an empty folder holding
only requirements.txt: `pip install -r requirements.txt "gradio[oauth,mcp]==<sdk_version>" spaces`, as the builder
does before the repository is copied in. Then the folder `diffad space` assembles, a Hub cache laid out as
`preload_from_hub` leaves it (the default ~/.cache/huggingface/hub, the pinned commit's snapshot), the app started
as a Space starts it with the Hub unreachable, and one analysis through gradio_client.
"""
import glob
import os
import shutil
import subprocess

import pytest
from huggingface_hub import SpaceCard

from diffad.space import assemble
from benchmarks.app_server import free_port, wait_for
from tests.conftest import ROOT

REPO, SHA = "someone/diffad-checkpoints", "0123456789abcdef0123456789abcdef01234567"


def front_matter_python() -> tuple[str, str | None]:
    version = str(SpaceCard.load(ROOT / "README.md").data.python_version)
    minor = ".".join(version.split(".")[:2])
    candidates = sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{minor}.*/bin/python")), reverse=True)
    candidates += [shutil.which(f"python{minor}")]  # a pyenv shim can be on PATH without a version behind it
    for python in filter(None, candidates):
        if subprocess.run([python, "--version"], capture_output=True).returncode == 0:
            return version, python
    return version, None


@pytest.mark.slow
def test_space_builds_and_answers_offline(tmp_path):
    from gradio_client import Client, handle_file

    version, python = front_matter_python()
    if python is None:
        pytest.skip(f"no Python {version} here (the front matter's python_version)")
    sdk_version = SpaceCard.load(ROOT / "README.md").data.sdk_version
    build = tmp_path / "build"
    build.mkdir()
    shutil.copy(ROOT / "requirements.txt", build / "requirements.txt")
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    # The package index alone, as on the builder: no local wheel folders or constraints from this machine's pip config.
    pip_env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_") or key == "PIP_CERT"}
    pip_env["PIP_CONFIG_FILE"] = os.devnull
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-r", "requirements.txt",
                          f"gradio[oauth,mcp]=={sdk_version}", "spaces"], cwd=build, env=pip_env, capture_output=True,
                         text=True)
    assert pip.returncode == 0, pip.stdout[-3000:] + pip.stderr[-3000:]

    space = assemble(tmp_path / "space", model_repo=REPO, revision=SHA)
    home = tmp_path / "home"
    snapshot = home / ".cache" / "huggingface" / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots" / SHA
    for category in ("bottle", "magnetic_tile"):
        (snapshot / category).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            shutil.copy(ROOT / "checkpoints" / category / name, snapshot / category / name)

    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "DIFFAD_", "GRADIO_"))}
    env.update(HOME=str(home), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", CPU_CORES="2")
    log_path = tmp_path / "app.log"
    with log_path.open("w") as log:
        process = subprocess.Popen([str(venv / "bin" / "python"), "app.py", "--port", str(port)], cwd=space, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}/"
            wait_for(url, process, timeout=300)
            details = Client(url, verbose=False).predict(
                handle_file(str(space / "examples" / "bottle" / "crack.png")), "bottle", api_name="/analyse")[1]
        finally:
            process.terminate()
            process.wait(timeout=30)
    assert details["checkpoint"] == f"Hub: {REPO}/bottle @ {SHA}", log_path.read_text()[-3000:]
    assert details["verdict"] == "anomalous"
