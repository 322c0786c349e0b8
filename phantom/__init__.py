"""Synthetic chest-CT studies with exact ground truth (the project's digital phantom).

>>> import phantom
>>> study = phantom.make_study(seed=1, kind="covid", n_slices=24, matrix=128)
>>> study.hu.shape, study.label
((24, 128, 128), 1)

See ``docs/phantom/README.md`` for the anatomy, the findings and the output layout.
"""

from .dicomio import ENCODINGS, read_manifest, read_masks, write_study
from .findings import COVID_SUBTYPES, FINDING_CODES, HU_RANGES
from .study import KINDS, Study, make_study

__all__ = [
    "ENCODINGS",
    "read_manifest",
    "read_masks",
    "write_study",
    "COVID_SUBTYPES",
    "FINDING_CODES", "HU_RANGES", "KINDS", "Study", "make_study"]
