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
