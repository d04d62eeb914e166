import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffad import CheckpointError, load_checkpoint
from diffad.checkpoint import list_local_categories
from diffad.detector import FORMAT_VERSION
from tests.conftest import copy_of, make_hub_cache


def predict(detector, dataset):
    return detector.predict(sorted((dataset / "test" / "hole").iterdir())[0], view_timesteps=(5,))


def test_round_trip_gives_identical_maps(tiny_checkpoint, tiny_dataset, tmp_path):
    from diffad import save_checkpoint

    first = load_checkpoint(tiny_checkpoint)
    save_checkpoint(first, tmp_path / "again")
    second = load_checkpoint(tmp_path / "again")
    a, b = predict(first, tiny_dataset), predict(second, tiny_dataset)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert a.score == b.score and [s.t for s in a.steps] == [5, 20, 200, 400]
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert config["format_version"] == FORMAT_VERSION and config["calibration"]["normal_scores"]
    assert load_file(str(tmp_path / "again" / "model.safetensors"))["net.feature_head.0.weight"].dtype == torch.float16


def test_scoring_is_deterministic_for_a_seed(tiny_checkpoint, tiny_dataset):
    detector = load_checkpoint(tiny_checkpoint)
    a, b = predict(detector, tiny_dataset), predict(detector, tiny_dataset)
    np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    other = detector.predict(sorted((tiny_dataset / "test" / "hole").iterdir())[0], seed=123)
    assert not np.array_equal(a.anomaly_map, other.anomaly_map)


def test_local_folder_of_categories(tiny_checkpoint):
    root = tiny_checkpoint.parent
    assert list_local_categories(root) == ["part"]
    assert load_checkpoint(root, category="part").category == "part"
    with pytest.raises(CheckpointError, match="unknown category 'bottle'.*available: part"):
        load_checkpoint(root, category="bottle")
    with pytest.raises(CheckpointError, match="invalid category name"):
        load_checkpoint(root, category="../etc")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c.update(format_version=99), "format version 99 is not supported"),
        (lambda c: c.pop("net"), "missing key 'net'"),
        (lambda c: c.update(scoring=[1]), "'scoring' must be a dict"),
        (lambda c: c["net"].update(block_out_channels=[8, 16]), "net.* is torch.float16 .*expected"),
    ],
)
def test_bad_config_is_named(tiny_checkpoint, tmp_path, damage, message):
    folder = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    damage(config)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(folder)


