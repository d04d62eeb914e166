"""Reading images and datasets (MVTec AD layout or a plain folder) robustly."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
# Larger images are refused before their pixels are decoded (decompression bombs, 30000x30000 uploads).
MAX_IMAGE_PIXELS = 50_000_000
# Transparent pixels are composited on this background (documented in the README).
ALPHA_BACKGROUND = (255, 255, 255)


class DataError(ValueError):
    """A data folder or image file that cannot be used, with a message meant for the user."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def read_image(source, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open a file path, bytes-like object or PIL image as an 8-bit RGB image.

    Honours EXIF orientation, takes the first frame of animations, composites alpha on ALPHA_BACKGROUND and maps
    16-bit, 1-bit, palette, CMYK and grayscale images to RGB. Raises DataError with a readable message otherwise.
    """
    name = str(source) if isinstance(source, (str, Path)) else getattr(source, "name", None) or "image"
    try:
        img = source if isinstance(source, Image.Image) else Image.open(source)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            width, height = img.size
            if width * height > max_pixels:
                raise DataError(
                    f"{name}: {width}x{height} pixels is larger than the limit of {max_pixels:,} pixels"
                )
            if width < 1 or height < 1:
                raise DataError(f"{name}: the image is empty")
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{name}: no such file") from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DataError(f"{name}: larger than the limit of {max_pixels:,} pixels ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise DataError(f"{name}: not a readable image ({exc.__class__.__name__})") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise DataError(f"{name}: corrupt or truncated image ({exc})") from exc


def to_tensor(img: Image.Image, resolution: int | tuple[int, int]) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, R, R) in [-1, 1] (the range the diffusion model and backbone use); a
    (width, height) resolution keeps that size instead."""
    img = img.resize((resolution, resolution) if isinstance(resolution, int) else resolution, Image.BICUBIC)
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) tensor in [-1, 1] -> (H, W, 3) uint8 array."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def train_folder(root) -> Path:
    """The folder of good training images: `root/train/good` in the MVTec layout, else `root` itself."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    for candidate in (root / "train" / "good", root):
        if candidate.is_dir() and list_images(candidate):
            return candidate
    raise DataError(f"no images found in {root} (expected {root}/train/good/*.png or images directly in {root})")


def load_images(paths, resolution: int) -> tuple[torch.Tensor, list[Path], list[str]]:
    """Load images as a (N, 3, R, R) tensor; unreadable files are skipped and reported, not fatal."""
    tensors, kept, skipped = [], [], []
    for path in paths:
        try:
            tensors.append(to_tensor(read_image(path), resolution))
            kept.append(Path(path))
        except DataError as exc:
            skipped.append(str(exc))
            log.warning("skipped %s", exc)
    if not tensors:
        raise DataError("none of the images could be read" + (f": {skipped[0]}" if skipped else ""))
    return torch.stack(tensors), kept, skipped


@dataclass
class LabelledSample:
    path: Path
    defect: str  # "good" for normal images
    mask_path: Path | None

    @property
    def is_anomalous(self) -> bool:
        return self.defect != "good"


def list_test_samples(root) -> list[LabelledSample]:
    """All test images of an MVTec-layout category with their defect type and ground-truth mask (if any)."""
    root = Path(root)
    test_dir = root / "test"
    if not test_dir.is_dir():
        raise DataError(f"{root} has no test/ folder (MVTec AD layout: test/<defect>/*.png, ground_truth/<defect>/)")
    samples = []
    for defect_dir in sorted(p for p in test_dir.iterdir() if p.is_dir()):
        for path in list_images(defect_dir):
            mask = None
            if defect_dir.name != "good":
                candidate = root / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                mask = candidate if candidate.exists() else None
            samples.append(LabelledSample(path, defect_dir.name, mask))
    if not samples:
        raise DataError(f"no test images found under {test_dir}")
    return samples


def load_mask(path: Path | None, size: tuple[int, int], resolution: int) -> np.ndarray:
    """Binary mask (R, R) bool; a missing mask is all-normal. `size` is the image's (width, height)."""
    if path is None:
        return np.zeros((resolution, resolution), dtype=bool)
    mask = Image.open(path).convert("L")
    if mask.size != size:
        raise DataError(f"mask {path} is {mask.size[0]}x{mask.size[1]} but its image is {size[0]}x{size[1]}")
    mask = mask.resize((resolution, resolution), Image.NEAREST)
    return np.asarray(mask) > 127
