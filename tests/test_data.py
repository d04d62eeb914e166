"""Data folders, masks and training-set loading (single images: tests/test_bad_input.py)."""
import pytest

from diffad.data import DataError, load_images, load_mask, list_test_samples, train_folder


def test_folders_and_masks(tmp_path, tiny_dataset):
    with pytest.raises(DataError, match="does not exist"):
        train_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        train_folder(tmp_path / "empty")
    assert train_folder(tiny_dataset) == tiny_dataset / "train" / "good"
    samples = list_test_samples(tiny_dataset)
    assert {s.defect for s in samples} == {"good", "hole", "colour_spot"}
    assert all(s.mask_path is not None for s in samples if s.is_anomalous)
    with pytest.raises(DataError, match="mask .* is 64x64 but its image is 32x32"):
        load_mask(samples[-1].mask_path, (32, 32), 64)
    with pytest.raises(DataError, match="no test/ folder"):
        list_test_samples(tiny_dataset / "train")


def test_unreadable_files_are_skipped_and_counted(tmp_path, tiny_dataset):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    good = sorted((tiny_dataset / "train" / "good").iterdir())[:2]
    images, kept, skipped = load_images(good + [bad], 32)
    assert images.shape == (2, 3, 32, 32) and len(kept) == 2 and len(skipped) == 1 and "bad.png" in skipped[0]
    assert images.min() >= -1 and images.max() <= 1
