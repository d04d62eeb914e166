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
