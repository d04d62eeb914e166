"""Concurrent users share one loaded detector: their results must not mix."""
import threading

import numpy as np
import torch

from diffad import load_checkpoint
from diffad.models import DiffADNet, NetConfig
from tests.conftest import TINY_NET


def test_concurrent_forwards_keep_their_own_features():
    torch.manual_seed(0)
    net = DiffADNet(NetConfig(resolution=32, feature_channels=8, **TINY_NET)).eval()
    inputs = [torch.randn(1, 3, 32, 32) * (i + 1) for i in range(4)]
    t = torch.tensor([50])
    with torch.no_grad():
        expected = [net(x, t).features for x in inputs]
    mismatches = []

    def worker(i):
        with torch.no_grad():
            for _ in range(60):
                if not torch.equal(net(inputs[i], t).features, expected[i]):
                    mismatches.append(i)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not mismatches and not net._tapped


def test_parallel_predictions_equal_sequential_ones(tiny_checkpoint, tiny_dataset):
    detector = load_checkpoint(tiny_checkpoint)
    images = sorted((tiny_dataset / "test").rglob("*.png"))
    expected = {str(p): detector.predict(p).anomaly_map for p in images}
    results, errors = {}, []

    def worker(path):
        try:
            for _ in range(3):
                results.setdefault(str(path), []).append(detector.predict(path).anomaly_map)
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(p,)) for p in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for path, maps in results.items():
        assert all(np.array_equal(m, expected[path]) for m in maps)


def test_a_slow_load_blocks_only_its_own_category(monkeypatch):
    import time

    from diffad.registry import CheckpointRegistry

    registry = CheckpointRegistry("nowhere")
    release, loads = threading.Event(), []

    def load(category):
        loads.append(category)
        if category == "slow":  # a Hub download that takes its time
            release.wait(10)
        return object(), category

    monkeypatch.setattr(registry, "_load", load)
    slow = [threading.Thread(target=registry.get, args=("slow",)) for _ in range(2)]
    for thread in slow:
        thread.start()
    time.sleep(0.2)
    start = time.perf_counter()
    assert registry.get("fast")[1] == "fast"
    assert time.perf_counter() - start < 1.0
    release.set()
    for thread in slow:
        thread.join(5)
    assert loads.count("slow") == 1  # the second request waited for the first load instead of loading again


def test_moving_a_detector_leaves_the_shared_backbone_where_it_is(tiny_checkpoint):
    from diffad.detector import shared_backbone

    detector = load_checkpoint(tiny_checkpoint)
    cpu_backbone = shared_backbone()
    detector.to("meta")  # any other device
    assert detector.backbone is shared_backbone(device="meta") is not cpu_backbone
    assert next(cpu_backbone.parameters()).device.type == "cpu"
