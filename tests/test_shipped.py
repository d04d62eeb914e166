"""The shipped checkpoints on real data and on the project's own examples."""
import json

import numpy as np
import pytest

from diffad.data import load_mask, read_image
from diffad.metrics import auroc
from tests.conftest import BOTTLE, CHECKPOINTS, MAGNETIC_TILE, ROOT, needs_bottle, needs_magnetic_tile

EXAMPLES = ROOT / "examples"


@needs_bottle
def test_bottle_ranks_defects_above_good_images_and_maps_overlap_masks(bottle_detector):
    good = sorted((BOTTLE / "test" / "good").iterdir())[:4]
    defective = [sorted((BOTTLE / "test" / d).iterdir())[i] for d in ("broken_large", "broken_small", "contamination") for i in (0, 1)]
    good_scores = [bottle_detector.predict(p).score for p in good]
    maps, masks, bad_scores = [], [], []
    for path in defective:
        prediction = bottle_detector.predict(path)
        bad_scores.append(prediction.score)
        mask_path = BOTTLE / "ground_truth" / path.parent.name / f"{path.stem}_mask.png"
        masks.append(load_mask(mask_path, read_image(path).size, bottle_detector.resolution))
        maps.append(prediction.anomaly_map)
    assert min(bad_scores) > max(good_scores)
    assert auroc(np.stack(masks), np.stack(maps)) > 0.9
    assert sum(p.is_anomalous for p in map(bottle_detector.predict, defective[:2])) == 2


def most_elongated(folder, n: int) -> list:
    from PIL import Image

    def elongation(path) -> float:
        with Image.open(path) as image:  # the header only
            return max(image.size) / min(image.size)

    return sorted(sorted(folder.iterdir()), key=elongation, reverse=True)[:n]


@needs_magnetic_tile
def test_magnetic_tile_scores_elongated_photos_at_their_own_aspect():
    """The shipped tile model was trained on windows at each photo's aspect and scores photos so: on the most
    elongated real test tiles, cracks rank above good tiles and the map, at the photo's aspect, finds the crack."""
    from diffad import load_checkpoint
    from diffad.windows import layout_for

    detector = load_checkpoint(CHECKPOINTS / "magnetic_tile")
    assert detector.scoring.aspect == "windows"
    good, cracks = most_elongated(MAGNETIC_TILE / "test" / "good", 3), most_elongated(MAGNETIC_TILE / "test" / "Crack", 3)
    predictions = {}
    for path in good + cracks:
        layout = layout_for(*read_image(path).size, detector.resolution)
        predictions[path] = detector.predict(path)
        assert layout.count >= 4 and predictions[path].anomaly_map.shape == (layout.height, layout.width)
    assert max(predictions[p].score for p in good) < min(predictions[p].score for p in cracks)
    assert not any(predictions[p].is_anomalous for p in good)
    for path in cracks:
        mask = np.asarray(read_image(MAGNETIC_TILE / "ground_truth" / "Crack" / f"{path.stem}_mask.png").convert("L")
                          .resize(predictions[path].anomaly_map.shape[::-1])) > 127
        assert auroc(mask[None], predictions[path].anomaly_map[None]) > 0.9, path.name


@pytest.mark.parametrize("category", ["bottle", "magnetic_tile"])
def test_examples_are_ranked_and_documented(category):
    from diffad import load_checkpoint

    manifest = json.loads((EXAMPLES / category / "manifest.json").read_text())
    entries = manifest["images"]
    normal = [e for e in entries if e["kind"] == "normal"]
    defective = [e for e in entries if e["kind"] != "normal"]
    # A category ships normal examples only where its model can make some that it scores normal, and says why not.
    assert len(defective) >= 4 and (len(normal) >= 2 or "no_normal_example" in manifest)
    detector = load_checkpoint(CHECKPOINTS / category)
    predictions = {e["file"]: detector.predict(EXAMPLES / category / e["file"]) for e in entries}
    assert all(not predictions[e["file"]].is_anomalous for e in normal)
    assert all(predictions[e["file"]].is_anomalous for e in defective)
    assert all(abs(predictions[e["file"]].score - e["score"]) < 0.05 for e in entries if "score" in e)  # not stale
    for e in defective:  # and the map is higher on the synthetic defect than around it
        mask = np.asarray(read_image(EXAMPLES / category / e["mask"]).convert("L")) > 127
        amap = predictions[e["file"]].anomaly_map
        assert amap[mask].mean() > amap[~mask].mean() + 3.0, e["file"]


def test_shipped_checkpoints_are_small_and_safetensors_only():
    for category in ("bottle", "magnetic_tile"):
        folder = CHECKPOINTS / category
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors"} <= files and not any(n.endswith((".pt", ".pth", ".pkl", ".bin")) for n in files)
        assert sum(p.stat().st_size for p in folder.iterdir()) < 30 * 2**20


def test_shipped_checkpoints_name_their_dataset_for_the_hub_card():
    from diffad.hub import dataset_id

    for category, dataset in (("bottle", "mvtec_ad"), ("magnetic_tile", "magnetic_tile")):
        config = json.loads((CHECKPOINTS / category / "config.json").read_text())
        assert dataset_id(config, None) == dataset