def test_truncated_tampered_and_missing_weights(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    tensors["net.feature_head.0.weight"] = tensors["net.feature_head.0.weight"][:1]
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor net\.feature_head\.0\.weight"):
        load_checkpoint(folder)
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or truncated"):
        load_checkpoint(folder)
    weights.unlink()
    with pytest.raises(CheckpointError, match="model.safetensors: missing"):
        load_checkpoint(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json: not valid JSON"):
        load_checkpoint(folder)


def test_hub_cache_loads_offline(tiny_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    commit = make_hub_cache(tmp_path, "someone/diffad-checkpoints", "part", tiny_checkpoint)
    detector = load_checkpoint("someone/diffad-checkpoints", category="part", cache_dir=tmp_path)
    assert detector.category == "part"
    pinned = load_checkpoint("someone/diffad-checkpoints", category="part", revision=commit, cache_dir=tmp_path)
    assert pinned.calibration.image_threshold == detector.calibration.image_threshold
    with pytest.raises(CheckpointError, match="not in the local Hub cache"):
        load_checkpoint("someone/diffad-checkpoints", category="bottle", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="needs a category"):
        load_checkpoint("someone/diffad-checkpoints", cache_dir=tmp_path)


def test_maps_are_identical_across_processes(tiny_checkpoint, tiny_dataset):
    import subprocess
    import sys

    image = sorted((tiny_dataset / "test" / "hole").iterdir())[0]
    code = (
        "import hashlib, sys, diffad; p = diffad.load_checkpoint(sys.argv[1]).predict(sys.argv[2]); "
        "print(hashlib.sha256(p.anomaly_map.tobytes()).hexdigest(), repr(p.score))"
    )
    outputs = {subprocess.run([sys.executable, "-c", code, str(tiny_checkpoint), str(image)], capture_output=True,
                              text=True, check=True, timeout=120).stdout for _ in range(2)}
    assert len(outputs) == 1 and len(outputs.pop().split()) == 2


def test_hanging_hub_falls_back_to_cache_and_local_checkpoints(tiny_checkpoint, tmp_path, monkeypatch):
    import socket
    import time

    import huggingface_hub.constants

    from diffad.registry import CheckpointRegistry

    # A "Hub" that accepts connections and never answers, like a network that drops packets.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
    try:
        cache, local = tmp_path / "cache", tmp_path / "local"
        make_hub_cache(cache, "someone/diffad-checkpoints", "part", tiny_checkpoint)
        shutil.copytree(tiny_checkpoint, local / "local_part")
        registry = CheckpointRegistry(local, hub_repo="someone/diffad-checkpoints", cache_dir=cache, hub_timeout=1.0)
        start = time.monotonic()
        assert registry.categories() == ["local_part", "part"]
        detector, origin = registry.get("part")  # from the cache, without waiting on the network again
        assert time.monotonic() - start < 8
        assert registry.hub_offline and "could not be reached" in registry.hub_note
        assert origin == "Hub: someone/diffad-checkpoints/part" and detector.category == "part"
        assert registry.get("local_part")[1].startswith("local:")
        with pytest.raises(CheckpointError, match="unknown category 'nope'.*available: local_part, part"):
            registry.get("nope")
    finally:
        server.close()


def test_missing_hub_repo_or_category_is_named(tmp_path):
    import http.server
    import os
    import subprocess
    import sys
    import threading

    class FakeHub(http.server.BaseHTTPRequestHandler):
        """Answers like the Hub does: an unknown repo is 401 RepoNotFound, an unknown file 404 EntryNotFound."""

        def do_HEAD(self):
            code, error = (401, "RepoNotFound") if "missing-repo" in self.path else (404, "EntryNotFound")
            self.send_response(code)
            self.send_header("X-Error-Code", error)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    # huggingface_hub builds its URLs from HF_ENDPOINT at import, hence a fresh process.
    code = ("import sys, diffad\ntry:\n    diffad.load_checkpoint(sys.argv[1], category=sys.argv[2], cache_dir=sys.argv[3])\n"
            "except diffad.CheckpointError as exc:\n    print(exc)")
    env = dict(os.environ, HF_ENDPOINT=f"http://127.0.0.1:{server.server_port}", HF_HUB_OFFLINE="0")
    try:
        messages = [subprocess.run([sys.executable, "-c", code, repo, category, str(tmp_path)], env=env, capture_output=True,
                                   text=True, timeout=120).stdout.strip()
                    for repo, category in (("someone/diffad-checkpoints", "nope"), ("someone/missing-repo", "part"))]
    finally:
        server.shutdown()
    assert messages == ["category 'nope' is not in the Hub repo someone/diffad-checkpoints",
                        "Hub repo someone/missing-repo not found (or private)"]


def test_position_means_centre_each_pixel_on_normal_images(tiny_checkpoint, tiny_dataset):
    detector = load_checkpoint(tiny_checkpoint)
    means = detector.position_means()
    assert set(means) == {int(t) for t in detector.calibration.step_stats}
    image = detector.preprocess(sorted((tiny_dataset / "test" / "good").iterdir())[0])
    steps = detector.raw_steps(image[None], detector.scoring.timesteps)[0]
    # A map that equals the normal mean at every position is exactly typical: zero after centring.
    for step in steps:
        step.kl, step.rgb = means[step.t]["kl"].copy(), means[step.t]["rgb"].copy()
        step.features[1] = means[step.t]["feature"].copy()
    maps = detector.combine(steps)
    assert np.abs(maps.anomaly).max() < 1e-5
    # Centred on one mean per timestep instead, the same maps are far from zero.
    per_map = dataclasses.replace(detector.scoring, centre_by_position=False)
    assert np.abs(detector.combine(steps, per_map).anomaly).max() > 0.1


def test_per_image_normalisation_ignores_calibration_scale_and_offset(tiny_checkpoint, tiny_dataset):
    detector = load_checkpoint(tiny_checkpoint)
    image = detector.preprocess(sorted((tiny_dataset / "test" / "good").iterdir())[0])
    steps = detector.raw_steps(image[None], detector.scoring.timesteps)[0]
    per_image = dataclasses.replace(detector.scoring, normalisation="per_image", alpha=1.0)
    calibrated = dataclasses.replace(detector.scoring, alpha=1.0)
    before = detector.combine(steps, per_image).anomaly, detector.combine(steps, calibrated).anomaly
    # Each timestep's map becomes mean 0, std 1 on its own, so the sum over timesteps has mean 0.
    assert abs(before[0].mean()) < 1e-4
    for step in steps:
        step.kl = 7.0 * step.kl + 3.0 * float(step.kl.mean())  # an offset on the map's own scale: float32 keeps it
    after = detector.combine(steps, per_image).anomaly, detector.combine(steps, calibrated).anomaly
    np.testing.assert_allclose(after[0], before[0], atol=1e-4)
    assert np.abs(after[1] - before[1]).max() > 1.0
    with pytest.raises(ValueError, match="normalisation"):
        dataclasses.replace(detector.scoring, normalisation="per_batch")


def test_checkpoints_without_position_means_still_load_and_tampered_ones_are_refused(tiny_checkpoint, tiny_dataset, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.startswith("extras.position_mean")}, str(weights))
    older = load_checkpoint(folder)
    assert older.position_means() is None and np.isfinite(predict(older, tiny_dataset).score)
    tensors["extras.position_mean"] = tensors["extras.position_mean"][:, :, :-1].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="position-wise normal means"):
        load_checkpoint(folder)


def test_a_version_1_checkpoint_loads_as_a_noise_predicting_network(tiny_checkpoint, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path / "v1")
    config = json.loads((folder / "config.json").read_text())
    assert config["net"]["prediction"] == "wiener"  # what training writes now
    del config["net"]["prediction"]
    for key in ("data_mean", "data_std"):  # a version-1 network had no data statistics
        tensors = load_file(str(folder / "model.safetensors"))
        tensors.pop(f"net.{key}")
        save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    assert load_checkpoint(folder).net.config.prediction == "eps"
