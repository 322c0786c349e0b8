"""The shipped models across fields of view: real slices re-imaged from 250 to 500 mm, on the 512 grid two ways.

A chest CT's field of view (250-500 mm on 512 pixels) sets the millimetres of a pixel. The models learnt real
lungs at 0.7 mm a pixel; ``gateway.dicom.to_grid`` puts every slice on the grid at 0.62-0.85 mm
(``GRID_MM``). This measures what that does, in one run, against filling the grid with the slice whatever its
field (the matrix alone deciding the scale, as before), with the very code of the serving path
(``to_grid``, then :class:`ctscreen.reference.ReferencePipeline`):

* **MedSeg** (``../shared/data/real-ct/medseg-100/test``: 48 real COVID-19 slices, radiologist masks, never
  trained on), each placed at 0.7 mm a pixel by ``training.realct`` and re-imaged at each field of view
  (linear zoom, air around, centre crop beyond the grid): per-image sensitivity (a box on the lesion mask),
  box precision and false boxes a slice, each box mapped back to the stored image (``grid.to_original``);
* **a real normal chest** (the NEMA CT1 slice of ``../shared/data/dicom-edge-cases``, a 339 mm field at
  0.66 mm): the boxes on a centre cut of its matrix at each smaller field (the same pixels, a field that cuts
  the chest wall), where a box is a false one.

::

    python -m benchmarks fov        # -> benchmarks/results/fov-latest.json, and the table on stdout

Needs ``../shared/data`` (says so and exits 2 without it). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from benchmarks.common import BenchError, machine_info, publish, results_dir, shared_real_data

logger = logging.getLogger(__name__)

FIELDS_MM = (250, 300, 358, 420, 500)
NORMAL_FIELDS_MM = (339, 300, 290, 280, 250)
NEMA = Path("dwv") / "nema-ct1_jpll.dcm"
SOURCE_MM = 0.7  # training.realct.SPACING_MM: where the MedSeg slices lie on their grid


def reimage(img: np.ndarray, dst_mm: float, fill: float, order: int = 1) -> np.ndarray:
    """A 512 x 512 slice at ``SOURCE_MM`` a pixel re-imaged on 512 pixels of ``dst_mm``: zoomed about the
    centre, ``fill`` around it, cropped beyond the grid."""
    z = ndimage.zoom(img.astype(np.float32), SOURCE_MM / dst_mm, order=order, mode="nearest")
    out = np.full((512, 512), fill, np.float32)
    n = z.shape[0]
    if n >= 512:
        s = (n - 512) // 2
        out[:] = z[s : s + 512, s : s + 512]
    else:
        s = (512 - n) // 2
        out[s : s + n, s : s + n] = z
    return out


def _boxes(pipe: Any, grids: list[np.ndarray]) -> list[np.ndarray]:
    boxes, _, _ = pipe.run(np.stack(grids).astype(np.int16))
    return [np.asarray(b, np.float64).reshape(-1, 5) for b in boxes]


def medseg(pipe: Any, real_ct: Path) -> list[dict[str, Any]]:
    """Per field of view and way onto the grid: sensitivity, box precision, false boxes a slice."""
    from gateway.dicom import to_grid
    from training.realct import medseg_volume

    vol = medseg_volume("test", real_ct)
    rows = []
    for fov in FIELDS_MM:
        mm = fov / 512
        imgs = [np.rint(reimage(h, mm, -1024)).astype(np.int16) for h in vol.hu]
        masks = [reimage(m.astype(np.float32), mm, 0, order=0) > 0.5 for m in vol.lesion]
        for way, spacing in (("on the band", (mm, mm)), ("filling the grid", None)):
            placed = [to_grid(img, spacing=spacing) for img in imgs]
            hit = on = total = 0
            for (_, grid), b, mask in zip(placed, _boxes(pipe, [g for g, _ in placed]), masks, strict=True):
                back = grid.to_original(b) if len(b) else b
                touches = [bool(mask[int(y0) : int(y1) + 1, int(x0) : int(x1) + 1].any()) for x0, y0, x1, y1, _ in back]
                total, on, hit = total + len(touches), on + sum(touches), hit + any(touches)
            rows.append({"field_mm": fov, "grid": way, "slices": len(imgs), "sensitivity": round(hit / len(imgs), 4),
                         "box_precision": round(on / total, 4) if total else None,
                         "false_boxes_per_slice": round((total - on) / len(imgs), 3)})
    return rows


def normal(pipe: Any, edge: Path) -> list[dict[str, Any]]:
    """Boxes on centre cuts of a real normal chest slice's matrix (smaller fields, the same pixels)."""
    from gateway.dicom import decode_hu, read_headers, to_grid

    ds, headers = read_headers(NEMA.name, (edge / NEMA).read_bytes())
    hu = decode_hu(ds, headers, NEMA.name)[0]
    mm = headers[0].pixel_spacing
    assert mm is not None
    rows = []
    for fov in NORMAL_FIELDS_MM:
        n = min(hu.shape[0], round(fov / mm[0]))
        s = (hu.shape[0] - n) // 2
        cut = hu[s : s + n, s : s + n]
        on_band, magnified = _boxes(pipe, [to_grid(cut, spacing=mm)[0], to_grid(cut)[0]])
        rows.append({"field_mm": fov, "matrix": n, "false_boxes_on_the_band": len(on_band),
                     "false_boxes_filling_the_grid": len(magnified)})
    return rows


def table(doc: dict[str, Any]) -> str:
    """The results as Markdown."""
    out = ["| field of view | grid | sensitivity | box precision | false boxes a slice |", "|---|---|---:|---:|---:|"]
    for r in doc["medseg"]:
        precision = f"{100 * r['box_precision']:.0f} %" if r["box_precision"] is not None else "-"
        out.append(f"| {r['field_mm']} mm | {r['grid']} | {100 * r['sensitivity']:.0f} % | {precision} | "
                   f"{r['false_boxes_per_slice']:.2f} |")
    out += ["", "| normal NEMA CT1 cut to | false boxes, on the band | false boxes, filling the grid |", "|---|---:|---:|"]
    out += [f"| {r['field_mm']} mm ({r['matrix']} px) | {r['false_boxes_on_the_band']} | "
            f"{r['false_boxes_filling_the_grid']} |" for r in doc["normal"]]
    return "\n".join(out)


def run(shared: Path | None = None) -> dict[str, Any]:
    """Both measures, stamped; raises BenchError when the shared data is not there."""
    from ctscreen.reference import ReferencePipeline
    from gateway.dicom import GRID_MM

    edge, real_ct = shared_real_data(shared)
    if not (edge / NEMA).is_file():
        raise BenchError(f"{edge / NEMA} not found (the shared DICOM edge cases)")
    pipe = ReferencePipeline.from_repo(threads=2, batch=4)
    return {"machine": machine_info(), "grid_mm": list(GRID_MM), "medseg": medseg(pipe, real_ct), "normal": normal(pipe, edge)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ctscreen bench fov", description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=None, help="the shared data folder (default ../shared/data)")
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/fov-latest.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    return publish("ctscreen bench fov", lambda: run(args.shared), table, args.out or results_dir() / "fov-latest.json")


if __name__ == "__main__":
    sys.exit(main())
