"""Lung-window montage of a study (PNG), with the truth outlined on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LUNG_WINDOW = (-600.0, 1500.0)
"""(centre, width) of the lung window."""


def window(hu: np.ndarray, centre: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]) -> np.ndarray:
    """HU -> uint8 grey levels."""
    lo = centre - width / 2.0
    g = (hu.astype(np.float32) - lo) * (255.0 / width)
    return np.clip(g, 0, 255).astype(np.uint8)


def montage(study, *, n: int = 12, cols: int = 4, outline: bool = True, size: int = 256) -> np.ndarray:
    """RGB montage [H, W, 3] of ``n`` slices evenly spread from apex to base.

    Lesions (COVID) are outlined in red, other findings in yellow, when ``outline`` is true.
    """
    from PIL import Image

    z = study.hu.shape[0]
    ks = np.linspace(z - 1, 0, min(n, z)).round().astype(int)  # apex first
    rows = -(-len(ks) // cols)
    canvas = np.zeros((rows * size, cols * size, 3), np.uint8)
    for i, k in enumerate(ks):
        g = window(study.hu[k])
        rgb = np.repeat(g[:, :, None], 3, axis=2)
        if outline:
            for mask, colour in ((study.lesion_mask[k], (255, 40, 40)),
                                 (study.finding_mask[k] > 0, (255, 220, 0))):
                edge = mask & ~erode(mask)
                rgb[edge] = colour
        im = Image.fromarray(rgb).resize((size, size), Image.Resampling.BILINEAR)
        r, c = divmod(i, cols)
        canvas[r * size:(r + 1) * size, c * size:(c + 1) * size] = np.asarray(im)
    return canvas


def erode(m: np.ndarray) -> np.ndarray:
    """``m`` eroded by one pixel (4-neighbourhood): ``m & ~erode(m)`` is its outline."""
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def save_montage(study, path: str | Path, **kw) -> Path:
    """Write :func:`montage` as PNG and return its path."""
    from PIL import Image

    path = Path(path)
    Image.fromarray(montage(study, **kw)).save(path, compress_level=6)
    return path
