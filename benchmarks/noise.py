"""The shipped models under added image noise: what a low-dose protocol does to real slices.

Screening CT is often low-dose, and a lower dose is a noisier image (quantum noise grows as 1 / sqrt(dose)).
The models learnt real lungs from public exports of standard-dose CT, with Gaussian noise of 0-25 HU added in
training (``training.train``); nothing says how they behave on noisier images. This adds noise of known
strength to real slices, on top of their own, and counts boxes with the very code of the serving path
(``gateway.dicom.to_grid``, then :class:`ctscreen.reference.ReferencePipeline`):

* **MedSeg** (``../shared/data/real-ct/medseg-100/test``: 48 real COVID-19 slices, radiologist masks, never
  trained on): per-image sensitivity (a box on the lesion mask) and false boxes a slice;
* **real normal chests** (the four adult chest slices of ``../shared/data/dicom-edge-cases`` without
  COVID-19: NEMA CT1, OsiriX goudurix and toutatix, CT1 JPEG-LS; the fifth, the Toshiba lower-chest slice,
  already has a box without added noise, docs/models/real.md): boxes a slice, each a false one, over
  ``DRAWS`` noise draws of each slice.

Two textures at each strength (the standard deviation, in HU): **white** (independent pixels) and
**textured** (white noise smoothed by a Gaussian of 0.8 pixel, then scaled back to the standard deviation:
CT noise is correlated over a pixel or two by the reconstruction kernel). Pixels are clipped to
[-1024, 3071] HU after the noise, as a scanner stores them. One seed: the figures repeat exactly.

::

    python -m benchmarks noise        # -> benchmarks/results/noise-latest.json, and the table on stdout
    # to choose between lesion models: the validation split only (MedSeg's 10 validation slices and the
    # 2 pseudo-labelled validation volumes), another model.onnx
    python -m benchmarks noise --split val --lesion runs/X/export/model.onnx --out /tmp/noise-val-X.json

Needs ``../shared/data`` (says so and exits 2 without it). About three minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from benchmarks.common import BenchError, machine_info, publish, results_dir, shared_real_data

logger = logging.getLogger(__name__)

SIGMAS_HU = (0, 30, 60, 90)
TEXTURES = {"white": 0.0, "textured": 0.8}
"""Texture name: the Gaussian (pixels) that correlates the noise (0: independent pixels)."""
DRAWS = 4
NORMALS = ("dwv/nema-ct1_jpll.dcm", "dwv/osirix-goudurix.dcm", "dwv/osirix-toutatix-100.dcm",
           "pylibjpeg-data/CT1_JLSN.dcm")
SEED = 17


def noisy(hu: np.ndarray, sigma: float, corr_px: float, rng: np.random.Generator) -> np.ndarray:
    """``hu`` plus Gaussian noise of standard deviation ``sigma`` HU, correlated over ``corr_px`` pixels
    (0: white), clipped to [-1024, 3071] and rounded to int16."""
    if sigma == 0:
        return hu.astype(np.int16)
    n = rng.standard_normal(hu.shape).astype(np.float32)
    if corr_px:
        n = ndimage.gaussian_filter(n, corr_px)
        n /= n.std()
    return np.rint(np.clip(hu.astype(np.float32) + sigma * n, -1024, 3071)).astype(np.int16)


def conditions() -> Iterator[tuple[str, int, float]]:
    """``(texture, sigma HU, correlation px)`` of each measured condition, in order: no noise once (texture
    ``none``), then each texture at each strength.

    >>> [c[:2] for c in conditions()][:3]
    [('none', 0), ('white', 30), ('white', 60)]
    """
    for texture, corr in TEXTURES.items():
        for sigma in SIGMAS_HU:
            if sigma == 0 and texture != "white":
                continue
            yield ("none" if sigma == 0 else texture), sigma, corr


def _boxes(pipe: Any, grids: list[np.ndarray]) -> list[np.ndarray]:
    boxes, _, _ = pipe.run(np.stack(grids).astype(np.int16))
    return [np.asarray(b, np.float64).reshape(-1, 5) for b in boxes]


def real_slices(split: str, real_ct: Path) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The real slices and their lesion masks, on the 512 grid at 0.7 mm a pixel (the models' band already):
    ``test``, the 48 MedSeg test slices (held out); ``val``, the validation split (MedSeg's 10 validation
    slices and the 2 pseudo-labelled validation volumes: what a choice between models may look at)."""
    from training.realct import medseg_volume, real_volumes

    vols = [medseg_volume("test", real_ct)] if split == "test" else list(real_volumes("val", real_ct))
    return [h for v in vols for h in v.hu], [m > 0.5 for v in vols for m in v.lesion]


