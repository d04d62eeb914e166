"""`diffad space` (the folder is real, the Hub is mocked at huggingface_hub's HfApi boundary), the requirement
files a Space builder and the README's commands rely on, and the app's offline start on a fresh checkout."""
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import HfApi, SpaceCard

from diffad.checkpoint import CheckpointError
from diffad.cli import main
from diffad.space import HUB_TEXT_LIMIT, assemble, check_hub_storable, hub_source, needs_lfs
from tests.conftest import ROOT

SHA = "0123456789abcdef0123456789abcdef01234567"


def front_matter(path: Path):
    return SpaceCard.load(path).data


def files_of(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_space_with_preloaded_checkpoints(tmp_path):
    out = assemble(tmp_path / "space", model_repo="someone/diffad-checkpoints", revision=SHA)
    files = files_of(out)
    assert {"app.py", "requirements.txt", "README.md", ".gitattributes", "diffad/__init__.py", "diffad/space.py",
            "examples/bottle/manifest.json", "examples/bottle/crack.png"} <= files
    # Weights come from the Hub cache; tests, benchmarks, docs and caches stay out.
    assert not [f for f in files if f.split("/")[0] in ("checkpoints", "tests", "benchmarks", "docs", ".ci")]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    data = front_matter(out / "README.md")
    assert data.sdk == "gradio" and data.app_file == "app.py"
    assert data.models == ["someone/diffad-checkpoints"]
    entry = ("someone/diffad-checkpoints bottle/config.json,bottle/model.safetensors,"
             f"magnetic_tile/config.json,magnetic_tile/model.safetensors {SHA}")
    assert data.preload_from_hub == [entry]
    assert hub_source(out / "README.md") == ("someone/diffad-checkpoints", SHA)  # what the app then loads
    assert (out / "app.py").read_bytes() == (ROOT / "app.py").read_bytes()
    check_hub_storable(out)
    # Everything the app imports is in the folder (photo_input.py was once left out: the Space would not start).
    subprocess.run([sys.executable, "-c", "import app, diffad; assert diffad.__file__.startswith(app.ROOT.as_posix())"],
                   cwd=out, check=True, timeout=300)


def test_space_without_a_model_repo_bundles_the_checkpoints_for_lfs(tmp_path):
    out = assemble(tmp_path / "space", categories=["bottle"])
    assert {"checkpoints/bottle/config.json", "checkpoints/bottle/model.safetensors"} <= files_of(out)
    assert not (out / "checkpoints" / "magnetic_tile").exists()
    assert front_matter(out / "README.md").get("preload_from_hub") is None
    weights = out / "checkpoints" / "bottle" / "model.safetensors"
    assert weights.stat().st_size > HUB_TEXT_LIMIT and needs_lfs(weights)
    assert "*.safetensors filter=lfs" in (out / ".gitattributes").read_text()
    check_hub_storable(out)
    (out / "model.bin").write_bytes(b"\0binary")  # a binary no pattern covers: refused before any upload
    with pytest.raises(CheckpointError, match="model.bin"):
        check_hub_storable(out)


def test_space_command_uploads_the_folder(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    def upload_folder(api, **kwargs):
        calls.append(("upload_folder", kwargs, api.token, files_of(Path(kwargs["folder_path"]))))
        return SimpleNamespace(commit_url="https://huggingface.co/spaces/someone/diffad/commit/abc")

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    out = tmp_path / "space"
    assert main(["space", "--out", str(out), "--model-repo", "someone/ckpts", "--model-revision", SHA,
                 "--repo-id", "someone/diffad", "--token", "hf_test"]) == 0
    assert "uploaded: https://huggingface.co/spaces/someone/diffad/commit/abc" in capsys.readouterr().out
    (_, repo_id, create), (_, upload, token, uploaded) = calls
    assert repo_id == "someone/diffad" and create["repo_type"] == "space" and create["space_sdk"] == "gradio"
    assert upload["repo_id"] == "someone/diffad" and upload["repo_type"] == "space"
    assert Path(upload["folder_path"]) == out and token == "hf_test"
    assert uploaded == files_of(out) and "README.md" in uploaded


def test_requirements_are_what_a_space_builder_can_install():
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    pins = dict(line.split("==") for line in lines if line)
    # Copied in alone, before the repository: no local paths, no test tools, no transitive CUDA wheels.
    assert not [line for line in lines if line.startswith(("-e", "-r", ".", "/"))]
    assert not {"pytest", "playwright", "pluggy", "iniconfig", "triton"} & set(pins)
    assert not [name for name in pins if name.startswith("nvidia")]
    readme = (ROOT / "README.md").read_text()
    assert pins["gradio"] == front_matter(ROOT / "README.md").sdk_version
    # The README's second command installs the test tools and is what CI runs.
    test_command = re.search(r"^python3 -m venv \.venv .*pytest.*$", readme, re.M).group(0)
    assert "requirements-dev.txt" in test_command
    assert test_command.split("&& ", 1)[1].replace(" && ", "\n") in (ROOT / ".ci" / "run").read_text()
    dev = (ROOT / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev and "-e ." in dev


def test_app_starts_offline_on_a_fresh_checkout_with_the_local_default(tmp_path):
    """The README's first command: no Hub repo configured, no network, the shipped default category."""
    from gradio_client import Client, handle_file

    from benchmarks.app_server import running_app

    log_path = tmp_path / "app.log"
    env = {"HF_HUB_OFFLINE": "1", "DIFFAD_HUB_REPO": "", "HF_HUB_CACHE": str(tmp_path / "empty_cache"), "CPU_CORES": "1"}
    with running_app(env=env, log_path=log_path) as (url, _):
        log = log_path.read_text()
        assert "loaded bottle (local:" in log and "warmed bottle" in log  # before the page was served
        assert "torch threads: 1" in log  # the Space's CPU share, not the host's cores
        details = Client(url, verbose=False).predict(handle_file(str(ROOT / "examples" / "bottle" / "crack.png")),
                                                     "bottle", api_name="/analyse")[1]
    assert details["checkpoint"] == "local: checkpoints/bottle"  # the folder's name, never a server path (issue 21)
    assert details["verdict"] == "anomalous"
