"""The aggregator: case rule, metrics and the versioned case result. Pure: no I/O, no Triton.

* :mod:`aggregator.schema`: the :class:`~aggregator.schema.CaseResult` document (pydantic v2).
* :mod:`aggregator.case`: :class:`~aggregator.case.CaseRule`, :func:`~aggregator.case.decide`.
* :mod:`aggregator.metrics`: confusion matrices and Table-3 metrics with Wilson intervals.
* :mod:`aggregator.report`: the evaluation report (Table 3, curves, hard negatives, rule variants).
* :mod:`aggregator.sr`: the result as DICOM SR (TID 1500), in memory (needs highdicom).

It imports nothing above :mod:`ctscreen`; ``ctscreen eval``, which writes the report, is :mod:`evaluation`.
"""

from aggregator.case import CaseDecision, CaseRule, SliceInput, decide
from aggregator.schema import SCHEMA_VERSION, CaseResult

__all__ = ["SCHEMA_VERSION", "CaseDecision", "CaseResult", "CaseRule", "SliceInput", "decide"]
