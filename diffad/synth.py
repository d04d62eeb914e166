"""Synthetic defects with exact masks: scratches, cracks, holes, stains, particles, colour spots and uneven patches.

Every generator takes an (H, W, 3) uint8 image and a numpy Generator and returns (defective image, bool mask); the
mask is exactly the set of pixels that changed. `size` in (0, 1] scales the defect with the image; add_defect can
also put it at a chosen point (the app's "place with a click").
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEFECT_TYPES = ("scratch", "crack", "hole", "stain", "particle", "colour_spot", "uneven")


def _polyline(rng: np.random.Generator, h: int, w: int, length: float, jitter: float, segments: int):
    x, y = rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)
    angle = rng.uniform(0, 2 * np.pi)
    points = [(x, y)]
    for _ in range(segments):
        angle += rng.normal(0, jitter)
        x += np.cos(angle) * length / segments
        y += np.sin(angle) * length / segments
        points.append((float(np.clip(x, 0, w - 1)), float(np.clip(y, 0, h - 1))))
    return points


def _paint(image: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Blend `colour` (H, W, 3) into `image` with per-pixel `alpha`; the mask is where any channel changed."""
    blended = image.astype(np.float32) * (1 - alpha[..., None]) + colour.astype(np.float32) * alpha[..., None]
    result = np.clip(blended.round(), 0, 255).astype(np.uint8)
    return result, np.any(result != image, axis=-1)


def _shape_alpha(h: int, w: int, draw_fn, blur: float = 0.0) -> np.ndarray:
    canvas = Image.new("L", (w, h), 0)
    draw_fn(ImageDraw.Draw(canvas))
    if blur > 0:
        canvas = canvas.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def scratch(image, rng, size=0.5):
    h, w = image.shape[:2]
    points = _polyline(rng, h, w, length=size * 0.6 * min(h, w) + 8, jitter=0.05, segments=6)
    width = max(1, round(min(h, w) * 0.008 * (0.5 + size)))
    alpha = _shape_alpha(h, w, lambda d: d.line(points, fill=255, width=width)) * 0.85
    tone = 235 if image.mean() < 128 else 25
    return _paint(image, alpha, np.full_like(image, tone))


def crack(image, rng, size=0.5):
    h, w = image.shape[:2]
    trunk = _polyline(rng, h, w, length=size * 0.5 * min(h, w) + 8, jitter=0.6, segments=12)
    branches = [trunk]
    for start in trunk[3::4]:
        branch = _polyline(rng, h, w, length=size * 0.15 * min(h, w) + 4, jitter=0.8, segments=4)
        dx, dy = start[0] - branch[0][0], start[1] - branch[0][1]
        branches.append([(float(np.clip(x + dx, 0, w - 1)), float(np.clip(y + dy, 0, h - 1))) for x, y in branch])
    width = max(1, round(min(h, w) * 0.006 * (0.5 + size)))

    def draw(d):
        for line in branches:
            d.line(line, fill=255, width=width)

    alpha = _shape_alpha(h, w, draw)
    return _paint(image, alpha, np.zeros_like(image) + 15)


def _blob(rng, h, w, radius):
    cx, cy = rng.uniform(0.25 * w, 0.75 * w), rng.uniform(0.25 * h, 0.75 * h)
    angles = np.sort(rng.uniform(0, 2 * np.pi, 10))
    radii = radius * rng.uniform(0.6, 1.2, 10)
    return [(float(cx + r * np.cos(a)), float(cy + r * np.sin(a))) for a, r in zip(angles, radii)]


def hole(image, rng, size=0.5):
    """A missing chunk: a dark irregular region with a bright rim."""
    h, w = image.shape[:2]
    poly = _blob(rng, h, w, radius=min(h, w) * (0.03 + 0.08 * size))
    rim = _shape_alpha(h, w, lambda d: d.polygon(poly, fill=255, outline=255, width=3))
    core = _shape_alpha(h, w, lambda d: d.polygon(poly, fill=255))
    result, mask_rim = _paint(image, rim * 0.7, np.full_like(image, 200))
    result, mask_core = _paint(result, core, np.zeros_like(image) + 5)
    return result, mask_rim | mask_core


def stain(image, rng, size=0.5):
    """Soft-edged contamination: a translucent brownish blot."""
    h, w = image.shape[:2]
    poly = _blob(rng, h, w, radius=min(h, w) * (0.05 + 0.1 * size))
    alpha = _shape_alpha(h, w, lambda d: d.polygon(poly, fill=255), blur=min(h, w) * 0.01) * 0.6
    colour = np.empty_like(image)
    colour[:] = (rng.integers(90, 140), rng.integers(60, 90), rng.integers(20, 50))
    return _paint(image, alpha, colour)


