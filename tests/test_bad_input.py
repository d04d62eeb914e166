"""Bad input, family by family, with generated cases: each gets a clear error (or a documented conversion), never a crash.

Families: corrupt files, huge images, unusual image modes and sizes (library level), out-of-range API parameters and bad
uploads (through the running app). benchmarks/load_test.py reports how many cases each family has.
"""
import io
import math
import resource
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from diffad import load_checkpoint
from diffad.data import DataError, read_image

NOISE = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
FORMATS = {"png": "PNG", "jpg": "JPEG", "gif": "GIF", "webp": "WEBP", "tif": "TIFF", "bmp": "BMP"}


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def corrupt_file_cases() -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes, must_fail). Damaged real files may still decode to something; non-images never may."""
    cases = {
        "empty.png": (b"", True),
        "text.png": (b"this is not an image\n", True),
        "drawing.svg": (b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><rect width="9" height="9"/></svg>', True),
        "doc.pdf": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", True),
        "page.html": (b"<!doctype html><html><body>hello</body></html>", True),
        "archive.zip": (b"PK\x03\x04" + bytes(40), True),
        "random.jpg": (np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(), True),
        "signature_only.png": (b"\x89PNG\r\n\x1a\n", True),
        "soi_only.jpg": (b"\xff\xd8\xff", True),
    }
    for ext, fmt in FORMATS.items():
        data = encode(Image.fromarray(NOISE), fmt)
        for percent in (5, 20, 50, 80, 95):
            cases[f"truncated_{percent}.{ext}"] = (data[: len(data) * percent // 100], percent == 5)
        for seed in range(3):
            damaged = np.frombuffer(data, dtype=np.uint8).copy()
            damaged[np.random.default_rng(seed).integers(16, len(data), 24)] ^= 0xA5
            cases[f"flipped_{seed}.{ext}"] = (damaged.tobytes(), False)
    return cases


def _patch_png_size(data: bytes, width: int, height: int) -> bytes:
    data = bytearray(data)
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(data)


def _patch_jpeg_size(data: bytes, width: int, height: int) -> bytes:
    data = bytearray(data)
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _patch_gif_size(data: bytes, width: int, height: int) -> bytes:
    return data[:6] + struct.pack("<HH", width, height) + data[10:]


def _patch_bmp_size(data: bytes, width: int, height: int) -> bytes:
    return data[:18] + struct.pack("<ii", width, height) + data[26:]


def huge_image_cases() -> dict[str, bytes]:
    """Tiny files whose headers claim more pixels than diffad.data.MAX_IMAGE_PIXELS (decompression bombs)."""
    small = Image.fromarray(NOISE[:8, :8])
    patches = {"png": ("PNG", _patch_png_size), "jpg": ("JPEG", _patch_jpeg_size), "gif": ("GIF", _patch_gif_size),
               "bmp": ("BMP", _patch_bmp_size)}
    sizes = {"gif": [(65535, 65535), (60000, 900)], "jpg": [(65000, 65000), (30000, 1700)]}
    cases = {}
    for ext, (fmt, patch) in patches.items():
        for width, height in sizes.get(ext, [(30000, 30000), (7072, 7072), (1_000_000, 60)]):
            cases[f"{width}x{height}.{ext}"] = patch(encode(small, fmt), width, height)
    return cases


def _mode_image(mode: str, size: tuple[int, int]) -> Image.Image:
    w, h = size
    if mode == "I;16":
        return Image.fromarray((np.arange(w * h, dtype=np.uint16).reshape(h, w) * 997) % 65535)
    if mode in ("I", "F"):
        return Image.fromarray(np.linspace(0, 65535 if mode == "I" else 1, w * h).reshape(h, w).astype(
            np.int32 if mode == "I" else np.float32))
    return Image.fromarray(NOISE).resize(size).convert(mode)


MODES = ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "I;16", "I", "F", "CMYK", "YCbCr", "LAB", "HSV"]
SIZES = [(1, 1), (8, 8), (3, 500), (640, 17)]


def mode_cases() -> list[tuple[str, tuple[int, int]]]:
    return [(mode, size) for mode in MODES for size in SIZES]


def as_upload(image: Image.Image):
    """The bytes a user would upload for this image (the format that keeps its mode), else the image itself."""
    # Pillow deprecates 32-bit integer PNGs; TIFF keeps those modes.
    for fmt in ("TIFF", "PNG", "JPEG") if image.mode in ("I", "F") else ("PNG", "TIFF", "JPEG"):
        try:
            data = encode(image, fmt)
        except (OSError, ValueError, KeyError):
            continue
        if Image.open(io.BytesIO(data)).mode == image.mode:
            return io.BytesIO(data)
    return image


FILE_CASES = corrupt_file_cases()
HUGE_CASES = huge_image_cases()
MODE_CASES = mode_cases()


@pytest.mark.parametrize("name", sorted(FILE_CASES))
def test_corrupt_files_give_a_clear_error_naming_the_file(tmp_path, name):
    data, must_fail = FILE_CASES[name]
    path = tmp_path / name
    path.write_bytes(data)
    try:
        image = read_image(path)
    except DataError as exc:
        assert name in str(exc)
        assert any(s in str(exc) for s in ("not a readable image", "corrupt or truncated", "larger than the limit"))
        return
    assert not must_fail, f"{name} was accepted"
    assert image.mode == "RGB" and image.size == (48, 40)


@pytest.mark.parametrize("name", sorted(HUGE_CASES))
def test_huge_images_are_refused_before_decoding(name):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="larger than the limit of 50,000,000 pixels"):
        read_image(io.BytesIO(HUGE_CASES[name]))
    # Decoding even the smallest of these would take over 150 MB.
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB


@pytest.mark.parametrize("mode,size", MODE_CASES, ids=[f"{m}-{w}x{h}" for m, (w, h) in MODE_CASES])
def test_every_mode_and_size_becomes_8_bit_rgb(mode, size):
    image = read_image(as_upload(_mode_image(mode, size)))
    assert image.mode == "RGB" and image.size == size


def rgb_of(image: Image.Image) -> np.ndarray:
    return np.asarray(read_image(io.BytesIO(encode(image))))


def test_conversions_keep_the_picture():
    assert rgb_of(Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))).min() == 255  # 16-bit white stays white
    assert rgb_of(Image.new("1", (8, 8), 1)).min() == 255
    palette = Image.new("P", (8, 8), 3)
    palette.putpalette([0, 0, 0] * 3 + [10, 20, 30] + [0, 0, 0] * 252)
    assert tuple(rgb_of(palette)[0, 0]) == (10, 20, 30)
    assert tuple(rgb_of(Image.new("L", (8, 8), 77))[0, 0]) == (77, 77, 77)
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    assert tuple(rgb_of(rgba)[0, 0]) == (255, 0, 0) and tuple(rgb_of(rgba)[5, 5]) == (255, 255, 255)  # white background
    cmyk = np.asarray(read_image(io.BytesIO(encode(Image.new("CMYK", (16, 8), (0, 255, 255, 0)), "JPEG", quality=95))))
    assert cmyk[..., 0].mean() > 200 and cmyk[..., 1].mean() < 60  # red


def test_exif_orientation_and_animations():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: the displayed image is portrait
    assert read_image(io.BytesIO(encode(Image.new("RGB", (16, 8), "blue"), "JPEG", exif=exif))).size == (8, 16)
    frames = [Image.new("RGB", (8, 8), colour) for colour in ("red", "blue")]
    for fmt in ("GIF", "WEBP"):
        animated = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, lossless=True)
        assert Image.open(io.BytesIO(animated)).n_frames == 2
        assert tuple(np.asarray(read_image(io.BytesIO(animated)))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize("mode,size", [("L", (8, 8)), ("I;16", (1, 1)), ("RGBA", (3, 500)), ("CMYK", (640, 17))])
def test_odd_images_score_like_any_other(tiny_checkpoint, mode, size):
    detector = load_checkpoint(tiny_checkpoint)
    prediction = detector.predict(as_upload(_mode_image(mode, size)))
    resolution = detector.net.config.resolution
    assert prediction.anomaly_map.shape == (resolution, resolution)
    assert np.isfinite(prediction.anomaly_map).all() and math.isfinite(prediction.score)


# Through the app's API: (endpoint, arguments, expected message). "IMAGE" stands for an uploaded example image.
API_CASES = [
    ("/timestep", (-5,), "less than minimum"),
    ("/timestep", (10**9,), "greater than maximum"),
    ("/threshold", ("Combined", -1.0, 1.0), "less than minimum"),
    ("/threshold", ("Combined", 1e12, 1.0), "greater than maximum"),
    ("/threshold", ("No such map", 1.0, 1.0), "not in the list of choices"),
    ("/morph", ("IMAGE", "part", -0.1, 5, 2, 0), "less than minimum"),
    ("/morph", ("IMAGE", "part", 1.0, 5, 2, 0), "greater than maximum"),
    ("/morph", ("IMAGE", "part", 0.02, 0, 2, 0), "less than minimum"),
    ("/morph", ("IMAGE", "part", 0.02, 10**9, 2, 0), "greater than maximum"),
    ("/morph", ("IMAGE", "part", 0.02, 5, 10**9, 0), "greater than maximum"),
    ("/morph", ("IMAGE", "part", 0.02, 5, -1, 0), "less than minimum"),
    ("/morph", ("IMAGE", "part", 0.02, 5, 2, -1), "less than minimum"),
    ("/morph", ("IMAGE", "part", 0.02, 5, 2, 1e30), "greater than maximum"),
    ("/morph", ("IMAGE", "part", 0.02, 5, 2, 0, 5), "greater than maximum"),
    ("/morph", ("IMAGE", "../part", 0.02, 5, 2, 0), "not in the list of choices"),
    *[("/analyse", ("IMAGE", name), "not in the list of choices")
      for name in ("../../etc/passwd", "", "nope", "part/../part", "PART", "part\x00", "a" * 500)],
]
# NaN and infinity are not JSON, so gradio_client refuses to send them; a raw request still can: (endpoint, data, message).
RAW_CASES = [
    ("timestep", "[NaN]", "finite number"),
    ("threshold", '["Combined", NaN, 1.0]', "finite number"),
    ("threshold", '["Combined", 1.0, Infinity]', "greater than maximum"),
    ("threshold", '["Combined", 1.0, -Infinity]', "less than minimum"),
    ("morph", '[null, "part", NaN, 5, 2, 0, true]', "finite number"),
    ("morph", '[null, "part", 0.02, 5, 2, NaN, true]', "cannot convert float NaN to integer"),
    ("analyse", '[null, "part"]', "Upload a photo"),
    ("analyse", '[{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "part"]', "Cannot move|not allowed|File not found"),
    ("paint", '[null, "part"]', "Put a photo in the editor first"),
    ("paint", '[{"background": {"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, "layers": [], "composite": null}, '
              '"part"]', "Cannot move|not allowed|File not found"),
]
BAD_UPLOADS = {name: FILE_CASES[name][0] for name in
               ("empty.png", "text.png", "doc.pdf", "truncated_20.png", "truncated_50.jpg", "flipped_0.gif")}
BAD_UPLOADS.update({name: HUGE_CASES[name] for name in ("30000x30000.png", "1000000x60.bmp")})


@pytest.fixture(scope="module")
def analysed_client(app_server, tiny_dataset):
    """A client session that has analysed an image, so that scrub and threshold calls reach their validation."""
    from gradio_client import Client, handle_file

    client = Client(app_server, verbose=False)
    client.predict(handle_file(str(sorted((tiny_dataset / "test" / "hole").iterdir())[0])), "part", api_name="/analyse")
    return client


@pytest.mark.parametrize("endpoint,args,message", API_CASES, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(API_CASES)])
def test_out_of_range_api_parameters_are_rejected(analysed_client, tiny_dataset, endpoint, args, message):
    from gradio_client import handle_file

    image = handle_file(str(sorted((tiny_dataset / "test" / "hole").iterdir())[0]))
    args = [image if a == "IMAGE" else a for a in args]
    with pytest.raises(Exception, match=message):
        analysed_client.predict(*args, api_name=endpoint)


@pytest.mark.parametrize("endpoint,data,message", RAW_CASES, ids=[f"{e}-{i}" for i, (e, _, _) in enumerate(RAW_CASES)])
def test_non_json_numbers_and_forged_requests_are_rejected(app_server, analysed_client, endpoint, data, message):
    import json
    import re
    import urllib.request

    body = json.dumps({"data": [], "session_hash": analysed_client.session_hash}).replace("[]", data).encode()
    request = urllib.request.Request(f"{app_server}gradio_api/call/{endpoint}", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{app_server}gradio_api/call/{endpoint}/{event_id}", timeout=300) as response:
        stream = response.read().decode()
    assert "event: error" in stream and re.search(message, stream), stream


@pytest.mark.parametrize("name", sorted(BAD_UPLOADS))
def test_bad_uploads_get_a_clear_message(analysed_client, tmp_path, name):
    from gradio_client import handle_file

    path = tmp_path / name
    path.write_bytes(BAD_UPLOADS[name])
    try:
        analysed_client.predict(handle_file(str(path)), "part", api_name="/analyse")
    except Exception as exc:
        assert any(s in str(exc) for s in ("not a readable", "corrupt or truncated", "larger than the limit",
                                           "cannot identify image file", "decompression bomb")), str(exc)
    else:
        assert not FILE_CASES.get(name, (b"", True))[1], f"{name} was accepted"


def test_unusual_uploads_are_analysed(analysed_client, tmp_path):
    from gradio_client import handle_file

    for mode in ("I;16", "RGBA", "P", "L"):
        path = tmp_path / f"{mode.replace(';', '')}.png"
        _mode_image(mode, (40, 48)).save(path)
        details = analysed_client.predict(handle_file(str(path)), "part", api_name="/analyse")[1]
        assert math.isfinite(details["score"])
