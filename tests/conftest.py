import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffad.synth import add_defect, textured_part

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
BOTTLE = SHARED_DATA / "mvtec_ad" / "bottle"
MAGNETIC_TILE = SHARED_DATA / "magnetic_tile" / "magnetic_tile"
CHECKPOINTS = ROOT / "checkpoints"
TINY_NET = {"patch": 2, "block_out_channels": [16, 32], "norm_num_groups": 8, "head_channels": 16}

needs_bottle = pytest.mark.skipif(not BOTTLE.is_dir(), reason=f"MVTec AD bottle data not found at {BOTTLE}")
needs_magnetic_tile = pytest.mark.skipif(not MAGNETIC_TILE.is_dir(),
                                         reason=f"Magnetic Tile data not found at {MAGNETIC_TILE}")


def make_dataset(root: Path, n_train: int = 10, n_test_good: int = 2, size: int = 64) -> Path:
    """A small MVTec-layout category of generated parts with synthetic defects and exact masks."""
    (root / "train" / "good").mkdir(parents=True)
    (root / "test" / "good").mkdir(parents=True)
    for i in range(n_train):
        Image.fromarray(textured_part(size, seed=i)).save(root / "train" / "good" / f"{i:03d}.png")
    for i in range(n_test_good):
        Image.fromarray(textured_part(size, seed=100 + i)).save(root / "test" / "good" / f"{i:03d}.png")
    for kind in ("hole", "colour_spot"):
        (root / "test" / kind).mkdir(parents=True)
        (root / "ground_truth" / kind).mkdir(parents=True)
        for i in range(2):
            image, mask = add_defect(textured_part(size, seed=200 + i), kind, seed=i, size=1.0)
            Image.fromarray(image).save(root / "test" / kind / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(root / "ground_truth" / kind / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data") / "part")


def copy_of(checkpoint: Path, tmp_path: Path) -> Path:
    """A writable copy of a checkpoint folder (same name), without its training state."""
    target = tmp_path / checkpoint.name
    shutil.copytree(checkpoint, target, ignore=shutil.ignore_patterns("train_state.pt"))
    return target


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dataset, tmp_path_factory) -> Path:
    from diffad.train import TrainConfig, train

    out = tmp_path_factory.mktemp("ckpt") / "part"
    train(TrainConfig(data=str(tiny_dataset), out=str(out), resolution=32, steps=30, batch_size=4, save_every=30, net=TINY_NET), progress=False)
    return out


@pytest.fixture(scope="session")
def bottle_detector():
    from diffad import load_checkpoint

    path = CHECKPOINTS / "bottle"
    if not (path / "config.json").exists():
        pytest.fail(f"the shipped bottle checkpoint is missing from {path}")
    return load_checkpoint(path)


def make_hub_cache(cache, repo_id, category, source, commit="0123456789abcdef0123456789abcdef01234567"):
    """The layout huggingface_hub writes: models--user--repo/{refs/main, snapshots/<commit>/<category>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / category
    target.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(source / name, target / name)
    return commit


@pytest.fixture(scope="session")
def app_server(tiny_checkpoint, tmp_path_factory):
    """The app on the shipped checkpoints, plus a Hub repo that is offline but cached locally (category "part")."""
    from benchmarks.app_server import running_app

    hub_cache = tmp_path_factory.mktemp("hub_cache")
    make_hub_cache(hub_cache, "someone/diffad-checkpoints", "part", tiny_checkpoint)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache)}
    log_path = tmp_path_factory.mktemp("app_log") / "app.log"
    with running_app("--hub-repo", "someone/diffad-checkpoints", env=env, log_path=log_path) as (url, _):
        yield url


@pytest.fixture(scope="session")
def client(app_server):
    from gradio_client import Client

    return Client(app_server, verbose=False)
