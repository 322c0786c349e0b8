"""Regenerate the preview montages of docs/phantom/ (one per kind).

    .venv/bin/python docs/phantom/make_previews.py [--seed 4] [--out docs/phantom]

Top row: four lung-window slices through the finding; bottom row: the same slices with the truth
outlined (red: COVID lesion mask, yellow: other findings incl. the stomach bubble / bowel gas).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

import phantom
from phantom.montage import erode, window


def preview(study: phantom.Study, size: int = 256) -> np.ndarray:
    if study.kind == "covid":
        target = study.lesion_mask
    elif study.kind == "normal":
        target = study.finding_mask == phantom.FINDING_CODES["stomach_bubble"]
    else:
        target = study.finding_mask == phantom.FINDING_CODES[study.kind]
    ks = np.flatnonzero(target.any(axis=(1, 2)))
    if study.kind == "normal":  # apex, hilum, base, and the stomach bubble under the diaphragm
        z = study.hu.shape[0]
        picks = [int(z * 0.85), int(z * 0.6), int(z * 0.42), int(ks[len(ks) // 2])]
    else:
        area = target.sum(axis=(1, 2))
        best = int(np.argmax(area))
        lo, hi = ks[0], ks[-1]
        picks = sorted({int(v) for v in np.clip([best + 6, best + 2, best - 2, best - 6], lo, hi)}, reverse=True)
        while len(picks) < 4:
            picks.append(picks[-1])
    top, bottom = [], []
    for k in picks:
        g = window(study.hu[k])
        rgb = np.repeat(g[:, :, None], 3, axis=2)
        top.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
        rgb = rgb.copy()
        for mask, colour in ((study.lesion_mask[k], (255, 40, 40)), (study.finding_mask[k] > 0, (255, 220, 0))):
            rgb[mask & ~erode(mask)] = colour
        bottom.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
    return np.concatenate([np.concatenate(top, axis=1), np.concatenate(bottom, axis=1)], axis=0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent)
    ap.add_argument("--slices", type=int, default=160)
    a = ap.parse_args()
    for kind in phantom.KINDS:
        s = phantom.make_study(a.seed, kind, n_slices=a.slices, matrix=512, slice_thickness=2.5)
        Image.fromarray(preview(s)).quantize(colors=128).save(a.out / f"{kind}.png", optimize=True)
        print(kind, s.manifest["finding_slices"], len(s.manifest["lesion_slices"]))  # noqa: T201


if __name__ == "__main__":
    main()
