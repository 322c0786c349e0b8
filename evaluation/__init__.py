"""``ctscreen eval``: model quality measured through the serving path.

A package on the roof: it wires the packages below it together (the phantom maker, the training data
loaders, the gateway and its HTTP client, the in-process reference of :mod:`ctscreen.reference`, the
pure report of :mod:`aggregator.report`) and nothing below imports it.

* :mod:`evaluation.dataset`: the labelled set on disk and its per-image truth; the held-out phantom
  set; a NIfTI set written as DICOM studies.
* :mod:`evaluation.runners`: the serving paths (the gateway's HTTP API, the in-process reference) and
  the fan-out of a set through one of them.
* :mod:`evaluation.output`: ``report.md``, ``report.json``, ``results.jsonl``, ``results.csv`` and the PNG plots.
* :mod:`evaluation.cli`: the command.

Errors
------
::

    EvalError(Exception)    a one-line error for the user: ``ctscreen eval`` exits with status 2
"""


class EvalError(Exception):
    """A one-line error for the user: the command exits with status 2."""
