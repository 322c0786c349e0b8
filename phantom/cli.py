"""``ctscreen phantom``: write synthetic chest-CT studies as DICOM series with their truth.

    ctscreen phantom --out DIR --studies N --seed S [--kind covid|...|mixed] [--slices N]
                     [--matrix N] [--encoding explicit|jpeg2000|rle|mixed] [--shuffle]

Study ``i`` uses seed ``S + i`` and goes to ``DIR/NNNN_<kind>_s<seed>/``; ``DIR/index.json`` lists
them (path, kind, label, seed). ``--kind mixed`` alternates COVID and the six controls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .dicomio import ENCODINGS
from .study import KINDS


class _ArgError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage dump
        raise _ArgError(message)


_WHAT = __doc__.split("\n\n")[0].split(": ", 1)[1]
_DESCRIPTION = _WHAT[0].upper() + _WHAT[1:]
"""The docstring's first line without its reST and the command's name, which the usage line gives."""


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ctscreen phantom", description=_DESCRIPTION)
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--studies", type=int, default=1, help="number of studies (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first study (default 0)")
    p.add_argument("--kind", default="mixed", help=f"one of {', '.join(KINDS)} or mixed (default)")
    p.add_argument("--slices", type=int, default=None, help="slices per study (default: 60-600 by spacing)")
    p.add_argument("--matrix", type=int, default=None, help="square matrix size (default mostly 512)")
    p.add_argument("--encoding", default="explicit", help=f"one of {', '.join(ENCODINGS)} or mixed")
    p.add_argument("--shuffle", action="store_true", help="random file names")
    p.add_argument("--no-montage", action="store_true", help="skip the PNG montages")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def kind_for(i: int, kind: str) -> str:
    """Kind of study ``i``: ``mixed`` alternates covid with the six controls in turn."""
    if kind != "mixed":
        return kind
    controls = KINDS[1:]
    return "covid" if i % 2 == 0 else controls[(i // 2) % len(controls)]


def _validate(a) -> str | None:
    if a.studies < 1:
        return f"--studies must be a positive integer, got {a.studies}"
    if a.seed < 0:
        return f"--seed must be >= 0, got {a.seed}"
    if a.kind not in (*KINDS, "mixed"):
        return f"--kind must be one of {', '.join(KINDS)}, mixed; got {a.kind!r}"
    if a.slices is not None and not 1 <= a.slices <= 2000:
        return f"--slices must be in 1..2000, got {a.slices}"
    if a.matrix is not None and not 64 <= a.matrix <= 1024:
        return f"--matrix must be in 64..1024, got {a.matrix}"
    if a.encoding not in (*ENCODINGS, "mixed"):
        return f"--encoding must be one of {', '.join(ENCODINGS)}, mixed; got {a.encoding!r}"
    out: Path = a.out
    if out.exists() and not out.is_dir():
        return f"--out {out} exists and is not a folder"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out} cannot be created: {exc.strerror or exc}"
    if not os.access(out, os.W_OK | os.X_OK):
        return f"--out {out} is not writable"
    try:
        probe = out / ".ctscreen-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return f"--out {out} is not writable: {exc.strerror or exc}"
    return None


def main(argv: list[str] | None = None) -> int:
    try:
        a = _parser().parse_args(argv)
    except _ArgError as exc:
        print(f"ctscreen phantom: error: {exc}", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    problem = _validate(a)
    if problem:
        print(f"ctscreen phantom: error: {problem}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from .dicomio import write_study
    from .study import make_study

    index = []
    bar = tqdm(range(a.studies), desc="phantom", unit="study", disable=a.quiet, file=sys.stderr)
    try:
        for i in bar:
            seed = a.seed + i
            kind = kind_for(i, a.kind)
            encoding = ENCODINGS[i % len(ENCODINGS)] if a.encoding == "mixed" else a.encoding
            bar.set_postfix_str(f"{kind} seed={seed}")
            study = make_study(seed, kind, n_slices=a.slices, matrix=a.matrix)
            folder = a.out / f"{i:04d}_{kind}_s{seed}"
            write_study(study, folder, encoding=encoding, shuffle=a.shuffle, montage=not a.no_montage)
            index.append({"path": folder.name, "kind": kind, "label": study.label, "seed": seed,
                          "slices": int(study.hu.shape[0]), "encoding": encoding,
                          "lesion_slices": len(study.manifest["lesion_slices"])})
    except OSError as exc:
        print(f"ctscreen phantom: error: writing failed: {exc}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    (a.out / "index.json").write_text(json.dumps({"studies": index}, indent=1))
    if not a.quiet:
        print(f"wrote {len(index)} studies to {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
