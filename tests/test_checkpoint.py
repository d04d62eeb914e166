import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffad import CheckpointError, load_checkpoint
from diffad.checkpoint import FORMAT_VERSION, list_local_categories

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
        (lambda c: c.update(morph=[0]), "'morph' must be a dict"),
        (lambda c: c.update(morph={"gradient_smoothing": -2}), "invalid settings .*gradient_smoothing"),
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
    from diffad.postprocess import combine, normalise
    from diffad.scoring import RawMaps

    detector = load_checkpoint(tiny_checkpoint)
    calibration, scoring = detector.calibration, detector.scoring
    image = detector.preprocess(sorted((tiny_dataset / "test" / "good").iterdir())[0])
    raw = detector.raw_maps(image[None])
    rows, size = calibration.rows(raw.timesteps), raw.kl.shape[-2:]
    # Maps that equal the normal mean at every position are exactly typical: zero after centring.
    typical = RawMaps(raw.timesteps, calibration.kl.centres(rows, size)[None], calibration.rgb.centres(rows, size)[None],
                      {k: s.centres(rows, size)[None] for k, s in calibration.features.items()})
    every = dataclasses.replace(scoring, centre_by_position=("kl", "rgb", "feature"))
    assert np.abs(combine(normalise(typical, calibration, every), calibration, every)[0].anomaly).max() < 1e-5
    # By default only the feature maps are centred per position.
    z = normalise(typical, calibration, scoring)
    assert z.features[calibration.feature_pool[0]].abs().max() < 1e-5 and z.kl.abs().max() > 0.1
    # Centred on one mean per timestep instead, the same maps are far from zero.
    per_map = dataclasses.replace(scoring, centre_by_position=())
    assert np.abs(combine(normalise(typical, calibration, per_map), calibration, per_map)[0].anomaly).max() > 0.1


def test_per_image_normalisation_ignores_calibration_scale_and_offset(tiny_checkpoint, tiny_dataset):
    from diffad.postprocess import combine, normalise

    detector = load_checkpoint(tiny_checkpoint)
    calibration = detector.calibration
    image = detector.preprocess(sorted((tiny_dataset / "test" / "good").iterdir())[0])
    raw = detector.raw_maps(image[None])
    per_image = dataclasses.replace(detector.scoring, normalisation="per_image", alpha=1.0)
    calibrated = dataclasses.replace(detector.scoring, alpha=1.0)

    def anomaly(maps, scoring):
        return combine(normalise(maps, calibration, scoring), calibration, scoring)[0].anomaly

    before = anomaly(raw, per_image), anomaly(raw, calibrated)
    # Each timestep's map becomes mean 0, std 1 on its own, so the sum over timesteps has mean 0.
    assert abs(before[0].mean()) < 1e-4
    # (an offset on the maps' own scale, and a tolerance for float32: a KL map that varies little around its mean
    # loses digits when centred)
    scaled = dataclasses.replace(raw, kl=7.0 * raw.kl + 3.0 * raw.kl.max())
    after = anomaly(scaled, per_image), anomaly(scaled, calibrated)
    np.testing.assert_allclose(after[0], before[0], atol=1e-2)
    assert np.abs(after[1] - before[1]).max() > 1.0
    with pytest.raises(ValueError, match="normalisation"):
        dataclasses.replace(detector.scoring, normalisation="per_batch")


def test_checkpoints_without_position_means_still_load_and_tampered_ones_are_refused(tiny_checkpoint, tiny_dataset, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path)
    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    save_file({k: v for k, v in tensors.items() if not k.startswith("calibration.position_mean")}, str(weights))
    older = load_checkpoint(folder)
    assert older.calibration.kl.position_mean is None and np.isfinite(predict(older, tiny_dataset).score)
    tensors["calibration.position_mean.kl"] = tensors["calibration.position_mean.kl"][:, :, :-1].contiguous()
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="position-wise normal means"):
        load_checkpoint(folder)


@pytest.mark.parametrize("section", ["scoring", "calibration", "net", "morph"])
def test_an_unknown_config_key_is_an_error_naming_it(tiny_checkpoint, tmp_path, section):
    folder = copy_of(tiny_checkpoint, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.setdefault(section, {})["patchh"] = 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json: invalid settings .*unknown .*'patchh'"):
        load_checkpoint(folder)


def test_a_version_2_layout_migrates_with_its_pooled_statistics_and_position_means():
    from diffad.checkpoint import migrate

    r, stats = 8, {"kl": [0.0, 1.0], "feature": [2.0, 3.0], "feature@3": [4.0, 5.0], "rgb": [6.0, 7.0]}
    config = {"format_version": 2, "category": "part", "scoring": {"pixel_map": "rgb", "feature_pool": [1, 3], "smoothing_sigma": 2.0},
              "calibration": {"feature_pool": [1, 3], "pixel_threshold": 1.5, "step_stats": {"200": stats, "20": stats},
                              "smoothing_validation": {"2.0": {"pixel_auroc": 0.9, "aupro": 0.8}}}}
    full = torch.arange(2 * 3 * r * r, dtype=torch.float16).view(2, 3, r, r)  # rows for t = 200, then 20
    tensors = {"extras.position_mean": full, "extras.position_mean_pooled": torch.zeros(2, 1, 2, 2),
               "extras.position_mean_timesteps": torch.tensor([200, 20]), "extras.gaussian_dims": torch.arange(4)}
    config, tensors = migrate(config, tensors)
    assert config["scoring"] == {"pixel_kind": "rgb", "centre_by_position": ["kl", "rgb", "feature"]} and config["calibration"]["smoothing_sigma"] == 2.0
    calibration = config["calibration"]
    assert calibration["timesteps"] == [20, 200] and calibration["mask_threshold"] == 1.5
    assert calibration["features"] == [{"pool": 1, "mean": [2.0, 2.0], "std": [3.0, 3.0]}, {"pool": 3, "mean": [4.0, 4.0], "std": [5.0, 5.0]}]
    assert torch.equal(tensors["calibration.position_mean.rgb"], full[[1, 0], 2])
    assert tensors["calibration.position_mean.feature_3"].shape == (2, 2, 2) and "calibration.gaussian_dims" in tensors
    # A version-2 calibration written when one pool size was all there was: its "feature" map was that size.
    config = {"format_version": 2, "category": "part", "scoring": {"feature_pool": 3},
              "calibration": {"feature_pool": 3, "step_stats": {"20": {"kl": [0, 1], "feature": [2, 3], "rgb": [0, 1]}}}}
    assert migrate(config)[0]["calibration"]["features"] == [{"pool": 3, "mean": [2], "std": [3]}]


def test_migrations_keep_what_old_checkpoints_meant():
    from diffad.checkpoint import MIGRATIONS

    config, _ = MIGRATIONS[1]({"format_version": 1, "net": {"patch": 4}}, None)
    assert config["format_version"] == 2 and config["net"] == {"prediction": "eps", "patch": 4}
    # Version 3 centred every map per position or none; version 4 names them, so old checkpoints score as before.
    for old, new in ((True, ["kl", "rgb", "feature"]), (False, []), (None, ["kl", "rgb", "feature"])):
        scoring = {} if old is None else {"centre_by_position": old}
        config, _ = MIGRATIONS[3]({"format_version": 3, "scoring": scoring}, None)
        assert config["format_version"] == 4 and config["scoring"]["centre_by_position"] == new
