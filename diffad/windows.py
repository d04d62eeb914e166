"""Non-square photos at their own aspect: square windows along the long side, and their maps stitched back.

The model sees R x R squares. Squashing a 103 x 300 tile photo into one stretches its texture 2.5x one way; instead the
photo is resized to a short side of R and covered by evenly spaced R x R windows that overlap by at least `overlap`.
Each window is scored as any square photo is; maps are averaged where windows overlap, pictures (x_t, x̂0) are taken
from the window whose centre is nearest, so they stay one coherent picture. A square photo is one window: exactly the
squashed path. A model must be trained on the windows it scores (`diffad train --scoring '{"aspect": "windows"}'`): one
trained on squashed photos reads the unsquashed texture of elongated good tiles as anomalous (docs/findings.md,
"Non-square photos").
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Windows overlap by at least this fraction of R, so no defect is only ever seen at a window's edge.
OVERLAP = 0.5


@dataclass(frozen=True)
class Layout:
    """Where the windows of one photo lie in the photo resized to (width, height), one of them R."""

    width: int
    height: int
    resolution: int
    starts: tuple[int, ...]  # offset of each window along the long side

    @property
    def horizontal(self) -> bool:
        return self.width > self.height

    @property
    def count(self) -> int:
        return len(self.starts)

    def box(self, i: int) -> tuple[slice, slice]:
        """(rows, columns) of window i."""
        r, start = self.resolution, self.starts[i]
        window = slice(start, start + r)
        return (slice(0, r), window) if self.horizontal else (window, slice(0, r))

    def nearest_window(self) -> np.ndarray:
        """(long side,) index of the window whose centre is nearest to each position along the long side."""
        centres = np.asarray(self.starts) + self.resolution / 2
        positions = np.arange(max(self.width, self.height)) + 0.5
        return np.abs(positions[:, None] - centres[None]).argmin(axis=1)


def square_layout(resolution: int) -> Layout:
    return Layout(resolution, resolution, resolution, (0,))


def layout_for(width: int, height: int, resolution: int, overlap: float = OVERLAP) -> Layout:
    """The windows of a width x height photo: resized to a short side of `resolution`, at its own aspect."""
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    long = max(size)
    count = 1 if long == resolution else math.ceil((long - resolution) / (resolution * (1 - overlap))) + 1
    starts = tuple(round(i * (long - resolution) / max(1, count - 1)) for i in range(count))
    return Layout(size[0], size[1], resolution, starts)


def photo_input(photo, resolution: int, aspect: str) -> tuple[torch.Tensor, Layout]:
    """An RGB PIL photo as the model scores it: (3, R, R) squashed, or for "windows" (3, H, W) at its own aspect
    with a short side of R; and the layout of its windows."""
    from .data import to_tensor

    if aspect == "squash":
        return to_tensor(photo, resolution), square_layout(resolution)
    layout = layout_for(*photo.size, resolution)
    return to_tensor(photo, (layout.width, layout.height)), layout


def per_photo(combined, layouts, top_k: int) -> list[tuple[np.ndarray, float]]:
    """Each photo's anomaly map and score from the CombinedMaps of all windows, photo after photo in `layouts` order."""
    windows = iter(combined)
    photos = []
    for layout in layouts:
        mine = [next(windows) for _ in range(layout.count)]
        photos.append(stitched_score([w.anomaly for w in mine], [w.score for w in mine], layout, top_k))
    return photos


def stitched_score(maps: list[np.ndarray], scores: list[float], layout: Layout, top_k: int) -> tuple[np.ndarray, float]:
    """One photo's anomaly map and score from its windows' maps and scores (a single window's are its own)."""
    if layout.count == 1:
        return maps[0], scores[0]
    from .postprocess import top_k_mean

    stitched = stitch(np.stack(maps), layout)
    return stitched, top_k_mean(stitched, top_k)


def cut(image: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(C, height, width) -> (count, C, R, R) windows (differentiable: a morph's gradient flows back through it)."""
    return torch.stack([image[:, rows, columns] for rows, columns in (layout.box(i) for i in range(layout.count))])


def stitch(windows: torch.Tensor | np.ndarray, layout: Layout):
    """(count, ..., R, R) maps -> (..., height, width), averaged where windows overlap (tensor in, tensor out)."""
    if layout.count == 1:
        return windows[0]
    as_numpy = isinstance(windows, np.ndarray)
    windows = torch.as_tensor(windows)
    total = windows.new_zeros((*windows.shape[1:-2], layout.height, layout.width))
    weight = windows.new_zeros((layout.height, layout.width))
    for i in range(layout.count):
        rows, columns = layout.box(i)
        total[..., rows, columns] += windows[i]
        weight[rows, columns] += 1
    stitched = total / weight
    return stitched.numpy() if as_numpy else stitched


def stitch_picture(windows: torch.Tensor, layout: Layout) -> torch.Tensor:
    """(count, C, R, R) pictures -> (C, height, width), each position from the window whose centre is nearest
    (averaging two noisy windows would show less noise than the model saw)."""
    if layout.count == 1:
        return windows[0]
    nearest = torch.from_numpy(layout.nearest_window())
    picture = windows.new_zeros((windows.shape[1], layout.height, layout.width))
    for i in range(layout.count):
        rows, columns = layout.box(i)
        keep = (nearest[layout.starts[i]:layout.starts[i] + layout.resolution] == i).to(windows.dtype)
        keep = keep.view(1, 1, -1) if layout.horizontal else keep.view(1, -1, 1)
        picture[:, rows, columns] += windows[i] * keep
    return picture


def resize_to(image: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A (3, H, W) image in [-1, 1] at the layout's size."""
    if tuple(image.shape[-2:]) == (layout.height, layout.width):
        return image
    return F.interpolate(image[None], size=(layout.height, layout.width), mode="bicubic", align_corners=False)[0].clamp(-1, 1)
