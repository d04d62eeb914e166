import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffad.data import DataError, load_images, load_mask, read_image, list_test_samples, train_folder


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=kwargs.pop("format", "PNG"), **kwargs)
    return buffer.getvalue()


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a huge size, with almost no pixel data behind it."""
    data = bytearray(png_bytes(Image.new("RGB", (8, 8))))
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


BAD_FILES = {
    "empty.png": b"",
    "text.png": b"this is not an image\n",
    "truncated.png": png_bytes(Image.new("RGB", (64, 64), "red"))[:60],
    "truncated.jpg": png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)), format="JPEG")[:300],
    "drawing.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
    "doc.pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "bomb.png": huge_png_header(30000, 30000),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files_give_a_clear_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(BAD_FILES[name])
    with pytest.raises(DataError, match=name.replace(".", r"\.")):
        read_image(path)


def test_huge_image_is_refused_before_decoding():
    with pytest.raises(DataError, match="larger than the limit"):
        read_image(io.BytesIO(huge_png_header(30000, 30000)))


def rgb_of(image: Image.Image) -> np.ndarray:
    return np.asarray(read_image(io.BytesIO(png_bytes(image))))


def test_unusual_modes_become_rgb():
    grey16 = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    assert rgb_of(grey16).min() == 255 and rgb_of(grey16).shape == (8, 8, 3)
    assert rgb_of(Image.new("1", (8, 8), 1)).min() == 255
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert tuple(rgb_of(palette)[0, 0]) == (10, 20, 30)
    assert tuple(rgb_of(Image.new("L", (8, 8), 77))[0, 0]) == (77, 77, 77)


def test_rgba_is_composited_on_white():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    rgb = rgb_of(rgba)
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[5, 5]) == (255, 255, 255)


def test_cmyk_jpeg_and_exif_orientation():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))
    rgb = np.asarray(read_image(io.BytesIO(png_bytes(cmyk, format="JPEG", quality=95))))
    assert rgb.shape == (8, 16, 3) and rgb[..., 0].mean() > 200 and rgb[..., 1].mean() < 60
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the displayed image is portrait
    landscape = Image.new("RGB", (16, 8), "blue")
    assert read_image(io.BytesIO(png_bytes(landscape, format="JPEG", exif=exif))).size == (8, 16)


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(read_image(io.BytesIO(buffer.getvalue())))[0, 0]) == (255, 0, 0)


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