def lesions(pipe: Any, hu: list[np.ndarray], masks: list[np.ndarray], rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per texture and strength: per-image sensitivity (on the slices with a lesion) and false boxes a slice."""
    rows = []
    with_lesion = sum(bool(m.any()) for m in masks)
    for texture, sigma, corr in conditions():
        hit = false = 0
        for start in range(0, len(hu), 16):  # a batch at a time: the pseudo volumes are long
            imgs = [noisy(h, sigma, corr, rng) for h in hu[start : start + 16]]
            for b, mask in zip(_boxes(pipe, imgs), masks[start : start + 16], strict=True):
                on = [bool(mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].any()) for x0, y0, x1, y1, _ in b]
                hit, false = hit + (any(on) and bool(mask.any())), false + len(on) - sum(on)
        rows.append({"texture": texture, "sigma_hu": sigma, "slices": len(hu),
                     "with_lesion": with_lesion, "sensitivity": round(hit / max(1, with_lesion), 4),
                     "false_boxes_per_slice": round(false / len(hu), 3)})
    return rows


def normal(pipe: Any, edge: Path, rng: np.random.Generator) -> list[dict[str, Any]]:
    """Per texture and strength: boxes a slice (all false) on the real normal chest slices, ``DRAWS`` draws each."""
    from gateway.dicom import decode_hu, read_headers, to_grid

    slices = []
    for rel in NORMALS:
        ds, headers = read_headers(Path(rel).name, (edge / rel).read_bytes())
        slices.append((decode_hu(ds, headers, rel)[0], headers[0].pixel_spacing))
    rows = []
    for texture, sigma, corr in conditions():
        per_slice = []
        for hu, spacing in slices:
            grids = [to_grid(noisy(hu, sigma, corr, rng), spacing=spacing)[0] for _ in range(DRAWS if sigma else 1)]
            per_slice.append(float(np.mean([len(b) for b in _boxes(pipe, grids)])))
        rows.append({"texture": texture, "sigma_hu": sigma, "draws": DRAWS if sigma else 1,
                     "boxes_per_slice": round(float(np.mean(per_slice)), 3),
                     "by_slice": dict(zip(NORMALS, [round(v, 2) for v in per_slice], strict=True))})
    return rows


def table(doc: dict[str, Any]) -> str:
    """The results as Markdown, one row per texture and strength."""
    name = "MedSeg test" if doc["split"] == "test" else "validation split"
    out = [f"| added noise | {name}: sensitivity | {name}: false boxes a slice | real normal chests: boxes a slice |",
           "|---|---:|---:|---:|"]
    normals = {(r["texture"], r["sigma_hu"]): r for r in doc.get("normal", [])}
    for r in doc["lesions"]:
        n = normals.get((r["texture"], r["sigma_hu"]))
        what = "none" if r["sigma_hu"] == 0 else f"{r['sigma_hu']} HU, {r['texture']}"
        out.append(f"| {what} | {100 * r['sensitivity']:.0f} % | {r['false_boxes_per_slice']:.2f} | "
                   f"{'-' if n is None else format(n['boxes_per_slice'], '.2f')} |")
    return "\n".join(out)


def run(shared: Path | None = None, *, split: str = "test", lesion: Path | None = None) -> dict[str, Any]:
    """Both measures (on ``split``'s real slices; the normal chests, evaluation only, with ``test``), stamped,
    with the shipped models or another ``lesion`` model; raises BenchError when the shared data is not there."""
    from ctscreen.contracts import LESION_MODEL, VALID_AREA_MODEL
    from ctscreen.reference import ReferencePipeline, onnx_path
    from training.card import sha256_of

    edge, real_ct = shared_real_data(shared)
    missing = [rel for rel in NORMALS if not (edge / rel).is_file()]
    if missing:
        raise BenchError(f"{edge}: {', '.join(missing)} not found (the shared DICOM edge cases)")
    lesion = lesion or onnx_path(LESION_MODEL)
    pipe = ReferencePipeline(onnx_path(VALID_AREA_MODEL), lesion, threads=2, batch=4)
    rng = np.random.default_rng(SEED)
    doc = {"machine": machine_info(), "split": split, "lesion_sha256": sha256_of(lesion), "seed": SEED,
           "sigmas_hu": list(SIGMAS_HU), "textures": TEXTURES, "lesions": lesions(pipe, *real_slices(split, real_ct), rng)}
    if split == "test":
        doc["normal"] = normal(pipe, edge, rng)
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctscreen bench noise", description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="the held-out MedSeg slices and the normal chests (default), or the validation split "
                             "alone (to choose between models)")
    parser.add_argument("--lesion", type=Path, default=None, help="another lesion model.onnx (default the shipped)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/noise-latest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if (args.split != "test" or args.lesion is not None) and args.out is None:
        parser.error("--split val and --lesion write elsewhere than the published figure: give --out")
    return publish("ctscreen bench noise", lambda: run(args.shared, split=args.split, lesion=args.lesion), table,
                   args.out or results_dir() / "noise-latest.json")


if __name__ == "__main__":
    sys.exit(main())
