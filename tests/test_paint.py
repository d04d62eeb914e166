"""diffad.paint: the painted mask, a defect placed at a click, and how well a map finds the painting."""
import numpy as np
import pytest
from PIL import Image

from diffad.paint import PAINT_TOLERANCE, auroc_sentence, canvas, painted_mask, pixel_auroc, place_defect
from diffad.synth import textured_part


def test_the_painted_mask_is_what_changed_beyond_the_tolerance():
    photo = textured_part(64, seed=1)
    painted = photo.copy()
    painted[10:20, 30:45] = (200, 30, 30)  # a brush stroke
    rng = np.random.default_rng(0)
    noise = rng.integers(-PAINT_TOLERANCE, PAINT_TOLERANCE + 1, photo.shape)  # re-encoding noise, not paint
    painted = np.clip(painted.astype(int) + noise * (painted == photo), 0, 255).astype(np.uint8)
    mask = painted_mask(photo, painted)
    expected = np.zeros((64, 64), bool)
    expected[10:20, 30:45] = True
    np.testing.assert_array_equal(mask, expected)


def test_an_rgba_painting_is_read_on_white_and_sizes_must_match():
    photo = np.full((8, 8, 3), 255, np.uint8)
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = 255
    rgba[2, 3] = (0, 0, 0, 255)
    rgba[5, 5, 3] = 0  # transparent: white, as read_image composites it
    assert painted_mask(photo, rgba).sum() == 1 and painted_mask(photo, rgba)[2, 3]
    with pytest.raises(ValueError, match="9×8 px but the photo under it is 8×8 px"):
        painted_mask(photo, np.zeros((8, 9, 3), np.uint8))


def test_a_placed_defect_is_centred_on_the_click_and_its_layer_is_exactly_the_defect():
    photo = textured_part(96, seed=2)
    result, mask, layer = place_defect(photo, "hole", (70, 30), seed=3)
    rows, cols = np.nonzero(mask)
    assert abs(cols.mean() - 70) < 3 and abs(rows.mean() - 30) < 3
    np.testing.assert_array_equal(layer[..., 3] > 0, mask)
    # The layer over the photo is the result, and the painted mask finds the defect.
    stacked = Image.alpha_composite(Image.fromarray(photo).convert("RGBA"), Image.fromarray(layer)).convert("RGB")
    np.testing.assert_array_equal(np.asarray(stacked), result)
    found = painted_mask(photo, result)
    assert found.sum() > 0.9 * mask.sum() and not (found & ~mask).any()


def test_pixel_auroc_ranks_painted_pixels_against_the_rest():
    mask = np.zeros((64, 64), bool)
    mask[20:30, 20:40] = True
    perfect = mask.astype(np.float32) + 0.01 * np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert pixel_auroc(perfect, mask) == 1.0
    assert pixel_auroc(-perfect, mask) == 0.0
    assert abs(pixel_auroc(np.random.default_rng(1).random((64, 64)), mask) - 0.5) < 0.05
    # A map at the model's resolution is resized to the mask (the photo's size) before ranking.
    coarse = np.zeros((16, 16), np.float32)
    coarse[5:8, 5:10] = 1.0
    assert pixel_auroc(coarse, mask) > 0.95
    assert "pixel AUROC **1.00** (1.0 = perfect, 0.5 = chance)" in auroc_sentence(1.0, mask)


def test_pixel_auroc_is_undefined_when_nothing_or_everything_is_painted():
    amap = np.random.default_rng(0).random((32, 32))
    for mask, why in ((np.zeros((32, 32), bool), "nothing is painted"), (np.ones((32, 32), bool), "covers the whole image")):
        value = pixel_auroc(amap, mask)
        assert np.isnan(value)
        assert "undefined" in auroc_sentence(value, mask) and why in auroc_sentence(value, mask)


def test_large_photos_are_shrunk_for_painting(tmp_path):
    path = tmp_path / "big.png"
    Image.fromarray(np.zeros((1500, 3000, 3), np.uint8)).save(path)
    assert canvas(path).shape == (512, 1024, 3)
    assert canvas(path, side=4000).shape == (1500, 3000, 3)
