"""Stamps of published figures: the commit, the shipped models' sha256, the machine, its load and the date.

Every benchmark writes ``"machine": benchmarks.common.machine_info()`` into its result file; that stamp
now carries ``"models"`` too: ``{"valid_area": {"version", "sha256"}, "lesion": {...}}`` of the ONNX files
in ``model_repository``, hashed by :func:`ctscreen.repo.model_provenance` (the very function that writes
the provenance parameters into the served Triton configs, so a stamp, the model card and the served
config all agree byte for byte).

:func:`problems` says what is wrong with one stamped file (no stamp, a field missing, a model sha256 that
is not the shipped one); ``tests/test_figure_stamps.py`` runs it on every published figure.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ctscreen.contracts import LESION_MODEL, VALID_AREA_MODEL
from ctscreen.machine import shipped_models as shipped_models  # re-exported: the stamp's model half

ROOT = Path(__file__).resolve().parent.parent
STAMPED_MODELS = (VALID_AREA_MODEL, LESION_MODEL)
# what a benchmark stamp must hold besides the models (names as in machine_info)
STAMP_FIELDS = ("commit", "time_utc", "loadavg_1m", "cpu", "cores")


def _model_digests(value: Any) -> dict[str, str] | None:
    """``{model: sha256}`` from the shapes stamps take in this repository (None when there is none):

    * ``{"valid_area": {"sha256": ...}, ...}`` (benchmark stamps, training reports);
    * ``[{"name": "valid_area", "sha256": ...}, ...]`` (``ctscreen eval`` reports, as the gateway serves them).
    """
    if isinstance(value, Mapping):
        items = [(k, v) for k, v in value.items() if isinstance(v, Mapping)]
    elif isinstance(value, list):
        items = [(v.get("name"), v) for v in value if isinstance(v, Mapping)]
    else:
        return None
    got = {str(k): str(v["sha256"]) for k, v in items if k in STAMPED_MODELS and v.get("sha256")}
    return got or None


def find_stamps(doc: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every ``(where, stamp)`` in a result document: a ``"machine"`` object (benchmarks) or a top-level
    ``"models"`` (evaluation reports); nested documents (a report that copies others) are searched too."""
    def walk(node: Any, where: str) -> Iterator[tuple[str, dict[str, Any]]]:
        if isinstance(node, Mapping):
            if isinstance(node.get("machine"), Mapping):
                yield f"{where}.machine", dict(node["machine"])
            for key, value in node.items():
                if key != "machine" and isinstance(value, Mapping | list):
                    yield from walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                if isinstance(value, Mapping):
                    yield from walk(value, f"{where}[{i}]")

    yield from walk(doc, "$")


def problems(path: Path, *, models: bool = True, shipped: Mapping[str, Mapping[str, str]] | None = None,
             fields: tuple[str, ...] = STAMP_FIELDS) -> list[str]:
    """What is wrong with the stamp(s) of the result file ``path`` ([] when nothing).

    ``models``: the figure depends on the shipped models, so its stamp must name their sha256 and they
    must be those of ``shipped`` (default: :func:`shipped_models`). ``fields``: what else a stamp holds.
    """
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    if not path.is_file():
        return [f"{rel}: missing (regenerate it)"]
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"{rel}: not JSON ({exc})"]
    shipped = shipped_models() if shipped is None else shipped
    want = {name: m["sha256"] for name, m in shipped.items()}
    out: list[str] = []
    stamps = list(find_stamps(doc))
    top_models = _model_digests(doc.get("models")) if isinstance(doc, Mapping) else None
    if not stamps and top_models is None:
        return [f"{rel}: no stamp (no \"machine\" object, no \"models\")"]
    for where, st in stamps:
        missing = [f for f in fields if st.get(f) in (None, "")]
        if missing:
            out.append(f"{rel} {where}: stamp lacks {', '.join(missing)}")
    if not models:
        return out
    digests = [(w, _model_digests(st.get("models"))) for w, st in stamps]
    if top_models is not None:
        digests.append(("$.models", top_models))
    if not any(d for _, d in digests):
        return out + [f"{rel}: no model sha256 in its stamp (measured before stamps named the models)"]
    for where, got in digests:
        if got is None:
            if where.endswith(".machine") and top_models is None:
                out.append(f"{rel} {where}: no model sha256 in this stamp")
            continue
        for name, sha in want.items():
            if got.get(name) != sha:
                out.append(f"{rel} {where}: {name} sha256 {got.get(name) or 'none'} is not the shipped {sha}")
    return out
