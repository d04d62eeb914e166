import numpy as np
import pytest

from diffad.synth import DEFECT_TYPES, add_defect, textured_part


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_masks_are_exactly_the_changed_pixels(kind):
    image = textured_part(96, seed=3)
    defective, mask = add_defect(image, kind, seed=7, size=0.6)
    assert mask.any() and mask.mean() < (0.5 if kind == "uneven" else 0.2)  # uneven patches are wide by design
    np.testing.assert_array_equal(mask, np.any(defective != image, axis=-1))
    again, mask_again = add_defect(image, kind, seed=7, size=0.6)
    np.testing.assert_array_equal(again, defective)


def test_size_scales_defects_and_bad_parameters_are_rejected():
    image = textured_part(128, seed=0)
    small = add_defect(image, "stain", seed=1, size=0.1)[1].sum()
    large = add_defect(image, "stain", seed=1, size=1.0)[1].sum()
    assert large > 2 * small
    with pytest.raises(ValueError, match="unknown defect type"):
        add_defect(image, "dent")
    with pytest.raises(ValueError, match="size must be"):
        add_defect(image, "hole", size=0)


def test_uneven_patches_are_wide_and_faint():
    image = textured_part(128, seed=2)
    defective, mask = add_defect(image, "uneven", seed=4, size=0.5)
    change = np.abs(defective.astype(int) - image.astype(int)).max(axis=-1)
    assert mask.mean() > 0.05  # wider than any other kind at this size
    assert np.median(change[mask]) < 20  # while few pixels change by much


@pytest.mark.parametrize("kind", DEFECT_TYPES)
def test_a_defect_can_be_centred_on_a_chosen_point(kind):
    image = textured_part(96, seed=3)
    for x, y in ((30, 60), (70, 25)):
        defective, mask = add_defect(image, kind, seed=7, size=0.4, centre=(x, y))
        np.testing.assert_array_equal(mask, np.any(defective != image, axis=-1))
        rows, cols = np.nonzero(mask)
        # Within a few pixels: the defect's own pixels depend a little on the texture under it.
        assert abs(cols.mean() - x) < 4 and abs(rows.mean() - y) < 4, (cols.mean(), rows.mean())
    # At a corner the part that would fall outside is dropped; what is left is still exactly what changed.
    defective, mask = add_defect(image, kind, seed=7, size=0.4, centre=(1, 94))
    rows, cols = np.nonzero(mask)
    assert mask.any() and cols.mean() < 48 and rows.mean() > 48
    np.testing.assert_array_equal(mask, np.any(defective != image, axis=-1))
    with pytest.raises(ValueError, match="outside"):
        add_defect(image, kind, centre=(96, 10))


def test_without_a_centre_the_seed_places_the_defect_as_before():
    # The shipped examples and their manifests were made with seeded defects: these sums pin them.
    image = textured_part(64, seed=0)
    sums = {kind: int(add_defect(image, kind, seed=1, size=0.5)[0].astype(np.int64).sum()) for kind in DEFECT_TYPES}
    assert sums == {"scratch": 1051263, "crack": 1036327, "hole": 1025370, "stain": 1031066, "particle": 1055126,
                    "colour_spot": 1037316, "uneven": 1005155}