def particle(image, rng, size=0.5):
    """Foreign particles: a few small dark or bright specks."""
    h, w = image.shape[:2]
    count = int(rng.integers(2, 6))
    radius = max(1.5, min(h, w) * 0.012 * (0.5 + size))
    centres = [(rng.uniform(0.2 * w, 0.8 * w), rng.uniform(0.2 * h, 0.8 * h)) for _ in range(count)]

    def draw(d):
        for x, y in centres:
            r = radius * rng.uniform(0.6, 1.4)
            d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    alpha = _shape_alpha(h, w, draw)
    return _paint(image, alpha, np.full_like(image, 240 if image.mean() < 100 else 10))


def colour_spot(image, rng, size=0.5):
    h, w = image.shape[:2]
    poly = _blob(rng, h, w, radius=min(h, w) * (0.03 + 0.06 * size))
    alpha = _shape_alpha(h, w, lambda d: d.polygon(poly, fill=255), blur=1.0) * 0.8
    colour = np.empty_like(image)
    colour[:] = rng.choice([(200, 30, 30), (30, 160, 40), (40, 60, 200), (220, 200, 20)])
    return _paint(image, alpha, colour)


def uneven(image, rng, size=0.5):
    """A large, low-contrast patch: the surface a little brighter or darker and its fine texture smoothed away
    (uneven grinding, a dent catching the light). Nothing in it stands out locally; only a wide view sees it."""
    h, w = image.shape[:2]
    poly = _blob(rng, h, w, radius=min(h, w) * (0.12 + 0.2 * size))
    alpha = _shape_alpha(h, w, lambda d: d.polygon(poly, fill=255), blur=min(h, w) * 0.04)
    smoothed = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(min(h, w) * 0.01)), dtype=np.float32)
    gain = 1 + rng.choice([-1, 1]) * rng.uniform(0.12, 0.25)
    return _paint(image, alpha, np.clip(smoothed * gain, 0, 255))


GENERATORS = {"scratch": scratch, "crack": crack, "hole": hole, "stain": stain, "particle": particle, "colour_spot": colour_spot, "uneven": uneven}


def add_defect(image: np.ndarray, kind: str, seed: int = 0, size: float = 0.5,
               centre: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect of `kind` to an (H, W, 3) uint8 image; returns (image, mask). Deterministic for a seed.

    `centre`: (x, y) in pixels where the defect's centre of mass goes; by default the seed places it."""
    if kind not in GENERATORS:
        raise ValueError(f"unknown defect type {kind!r}; choose from {', '.join(DEFECT_TYPES)}")
    if not 0 < size <= 1:
        raise ValueError(f"size must be in (0, 1], got {size}")
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if centre is None:
        return GENERATORS[kind](image, np.random.default_rng(seed), size)
    return _moved_defect(image, kind, seed, size, centre)


def _moved_defect(image: np.ndarray, kind: str, seed: int, size: float, centre) -> tuple[np.ndarray, np.ndarray]:
    """The seed's defect with its centre of mass moved to `centre`. The generators place defects themselves (and
    their seeded outputs must not change), so the image is shifted under the defect instead: the defect is drawn on
    a copy shifted so that `centre` sits where the seed puts it, and its pixels are copied back, shifted the other way.
    Parts that would fall outside the image are dropped."""
    h, w = image.shape[:2]
    x, y = float(centre[0]), float(centre[1])
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"centre {centre} is outside the {w}x{h} image")
    _, natural = GENERATORS[kind](image, np.random.default_rng(seed), size)
    if not natural.any():  # nothing changed (a flat image the colour of the defect): nothing to move
        return image.copy(), natural
    rows, cols = np.nonzero(natural)
    dy, dx = round(y - rows.mean()), round(x - cols.mean())
    # shifted[r, c] = image[r + dy, c + dx], edges repeated where that falls outside.
    shifted = image[np.clip(np.arange(h) + dy, 0, h - 1)][:, np.clip(np.arange(w) + dx, 0, w - 1)]
    drawn, mask = GENERATORS[kind](shifted, np.random.default_rng(seed), size)
    rows, cols = np.nonzero(mask)
    inside = (rows + dy >= 0) & (rows + dy < h) & (cols + dx >= 0) & (cols + dx < w)
    rows, cols = rows[inside], cols[inside]
    result, moved = image.copy(), np.zeros((h, w), dtype=bool)
    result[rows + dy, cols + dx] = drawn[rows, cols]
    moved[rows + dy, cols + dx] = True
    return result, moved


def textured_part(size: int = 64, seed: int = 0) -> np.ndarray:
    """A procedurally made 'good part' (a shaded disc on a textured background) for tests and demos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    background = 60 + 20 * np.sin(12 * xx + rng.uniform(0, 0.3)) * np.cos(9 * yy) + rng.normal(0, 2, (size, size))
    cx, cy = 0.5 + rng.normal(0, 0.01), 0.5 + rng.normal(0, 0.01)
    r = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    disc = np.clip((0.33 - r) * size, 0, 1)
    shade = 170 - 150 * r
    grey = background * (1 - disc) + shade * disc
    rgb = np.stack([grey * 0.9, grey, grey * 1.1], axis=-1)
    return np.clip(rgb, 0, 255).astype(np.uint8)
