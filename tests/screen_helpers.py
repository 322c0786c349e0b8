"""Helpers shared by the screening tests (test_gateway_stream, test_gateway_speculation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import phantom
from aggregator.schema import CaseResult


def phantom_files(folder: Path, n_slices: int) -> list[tuple[str, bytes]]:
    """A COVID phantom study as shuffled files (file order says nothing about slice order)."""
    study = phantom.make_study(seed=5, kind="covid", n_slices=n_slices)
    out = phantom.write_study(study, folder / "covid", shuffle=True, montage=False)
    return [(p.name, p.read_bytes()) for p in sorted(Path(out, "dicom").iterdir())]


def comparable(result: CaseResult) -> dict[str, Any]:
    """A result without what differs between two runs of one study (timings, creation time)."""
    return result.model_dump(mode="json", exclude={"timings", "created_at"})
