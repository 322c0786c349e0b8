"""Pre-generated phantom studies for the load generator, and study-size distributions.

Studies are made once with ``phantom.make_study`` + ``phantom.write_study`` into a git-ignored cache
(``benchmarks/results/tmp/studies``) and read back into memory, so generating data never competes with
the load it is meant to measure.
"""

from __future__ import annotations

import io
import logging
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.common import TMP_DIR, BenchError

logger = logging.getLogger(__name__)

STUDY_CACHE = TMP_DIR / "studies"


@dataclass(frozen=True)
class SizeDist:
    """A distribution of study sizes (slices per study), parsed from a spec string.

    Specs: ``fixed:N``, ``choice:A,B,C``, ``uniform:LO,HI``, ``lognormal:MEDIAN,SIGMA,LO,HI``.
    Draws are rounded to ``step`` slices so that few distinct studies need generating.

    >>> SizeDist.parse("choice:40,80").draw(np.random.default_rng(0), 4)
    [80, 80, 40, 40]
    """

    kind: str
    params: tuple[float, ...]
    step: int = 10
    spec: str = ""

    @classmethod
    def parse(cls, spec: str, step: int = 10) -> SizeDist:
        kind, _, rest = spec.partition(":")
        try:
            params = tuple(float(p) for p in rest.split(",") if p.strip())
        except ValueError:
            raise ValueError(f'Argument "sizes" has a non-numeric parameter: {spec!r}.') from None
        need = {"fixed": (1, 1), "choice": (1, 64), "uniform": (2, 2), "lognormal": (4, 4)}
        if kind not in need:
            raise ValueError(
                f'Argument "sizes" must be fixed:N, choice:A,B,..., uniform:LO,HI or '
                f"lognormal:MEDIAN,SIGMA,LO,HI; got {spec!r}."
            )
        lo, hi = need[kind]
        if not lo <= len(params) <= hi or any(p <= 0 for p in params):
            raise ValueError(f'Argument "sizes" has the wrong number of positive parameters: {spec!r}.')
        if step < 1:
            raise ValueError(f'Argument "step" must be >= 1, got {step}.')
        return cls(kind, params, step, spec)

    def draw(self, rng: np.random.Generator, n: int) -> list[int]:
        """``n`` study sizes (each >= ``RUN_SLICES``-friendly minimum of 4 slices)."""
        p = self.params
        if self.kind == "fixed":
            raw = np.full(n, p[0])
            return [max(1, int(v)) for v in raw]
        if self.kind == "choice":
            return [int(v) for v in rng.choice(np.asarray(p, dtype=int), size=n)]
        if self.kind == "uniform":
            raw = rng.uniform(p[0], p[1], size=n)
        else:
            raw = np.clip(rng.lognormal(np.log(p[0]), p[1], size=n), p[2], p[3])
        return [max(4, int(round(v / self.step) * self.step)) for v in raw]


@dataclass
class PoolStudy:
    """One study ready to upload: its DICOM files in memory (and a zip of them, made on demand)."""

    kind: str
    n_slices: int
    seed: int
    path: Path
    files: list[tuple[str, bytes]] = field(repr=False)
    label: int | None = None
    _zip: bytes | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for _, b in self.files)

    def zip_bytes(self) -> bytes:
        if self._zip is None:
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
                for name, data in self.files:
                    zf.writestr(name, data)
            self._zip = buf.getvalue()
        return self._zip


def _is_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """Every DICOM Part-10 file under ``folder`` (by its preamble), sorted by path."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and _is_dicom(p))


def load_phantom(writer: bool = True):
    """The ``phantom`` package, or :class:`BenchError` when it (or its writer, with ``writer``) is missing."""
    try:
        import phantom
    except ImportError as exc:  # pragma: no cover - depends on what has landed
        raise BenchError(f"package 'phantom' cannot be imported ({exc}); it makes the benchmark studies") from exc
    for name in ("make_study", "write_study") if writer else ("make_study",):
        if not hasattr(phantom, name):
            raise BenchError(f"package 'phantom' has no {name} yet (phantom/__init__.py)")
    return phantom


def ensure_study(
    kind: str,
    n_slices: int,
    seed: int,
    *,
    encoding: str = "explicit",
    matrix: int | None = None,
    cache: Path = STUDY_CACHE,
) -> PoolStudy:
    """Make (once) and load one phantom study of ``n_slices`` slices (``matrix`` x ``matrix`` pixels)."""
    folder = cache / (f"{kind}-{n_slices}-s{seed}-{encoding}" + (f"-m{matrix}" if matrix else ""))
    files = dicom_files(folder) if folder.exists() else []
    if not files:
        ph = load_phantom()
        logger.info("making phantom study %s (%d slices) in %s", kind, n_slices, folder)
        study = ph.make_study(seed, kind=kind, n_slices=n_slices, matrix=matrix)
        folder.mkdir(parents=True, exist_ok=True)
        ph.write_study(study, folder, encoding=encoding)
        files = dicom_files(folder)
        if not files:
            raise BenchError(f"phantom.write_study wrote no DICOM files under {folder}")
    label = 1 if kind == "covid" else 0
    return PoolStudy(
        kind=kind,
        n_slices=len(files),
        seed=seed,
        path=folder,
        files=[(p.name, p.read_bytes()) for p in files],
        label=label,
    )


def build_pool(
    sizes: Sequence[int], kinds: Sequence[str] = ("covid", "normal"), *, seed: int = 1000,
    encoding: str = "explicit",
) -> dict[tuple[str, int], PoolStudy]:
    """One study per distinct (kind, size) needed by ``sizes`` (kinds alternate over arrivals)."""
    if not kinds:
        raise ValueError('Argument "kinds" must not be empty.')
    need = sorted({(kinds[i % len(kinds)], n) for i, n in enumerate(sizes)})
    return {(k, n): ensure_study(k, n, seed + 10 * n + list(kinds).index(k), encoding=encoding) for k, n in need}
