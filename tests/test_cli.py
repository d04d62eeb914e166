import csv
import json
import subprocess
import sys

import numpy as np

from diffad.cli import main
from tests.conftest import copy_of


def test_predict_scores_a_folder_and_skips_bad_files(tiny_checkpoint, tiny_dataset, tmp_path, capsys):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for path in sorted((tiny_dataset / "test" / "hole").iterdir()):
        (folder / path.name).write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(folder), "--out", str(tmp_path / "out")]) == 0
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
    assert [r["file"].split("/")[-1] for r in rows] == ["000.png", "001.png"]
    assert all(r["verdict"] in ("normal", "anomalous") and 0 <= float(r["percentile"]) <= 100 for r in rows)
    assert (tmp_path / "out" / "000_overlay.png").stat().st_size > 0
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "1 unreadable skipped" in captured.out


def test_evaluate_writes_metrics_and_overlays(tiny_checkpoint, tiny_dataset, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--out", str(out), "--save-maps"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"overall", "hole", "colour_spot"}
    assert 0 <= metrics["overall"]["pixel_auroc"] <= 1 and metrics["overall"]["images"] == 6
    assert "| overall |" in (out / "metrics.md").read_text()
    assert len(list((out / "maps").glob("*.png"))) == 6


def test_evaluate_reports_each_map_and_the_verdicts_operating_point(tiny_checkpoint, tiny_dataset, tmp_path):
    from diffad import load_checkpoint
    from diffad.data import list_test_samples

    runs = {}
    for kind in ("combined", "kl", "feature"):
        assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--out", str(tmp_path / kind), "--map", kind]) == 0
        runs[kind] = json.loads((tmp_path / kind / "metrics.json").read_text())["overall"]
    assert runs["kl"]["pixel_auroc"] != runs["feature"]["pixel_auroc"]
    assert "operating_point" not in runs["kl"]  # the verdict threshold belongs to the combined score
    # The operating point is what the checkpoint's own verdicts do on the test images.
    detector = load_checkpoint(tiny_checkpoint)
    verdicts = [(s.is_anomalous, detector.predict(s.path).is_anomalous) for s in list_test_samples(tiny_dataset)]
    point = runs["combined"]["operating_point"]
    assert point["threshold"] == detector.calibration.image_threshold
    assert point["recall"] == np.mean([flagged for defective, flagged in verdicts if defective])
    assert point["false_positive_rate"] == np.mean([flagged for defective, flagged in verdicts if not defective])


def test_examples_are_deterministic_documented_and_masked(tiny_checkpoint, tiny_dataset, tmp_path):
    import hashlib

    import numpy as np
    from PIL import Image

    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert main(["examples", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_dataset), "--out", str(out),
                     "--defects", "hole", "scratch", "--polish-loops", "3"]) == 0
        runs.append(json.loads((out / "manifest.json").read_text()))
    assert runs[0] == runs[1]  # same seed, same images (the manifest carries their hashes)
    from diffad.data import list_images, load_images, train_folder
    from diffad.examples import constant_pixels

    images, _, _ = load_images(list_images(train_folder(tiny_dataset)), 32)
    assert runs[0]["constant_background_fraction"] == round(float(constant_pixels(images).float().mean()), 3)
    entries = {e["file"]: e for e in runs[0]["images"]}
    normals = [e for e in entries.values() if e["kind"] == "normal"]
    assert set(entries) == {f"normal_{i}.png" for i in range(len(normals))} | {"hole.png", "scratch.png"}
    # Fewer than the two normal examples asked for only when the samples did not score normal, and the manifest says so.
    assert (len(normals) < 2) == ("no_normal_example" in runs[0])
    for e in entries.values():
        picture = tmp_path / "a" / e["file"]
        assert hashlib.sha256(picture.read_bytes()).hexdigest() == e["sha256"]
        assert e["polish_loops"] in (0, 1, 2, 3) and "diffusion sample" in e["source"]  # never past --polish-loops
    from diffad import load_checkpoint

    detector = load_checkpoint(tiny_checkpoint)
    for e in normals:
        # the score of the saved 8-bit file, as the app shows it, not of the float picture before saving
        assert abs(detector.predict(tmp_path / "a" / e["file"]).score - e["score"]) <= 0.005
        assert e["score"] <= detector.calibration.image_threshold
    mask = np.asarray(Image.open(tmp_path / "a" / entries["hole.png"]["mask"])) > 127
    assert 0 < mask.mean() < 0.5


def test_examples_call_no_sample_normal_that_the_model_flags(tiny_checkpoint, tiny_dataset, tmp_path):
    folder = copy_of(tiny_checkpoint, tmp_path / "strict")
    config = json.loads((folder / "config.json").read_text())
    config["calibration"]["image_threshold"] = -1e9  # every sample is flagged
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "examples"
    assert main(["examples", "--checkpoint", str(folder), "--data", str(tiny_dataset), "--out", str(out),
                 "--defects", "hole", "scratch", "--polish-loops", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [e["kind"] for e in manifest["images"]] == ["hole", "scratch"] and not list(out.glob("normal_*.png"))
    assert "0 of the 4 diffusion samples scored normal" in manifest["no_normal_example"]


def test_constant_background_is_found_and_kept_in_samples(tiny_checkpoint):
    import numpy as np
    import torch

    from diffad import load_checkpoint
    from diffad.examples import constant_pixels, normal_sample

    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g) * 2 - 1
    images[:, :, :8, :] = 1.0  # a saturated white band in every image
    images[:, 1, 8:, :4] = 0.5  # constant in one channel only: not background
    constant = constant_pixels(images)
    assert constant[:8].all() and not constant[8:].any()
    detector = load_checkpoint(tiny_checkpoint)
    r = detector.resolution
    stack = torch.rand(4, 3, r, r, generator=g) * 2 - 1
    stack[:, :, : r // 4] = 1.0
    # Without polishing (which may touch whatever this barely trained model flags), the constant band stays white.
    picture, _ = normal_sample(detector, stack.mean(0), 50, seed=0, polish_loops=0, constant=constant_pixels(stack))
    untouched, _ = normal_sample(detector, stack.mean(0), 50, seed=0, polish_loops=0)
    off_white = [np.abs(255 - p[: r // 4].astype(float)).mean() for p in (picture, untouched)]
    assert off_white[0] == 0 and off_white[1] > 1


def test_errors_are_one_clear_line_without_traceback(tiny_checkpoint, tmp_path):
    cases = [
        (["predict", "--checkpoint", str(tmp_path / "none"), "x.png", "--out", str(tmp_path)], "does not exist"),
        (["predict", "--checkpoint", str(tiny_checkpoint.parent), "--category", "bottle", "x.png", "--out", str(tmp_path)], "unknown category"),
        (["predict", "--checkpoint", str(tiny_checkpoint), str(tmp_path / "missing.png"), "--out", str(tmp_path)], "no such file"),
        (["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "c")], "does not exist"),
        (["train", "--data", str(tmp_path), "--out", str(tiny_checkpoint)], "unfinished run"),
        (["train", "--data", str(tmp_path), "--out", str(tmp_path / "c"), "--net", '{"patchh": 2}'], "unknown network setting(s) 'patchh'"),
    ]
    for args, message in cases:
        result = subprocess.run([sys.executable, "-m", "diffad", *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
